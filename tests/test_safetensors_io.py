"""`read_header` accepts exactly the shards safetensors itself accepts (differential test against safe_open)."""

from __future__ import annotations

import json
import struct

import pytest
from safetensors import SafetensorError, safe_open

from moe_prune.checkpoint.safetensors_io import DTYPE_BITS, read_header
from moe_prune.errors import MoePruneError


def _u8(begin: int, end: int, shape: list | None = None, dtype: str = "U8") -> dict:
    return {"dtype": dtype, "shape": [end - begin] if shape is None else shape, "data_offsets": [begin, end]}


GOOD = {"a": _u8(0, 4), "b": _u8(4, 6)}

# name -> (header dict or raw header bytes, data buffer length)
SHARDS: dict[str, tuple[dict | bytes, int]] = {
    "good": (GOOD, 6),
    "good-unsorted-entries": ({"b": _u8(4, 6), "a": _u8(0, 4)}, 6),
    "good-empty-tensor": ({"z": _u8(0, 0, [0, 3]), **GOOD}, 6),
    "good-scalar": ({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, 4),
    "good-packed-f4": ({"p": _u8(0, 2, [2, 2], "F4")}, 2),
    "good-packed-f6": ({"p": _u8(0, 3, [4], "F6_E2M3")}, 3),
    "good-null-metadata": ({"__metadata__": None, **GOOD}, 6),
    "good-no-tensors": ({"__metadata__": {"format": "pt"}}, 0),
    "good-extra-field": ({"a": {**_u8(0, 6), "extra": 1}}, 6),
    "good-leading-space": (b' {"a": {"dtype": "U8", "shape": [6], "data_offsets": [0, 6]}}', 6),
    "overlap": ({"a": _u8(0, 4), "b": _u8(2, 6)}, 6),
    "duplicate-range": ({"a": _u8(0, 6), "b": _u8(0, 6)}, 6),
    "gap": ({"a": _u8(0, 2), "b": _u8(4, 6)}, 6),
    "not-from-zero": ({"a": _u8(2, 6)}, 6),
    "trailing-bytes": (GOOD, 9),
    "truncated-data": (GOOD, 5),
    "size-disagrees-with-shape": ({"a": _u8(0, 4, [3]), "b": _u8(4, 6)}, 6),
    "size-disagrees-with-dtype": ({"a": _u8(0, 4, [4], "F16"), "b": _u8(4, 6)}, 6),
    "packed-not-whole-bytes": ({"p": _u8(0, 2, [3], "F4")}, 2),
    "unknown-dtype": ({"a": _u8(0, 6, [6], "Q8")}, 6),
    "lowercase-dtype": ({"a": _u8(0, 6, [6], "u8")}, 6),
    "negative-dim": ({"a": _u8(0, 6, [-6])}, 6),
    "float-dim": ({"a": _u8(0, 6, [6.0])}, 6),
    "bool-dim": ({"a": _u8(0, 1, [True])}, 1),
    "shape-not-list": ({"a": _u8(0, 6, 6)}, 6),
    "three-offsets": ({"a": {"dtype": "U8", "shape": [6], "data_offsets": [0, 6, 6]}}, 6),
    "reversed-offsets": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [6, 0]}}, 6),
    "missing-shape": ({"a": {"dtype": "U8", "data_offsets": [0, 6]}}, 6),
    "entry-not-object": ({"a": 6}, 0),
    "metadata-not-strings": ({"__metadata__": {"format": 1}, **GOOD}, 6),
    "metadata-list": ({"__metadata__": [], **GOOD}, 6),
    "header-is-list": (b"[]", 0),
    "header-not-json": (b'{"a": ', 0),
    "header-not-utf8": (b'{"\xff": 1}', 0),
}


def _write(path, header: dict | bytes, data_len: int) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\x01" * data_len)


def _safetensors_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except SafetensorError:
        return False


@pytest.mark.parametrize("name", sorted(SHARDS))
def test_read_header_agrees_with_safetensors(tmp_path, name):
    path = tmp_path / "model.safetensors"
    _write(path, *SHARDS[name])
    accepts = _safetensors_accepts(path)
    assert accepts == name.startswith("good"), f"the case {name!r} is mislabelled"
    if accepts:
        read_header(path)
        return
    with pytest.raises(MoePruneError) as caught:
        read_header(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x02", "no header"),
        (struct.pack("<Q", 64) + b"{}", "runs past the end of the file"),
        (struct.pack("<Q", 100_000_001) + b"{}", "over the 100000000 bytes"),
    ],
    ids=["no-length", "length-past-end", "length-too-large"],
)
def test_bad_header_length(tmp_path, raw, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw)
    assert not _safetensors_accepts(path)
    with pytest.raises(MoePruneError, match=message):
        read_header(path)


def test_every_safetensors_dtype_is_known(tmp_path):
    """DTYPE_BITS lists safetensors' dtypes: each one's size, as safetensors computes it, matches."""
    for dtype, bits in DTYPE_BITS.items():
        path = tmp_path / f"{dtype}.safetensors"
        _write(path, {"t": _u8(0, bits, [8], dtype)}, bits)
        assert _safetensors_accepts(path), dtype
        assert read_header(path)[0][0].nbytes == bits


def test_errors_name_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    _write(path, {"a": _u8(0, 4), "experts.3.w1": _u8(2, 6)}, 6)
    with pytest.raises(MoePruneError, match=r"experts\.3\.w1.*overlaps"):
        read_header(path)
