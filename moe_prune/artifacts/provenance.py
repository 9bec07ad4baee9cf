"""What a resumed run must match: fingerprints of the model, the data and the settings, defined once.

Used by `lottery` (its recipe), `finetune` (its run.json) and `sweep` (its folder): a run picks up
where it stopped only when the fingerprint it recorded equals the one computed now. Weights are hashed
only up to `WEIGHT_HASH_LIMIT` bytes (larger models: config and tensor headers).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

WEIGHT_HASH_LIMIT = 1 << 30
CHUNK = 1 << 20


class Fingerprinted(Protocol):
    """What `model_fingerprint` reads of an opened checkpoint (`checkpoint.source.Checkpoint`)."""

    tensors: Any  # names, dtypes and shapes from the shard headers
    shard_files: Any
    config: Any  # with a `fingerprint()` of the fields that change the model


def data_fingerprint(source: str) -> dict[str, Any]:
    """sha256 of a local file's bytes; hub datasets are named, not hashed."""
    path = Path(source).expanduser()
    if not path.is_file():
        return {"source": source, "sha256": None}
    return {"source": source, "sha256": hash_files([path])}


def model_fingerprint(ckpt: Fingerprinted) -> dict[str, Any]:
    """Config fingerprint, tensor names/dtypes/shapes, and the weights' bytes when they are small enough."""
    headers = json.dumps([[t.name, t.dtype, list(t.shape)] for t in ckpt.tensors]).encode()
    size = sum(p.stat().st_size for p in ckpt.shard_files)
    weights = hash_files(list(ckpt.shard_files)) if size <= WEIGHT_HASH_LIMIT else f"not hashed ({size} bytes)"
    return {
        "config": ckpt.config.fingerprint(),
        "tensors": "sha256:" + hashlib.sha256(headers).hexdigest()[:16],
        "weights": weights,
    }


def hash_files(paths: list[Path]) -> str:
    """Short sha256 of the files' bytes, read in chunks (never a whole shard in memory)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def hash_tokens(ids: Any) -> str:
    """Short sha256 of token ids (an integer array of any shape; the shape counts): which windows a file counted."""
    array = np.ascontiguousarray(np.asarray(ids), dtype=np.int64)
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def fingerprint_json(obj: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(obj))
