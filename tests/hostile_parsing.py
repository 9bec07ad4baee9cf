"""Hostile cases: hostile_parsing (registered with @hostile): JSON and archives built to attack the parser.

Every JSON moe-prune reads goes through one bounded reader (`artifacts.common.parse_json`) and every
.npz through `open_npz`; these cases put the same attacks in each kind of input and run them through
every command that reads it: nesting 100,000 deep (RecursionError), an integer of 5,000 digits
(Python's int limit, a ValueError), a number beyond a float, a link to /dev/zero (read forever), a
safetensors header one byte over safetensors' own 100,000,000-byte limit, an .npz member whose .npy
header claims 8 TB, and a zip entry claiming 4 GB.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hostile import LOADERS, MASK_READERS, MODEL_READERS, STATS_READERS, Workspace, hostile
from hostile_artifacts import MANIFEST_READERS, _manifest

DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5_000
HUGE_FLOAT = "1e999"
PAYLOADS = {"deep": DEEP, "huge-int": HUGE_INT, "huge-float": HUGE_FLOAT}
INDEX = "model.safetensors.index.json"


def inject(text: str, payload: str) -> str:
    """A JSON object's text with one more key, `"hostile"`, whose value is `payload` (raw JSON text)."""
    body = text.lstrip()
    assert body.startswith("{"), body[:40]
    return '{"hostile": ' + payload + ", " + body[1:]


def _inject_file(path: Callable[[Workspace], Path], payload: str) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        target = path(ws)
        target.write_text(inject(target.read_text(), payload))

    return build


def _link_to_dev_zero(path: Callable[[Workspace], Path]) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        target = path(ws)
        target.unlink(missing_ok=True)
        os.symlink("/dev/zero", target)

    return build


def write_index(ws: Workspace) -> Path:
    """A model.safetensors.index.json for the one-shard workspace model (a sharded checkpoint's index)."""
    header, _ = ws.header()
    weight_map = {name: ws.shard().name for name in header if name != "__metadata__"}
    path = ws.model / INDEX
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _tokenizer_config(ws: Workspace) -> Path:
    return ws.model / "tokenizer_config.json"


def _manifest_file(ws: Workspace) -> Path:
    path = ws.model / "moe_prune.json"
    path.write_text(json.dumps(_manifest(ws)))
    return path


# ---- JSON files: config, index, tokenizer config, mask, manifest -------------------------------------------------
JSON_FILES: dict[str, tuple[Callable[[Workspace], Path], tuple[str, ...], str]] = {
    "config": (lambda ws: ws.model / "config.json", MODEL_READERS, "config.json"),
    "index": (write_index, MODEL_READERS, INDEX),
    "tokenizer-config": (_tokenizer_config, LOADERS, "tokenizer_config.json"),
    "mask": (lambda ws: ws.mask, MASK_READERS, "mask.json"),
    "manifest": (_manifest_file, MANIFEST_READERS, "moe_prune.json"),
}

for _kind, (_path, _commands, _blame) in JSON_FILES.items():
    for _payload_name, _payload in PAYLOADS.items():
        hostile(f"bounded-{_kind}-{_payload_name}", _commands, _blame)(_inject_file(_path, _payload))
    hostile(f"bounded-{_kind}-dev-zero", _commands, _blame)(_link_to_dev_zero(_path))


# ---- safetensors headers ---------------------------------------------------------------------------------------


def _write_raw_header(ws: Workspace, text: str, data: bytes) -> None:
    blob = text.encode()
    ws.shard().write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _header_with(payload: str) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        header, data = ws.header()
        _write_raw_header(ws, inject(json.dumps(header), payload), data)

    return build


hostile("bounded-header-deep", MODEL_READERS, "model.safetensors")(_header_with(DEEP))
hostile("bounded-header-huge-offset", MODEL_READERS, "model.safetensors")(
    _header_with('{"dtype": "F32", "shape": [1], "data_offsets": [0, ' + HUGE_INT + "]}")
)


@hostile("bounded-header-over-safetensors-limit", MODEL_READERS, "model.safetensors")
def _(ws: Workspace) -> None:
    """A valid header padded with spaces to 100,000,001 bytes: safetensors refuses it, so must we."""
    header, data = ws.header()
    text = json.dumps(header)
    _write_raw_header(ws, text + " " * (100_000_001 - len(text)), data)


# ---- statistics: __meta__ and the archive's claimed sizes --------------------------------------------------------


def _meta_with(payload: str) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        arrays = ws.stats_arrays()
        arrays["__meta__"] = np.array(inject(str(arrays["__meta__"]), payload))
        ws.write_stats(arrays)

    return build


for _payload_name, _payload in PAYLOADS.items():
    hostile(f"bounded-stats-meta-{_payload_name}", STATS_READERS, "stats.npz")(_meta_with(_payload))


