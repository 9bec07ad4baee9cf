"""Raw safetensors reading and writing, byte range by byte range.

Why not `safetensors.torch`: surgery only copies and slices along leading/last axes, which are
contiguous byte ranges; working on bytes keeps peak memory at one copy buffer, never
converts dtypes (FP8, MXFP4 blocks and scales pass through untouched) and runs at file-copy speed.
Tensors that are computed (merged experts) are `ComputedTensor`s: their bytes are produced only
when the writer reaches them, so at most the layer being merged is in memory.
Format: 8-byte little-endian header length, JSON header, then the data buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from moe_prune.errors import MoePruneError

COPY_CHUNK = 64 << 20
_MAX_HEADER = 100 << 20


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


def read_header(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """Tensors and metadata of one .safetensors file; a one-line error if it is corrupt or truncated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise MoePruneError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, _MAX_HEADER):
                raise MoePruneError(f"{path}: corrupt or truncated safetensors header")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise MoePruneError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoePruneError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise MoePruneError(f"{path}: corrupt safetensors header")
    base = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors = []
    for name, entry in header.items():
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            info = TensorInfo(
                name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]), path, base + begin, base + stop
            )
        except (KeyError, TypeError, ValueError):
            raise MoePruneError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if info.end > size or info.start > info.end:
            raise MoePruneError(f"{path}: truncated safetensors file ({name!r} ends past the end of the file)")
        tensors.append(info)
    return tensors, metadata


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


def read_tensor(info: TensorInfo):  # -> torch.Tensor (torch imported lazily: plain surgery never needs it)
    """One float tensor of a shard, read from its byte range into memory."""
    import torch

    if info.dtype not in FLOAT_DTYPES:
        raise MoePruneError(f"{info.file}: {info.name} is {info.dtype}, not a float tensor")
    with open(info.file, "rb") as handle:
        data = bytearray(os.pread(handle.fileno(), info.nbytes, info.start))
    if len(data) != info.nbytes:
        raise MoePruneError(f"{info.file}: truncated while reading {info.name}")
    dtype = getattr(torch, FLOAT_DTYPES[info.dtype])
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
