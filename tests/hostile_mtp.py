"""Hostile cases: hostile_mtp (registered with @hostile).

Multi-token-prediction tensors the tiny Mixtral's family has no place for (transformers names no MTP keys for
mixtral): every command that reads the model refuses it in one line naming the shard, rather than a
prune or merge copying an 8-expert MTP router unedited beside a pruned decoder.
"""

from __future__ import annotations

import numpy as np
from hostile import MODEL_READERS, Workspace, hostile
from safetensors.numpy import load_file, save_file


def _add(ws: Workspace, name: str, shape: tuple[int, ...]) -> None:
    tensors = load_file(ws.shard())
    tensors[name] = np.zeros(shape, dtype=next(iter(tensors.values())).dtype)
    save_file(tensors, ws.shard(), metadata={"format": "pt"})


@hostile("mtp-router-in-a-family-without-mtp", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    _add(ws, "mtp.layers.0.block_sparse_moe.gate.weight", (8, 32))


@hostile("nextn-tensor-in-a-family-without-mtp", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    _add(ws, "model.nextn_head.weight", (32, 32))
