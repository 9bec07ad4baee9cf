"""Raw safetensors reading and writing, byte range by byte range.

Why not `safetensors.torch`: surgery only copies and slices along leading/last axes, which are
contiguous byte ranges; working on bytes keeps peak memory at one copy buffer, never
converts dtypes (FP8, MXFP4 blocks and scales pass through untouched) and runs at file-copy speed.
Tensors that are computed (merged experts) are `ComputedTensor`s: their bytes are produced only
when the writer reaches them, so at most the layer being merged is in memory.
Format: 8-byte little-endian header length, JSON header, then the data buffer.

One file over 300 lines: it is the format's one reader and one writer, which share the dtype table and the
header layout; a dozen modules import from it, so the byte format is defined exactly once.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from moe_prune.artifacts.common import parse_json
from moe_prune.errors import MoePruneError

COPY_CHUNK = 64 << 20
# safetensors refuses a header longer than this (MAX_HEADER_SIZE in its Rust crate, src/tensor.rs): decimal 100 MB,
# not 100 MiB, so a header both accept is one that every loader of the output accepts too.
MAX_HEADER = 100_000_000
# Every dtype safetensors 0.8 knows -> bits per element (F4/F6 are packed: a tensor must fill whole bytes).
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def rows(info: TensorInfo, start: int, stop: int, shape: tuple[int, ...]) -> TensorInfo:
    """Rows `start:stop` of `info` (axis 0, contiguous in the file), viewed as `shape`."""
    if not info.shape or not 0 <= start <= stop <= info.shape[0]:
        raise ValueError(f"{info.name} has shape {info.shape}: no rows {start}:{stop}")
    row = info.nbytes // info.shape[0]
    return replace(info, shape=shape, start=info.start + start * row, end=info.start + stop * row)


def _corrupt(path: Path, problem: str, part: str = "header") -> MoePruneError:
    """The error for a shard safetensors itself would refuse: the file, then what is wrong (and with which tensor)."""
    return MoePruneError(f"{path}: corrupt safetensors {part}: {problem}")


def _truncated(path: Path, problem: str) -> MoePruneError:
    return MoePruneError(f"{path}: truncated safetensors file ({problem})")


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Tensors and metadata of one .safetensors file, validated by safetensors' own rules.

    Every entry needs a known dtype, a shape of non-negative ints and a byte range of exactly
    prod(shape) x dtype size; the ranges must tile the data buffer from 0 to its last byte, with no
    gap, overlap or trailing bytes. Checked once here, so nothing downstream copies or reads a range
    that is not the tensor it names.
    """
    header_len, header, size = _read_raw_header(path)
    data_len = size - 8 - header_len
    metadata = _metadata(path, header.pop("__metadata__", None))
    tensors = [_entry(path, name, entry, 8 + header_len) for name, entry in header.items()]
    _check_tiling(path, tensors, 8 + header_len, data_len)
    return tensors, metadata


def _read_raw_header(path: Path) -> tuple[int, dict, int]:
    """(header length, parsed header object, file size); refuses what is not a JSON object of sane length."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise _truncated(path, f"{size} bytes, no header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_HEADER:
                raise _corrupt(path, f"length {header_len} is over the {MAX_HEADER} bytes safetensors allows")
            if header_len > size - 8:
                raise _truncated(path, f"header length {header_len} runs past the end of the file")
            raw = handle.read(header_len)
    except OSError as exc:
        raise MoePruneError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(path, f"not UTF-8 ({exc.reason} at byte {8 + exc.start})") from exc
    # A repeated key keeps its last entry, as in safetensors; the dropped entry's bytes then fail the tiling check.
    header = parse_json(text, f"{path}: corrupt safetensors header", "the header", limit=MAX_HEADER, duplicates=True)
    if not isinstance(header, dict):
        raise _corrupt(path, "not a JSON object")
    return header_len, header, size


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    """`__metadata__`: absent, null or a map of strings to strings."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    return metadata


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, entry: object, base: int) -> TensorInfo:
    """One header entry as a TensorInfo, its dtype, shape and size checked against each other."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _corrupt(path, f"tensor {name!r} needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _corrupt(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _corrupt(path, f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
    begin, end = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise _corrupt(path, f"tensor {name!r} ({dtype} x {shape}) does not fill a whole number of bytes")
    if end - begin != bits // 8:
        raise _corrupt(
            path, f"tensor {name!r} has {end - begin} bytes at {offsets}, but {dtype} x {shape} is {bits // 8} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), path, base + begin, base + end)


def _check_tiling(path: Path, tensors: list[TensorInfo], base: int, data_len: int) -> None:
    """The byte ranges, sorted, must cover the data buffer exactly: no gap, no overlap, nothing after."""
    position = 0
    for info in sorted(tensors, key=lambda t: (t.start, t.end)):
        if info.start - base != position:
            problem = "overlaps the tensor before it" if info.start - base < position else "leaves a gap before it"
            raise _corrupt(path, f"tensor {info.name!r} at data offset {info.start - base} {problem}")
        position = info.end - base
    if position > data_len:
        raise _truncated(path, f"the tensors need {position} data bytes, the file holds {data_len}")
    if position < data_len:
        raise _corrupt(path, f"{data_len - position} bytes of trailing data after the last tensor", "file")


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: name, dtype, shape and the source byte ranges to concatenate."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: Path
    ranges: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.ranges)


def _copy_range(src_fd: int, dst_fd: int, start: int, length: int) -> None:
    """Copy bytes between files, in the kernel where possible."""
    while length > 0:
        step = min(length, COPY_CHUNK)
        try:
            done = os.copy_file_range(src_fd, dst_fd, step, start)
        except (AttributeError, OSError):
            done = 0
        if done <= 0:
            data = os.pread(src_fd, step, start)
            if not data:
                raise MoePruneError(f"unexpected end of file while copying (fd {src_fd})")
            os.write(dst_fd, data)
            done = len(data)
        start += done
        length -= done


@dataclass(frozen=True)
class ComputedTensor:
    """A tensor to write whose bytes come from `produce()` when the writer reaches it (shape known up front)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    produce: Callable[[], bytes]
    source: None = None


