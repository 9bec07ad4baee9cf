"""Hostile cases: hostile_code (registered with @hostile)."""

from __future__ import annotations

from hostile import (
    LOADERS,
    Workspace,
    hostile,
)


def evil_code(ws: Workspace) -> str:
    """Python that leaves a marker file if it is ever imported."""
    return f"import pathlib\npathlib.Path({str(ws.marker)!r}).write_text('ran')\n"


@hostile("auto-map-config-to-other-file", LOADERS, "config.json")
def _(ws: Workspace) -> None:
    (ws.model / "evil.py").write_text(evil_code(ws) + "from transformers import MixtralConfig as EvilConfig\n")
    config = ws.config()
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    ws.write_config(config)