def npy_claims(blob: bytes, member: str, shape: tuple[int, ...]) -> bytes:
    """An .npz (stored, as np.savez writes) whose `member` has `shape` in its .npy header; its bytes unchanged."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        info = archive.getinfo(member)
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len  # the local header's own lengths (np.savez: zip64)
    assert blob[start : start + 8] == b"\x93NUMPY\x01\x00", blob[start : start + 8]
    (length,) = struct.unpack("<H", blob[start + 8 : start + 10])
    header = blob[start + 10 : start + 10 + length].decode("latin1")
    old = header[header.index("'shape'") : header.index(")", header.index("'shape'")) + 1]
    new = f"'shape': {shape!r}"
    padded = header.replace(old, new).rstrip("\n").rstrip(" ")
    padded += " " * (length - 1 - len(padded)) + "\n"
    assert len(padded) == length, (len(padded), length)
    out = bytearray(blob[: start + 10] + padded.encode("latin1") + blob[start + 10 + length :])
    crc = struct.pack("<I", zlib.crc32(out[start : start + info.compress_size]))
    out[info.header_offset + 14 : info.header_offset + 18] = crc  # so only the claimed shape is wrong
    _central_entry(out, member)[16:20] = crc
    return bytes(out)


def _central_entry(out: bytearray, member: str) -> memoryview:
    """The central directory entry of `member` (46 fixed bytes), writable in place."""
    name = member.encode()
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        (name_len,) = struct.unpack("<H", out[at + 28 : at + 30])
        if bytes(out[at + 46 : at + 46 + name_len]) == name:
            return memoryview(out)[at : at + 46]
        at = out.find(b"PK\x01\x02", at + 4)
    raise AssertionError(f"{member} not in the central directory")


def zip_claims(blob: bytes, member: str, size: int) -> bytes:
    """An .npz whose central directory (what zipfile reads) says `member` is `size` bytes uncompressed."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        info = archive.getinfo(member)
    assert info.file_size < 0xFFFF_FFFF  # its size is in the central directory entry, not in a zip64 extra
    out = bytearray(blob)
    _central_entry(out, member)[24:28] = struct.pack("<I", size)
    return bytes(out)


@hostile("bounded-stats-npy-claims-8tb", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    """hard_counts' .npy header says [1e12, 8] int64 (8 TB); numpy would allocate that before reading."""
    blob = ws.stats.read_bytes()
    shape = ws.stats_arrays()["hard_counts"].shape
    ws.stats.write_bytes(npy_claims(blob, "hard_counts.npy", (10**12, *shape[1:])))


@hostile("bounded-stats-zip-claims-4gb", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    """A compressed archive whose hard_counts entry says it inflates to 4 GB."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **ws.stats_arrays())
    ws.stats.write_bytes(zip_claims(buffer.getvalue(), "hard_counts.npy", 0xFFFF_FFF0))


@hostile("bounded-stats-stored-entry-claims-more", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    """A stored (uncompressed) entry whose size says more than the bytes stored."""
    blob = ws.stats.read_bytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        size = archive.getinfo("hard_counts.npy").file_size
    ws.stats.write_bytes(zip_claims(blob, "hard_counts.npy", size * 1000))


# ---- lottery recipes (a resumed run reads DIR/recipe.json) -------------------------------------------------------
RECIPE_PARAMS = {"model": "m", "criterion": "usage-frequency", "data": "d"}
RECIPE_EDITS: dict[str, dict] = {
    "samples-a-string": {"profile_samples": "2"},
    "target-ratio-a-list": {"target_ratio": [0.25]},
    "model-null": {"model": None},
    "finetune-an-integer": {"finetune": 1},
    "rounds-a-float": {"rounds": 1.0},
    "data-list-of-numbers": {"data": [1, 2]},
    "seed-a-bool": {"seed": True},
}


def _recipe(params: dict, text: str | None = None) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        ws.out.mkdir()
        obj = {
            "schema": "moe-prune/lottery-recipe",
            "version": 1,
            "tool_version": "0",
            "params": params,
            "inputs": {},
            "schedule": {},
        }
        (ws.out / "recipe.json").write_text(text if text is not None else json.dumps(obj))

    return build


for _name, _edit in RECIPE_EDITS.items():
    hostile(f"bounded-recipe-{_name}", ("lottery",), "recipe.json")(_recipe({**RECIPE_PARAMS, **_edit}))
for _payload_name, _payload in PAYLOADS.items():
    hostile(f"bounded-recipe-{_payload_name}", ("lottery",), "recipe.json")(
        _recipe(RECIPE_PARAMS, inject(json.dumps({"schema": "moe-prune/lottery-recipe"}), _payload))
    )
