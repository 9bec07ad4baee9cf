"""Hostile cases: a checkpoint that carries Python (registered with @hostile); refused without consent.

The marker-writing files here are imported by nothing unless moe-prune lets a checkpoint's code run;
`tests/test_security.py` runs the same places with and without --trust-remote-code.
"""

from __future__ import annotations

import json
import shutil

from hostile import LOADERS, Workspace, hostile

from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint


def evil_code(ws: Workspace) -> str:
    """Python that leaves a marker file if it is ever imported."""
    return f"import pathlib\npathlib.Path({str(ws.marker)!r}).write_text('ran')\n"


def make_ragged(ws: Workspace) -> None:
    """Replace the workspace model by a ragged copy (different expert counts per layer) written by prune."""
    from moe_prune.stages import prune

    ckpt = Checkpoint.open(ws.model)
    keep = {layer: list(ids[: 4 + i]) for i, (layer, ids) in enumerate(ckpt.identity.original_ids.items())}
    target = ws.root / "ragged.tmp"
    prune.run(ws.model, DropMask.create(ckpt.identity, keep, "test"), target)
    shutil.rmtree(ws.model)
    target.rename(ws.model)


def add_auto_map(ws: Workspace, entry: str, module: str, cls: str) -> None:
    """An auto_map entry in config.json pointing at a marker-writing module of the checkpoint."""
    # A subclass, not an alias: transformers registers the class it runs, and must not touch the real one.
    (ws.model / f"{module}.py").write_text(
        evil_code(ws) + f"from transformers import MixtralConfig\nclass {cls}(MixtralConfig): pass\n"
    )
    config = ws.config()
    config.setdefault("auto_map", {})[entry] = f"{module}.{cls}"
    ws.write_config(config)


@hostile("ragged-edited-model-file", LOADERS, "modeling_moe_prune.py")
def _(ws: Workspace) -> None:
    make_ragged(ws)
    path = ws.model / "modeling_moe_prune.py"
    path.write_text(path.read_text() + evil_code(ws))


@hostile("ragged-auto-map-config-elsewhere", LOADERS, "config.json")
def _(ws: Workspace) -> None:
    make_ragged(ws)
    add_auto_map(ws, "AutoConfig", "evil", "EvilConfig")


@hostile("ragged-auto-map-model-elsewhere", LOADERS, "config.json")
def _(ws: Workspace) -> None:
    make_ragged(ws)
    (ws.model / "evil.py").write_text(evil_code(ws))
    config = ws.config()
    config["auto_map"]["AutoModelForCausalLM"] = "evil.RaggedMixtralForCausalLM"
    ws.write_config(config)


@hostile("ragged-base-class-not-the-family", LOADERS, "config.json")
def _(ws: Workspace) -> None:
    make_ragged(ws)
    config = ws.config()
    config["moe_prune_ragged"]["base_class"] = "LlamaForCausalLM"
    config["auto_map"]["AutoModelForCausalLM"] = "modeling_moe_prune.RaggedLlamaForCausalLM"
    ws.write_config(config)


@hostile("ragged-model-file-missing", LOADERS, "modeling_moe_prune.py")
def _(ws: Workspace) -> None:
    make_ragged(ws)
    (ws.model / "modeling_moe_prune.py").unlink()


@hostile("auto-map-not-an-object", LOADERS, "config.json")
def _(ws: Workspace) -> None:
    config = ws.config()
    config["auto_map"] = ["evil.Evil"]
    (ws.model / "config.json").write_text(json.dumps(config))
