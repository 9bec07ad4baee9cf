"""Hostile cases: hostile_checkpoint (registered with @hostile)."""

from __future__ import annotations

from hostile import (
    LOADERS,
    MODEL_READERS,
    Workspace,
    hostile,
)


@hostile("config-is-a-folder", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    (ws.model / "config.json").unlink()
    (ws.model / "config.json").mkdir()


@hostile("shard-overlapping-offsets", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    header, data = ws.header()
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
    ws.write_header(header, data)


@hostile("top-k-above-expert-count", LOADERS, "config.json")
def _(ws: Workspace) -> None:
    config = ws.config()
    config["num_experts_per_tok"] = config["num_local_experts"] + 1
    ws.write_config(config)