AnyOutput = OutputTensor | ComputedTensor
Progress = Callable[[int], None]
# safetensors dtype name -> torch dtype, for the float tensors that can be read and computed on.
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# The stored parts of quantized tensors, read as they are (dequantized in checkpoint.quantized).
RAW_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U8": "uint8", "I8": "int8"}


def read_tensor(info: TensorInfo):  # -> torch.Tensor (torch imported lazily: plain surgery never needs it)
    """One tensor of a shard, read from its byte range into memory in its stored dtype.

    Float tensors and the raw parts of quantized ones (FP8 weights, MXFP4 U8 blocks and scales);
    turning those into float32 is `checkpoint.quantized.read_float`'s job.
    """
    import torch

    name = FLOAT_DTYPES.get(info.dtype) or RAW_DTYPES.get(info.dtype)
    if name is None:
        raise MoePruneError(f"{info.file}: {info.name} is {info.dtype}, which moe-prune cannot read as a tensor")
    with open(info.file, "rb") as handle:
        data = bytearray(os.pread(handle.fileno(), info.nbytes, info.start))
    if len(data) != info.nbytes:
        raise MoePruneError(f"{info.file}: truncated while reading {info.name}")
    dtype = getattr(torch, name)
    return torch.frombuffer(data, dtype=dtype).reshape(info.shape) if data else torch.zeros(info.shape, dtype=dtype)


def tensor_bytes(tensor) -> bytes:
    """Little-endian raw bytes of a torch tensor, as safetensors stores them."""
    import torch

    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def write_file(
    path: Path,
    tensors: Iterable[AnyOutput],
    metadata: dict[str, str] | None = None,
    progress: Progress | None = None,
) -> None:
    """Write a .safetensors file by streaming each tensor's source byte ranges into place.

    `progress(nbytes)` is called after each tensor, so callers can show a bar without this module knowing Rich.
    """
    tensors = list(tensors)
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        out.flush()
        dst = out.fileno()
        for src_path, group in _by_source(tensors):
            if src_path is None:
                for tensor in group:
                    _write_computed(dst, tensor)
                    if progress:
                        progress(tensor.nbytes)
                continue
            with open(src_path, "rb") as src:
                for tensor in group:
                    for start, end in tensor.ranges:
                        _copy_range(src.fileno(), dst, start, end - start)
                    if progress:
                        progress(tensor.nbytes)


def _write_computed(dst_fd: int, tensor: AnyOutput) -> None:
    """Write a computed tensor's bytes at the file position (same fd the byte copies advance)."""
    data = memoryview(tensor.produce())
    if len(data) != tensor.nbytes:
        raise AssertionError(f"{tensor.name}: produced {len(data)} bytes, planned {tensor.nbytes}")
    while data:
        data = data[os.write(dst_fd, data) :]


def _by_source(tensors: list[AnyOutput]) -> Iterator[tuple[Path | None, list[AnyOutput]]]:
    """Consecutive runs of tensors from the same source file (keeps write order intact)."""
    run: list[OutputTensor] = []
    for tensor in tensors:
        if run and run[-1].source != tensor.source:
            yield run[0].source, run
            run = []
        run.append(tensor)
    if run:
        yield run[0].source, run
