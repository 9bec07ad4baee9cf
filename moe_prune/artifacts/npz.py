"""Reading .npz archives (statistics, resumable state) by the sizes their headers claim, before any array is read.

numpy allocates what a member's .npy header claims and a compressed member inflates to whatever its zip entry
says; `open_npz` checks both against the file (`MAX_NPZ_INFLATION` beyond it at most) and opens only regular
files (`artifacts.common.open_regular`). Split from `artifacts.common` (the JSON reader) by job.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from moe_prune.artifacts.common import open_regular
from moe_prune.errors import MoePruneError

# Reading a damaged .npz raises any of these (zip, zlib and numpy's own format errors).
NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)
# What the members of an .npz may expand to beyond the archive's own size. Stored members (np.savez,
# what moe-prune writes) are bounded by the file itself; compressed ones could inflate ~1000-fold.
MAX_NPZ_INFLATION = 1 << 30


def open_npz(path: Path, name: str) -> np.lib.npyio.NpzFile:
    """`np.load` of an .npz archive whose members' claimed sizes were checked before anything is read.

    numpy allocates the array a member's .npy header claims (8 TB, say) before reading its bytes,
    and a compressed member inflates to whatever its zip entry says: both are refused here, from
    the zip central directory and the .npy headers, in one line naming `name`. A plain .npy file
    is refused unread (np.load would read it whole). Damaged archives raise `NPZ_ERRORS` for the
    caller to word.
    """
    handle = open_regular(path, name, "archive")
    try:
        if handle.read(6) == b"\x93NUMPY":
            raise MoePruneError(f"{name}: not an .npz archive (a single .npy array)")
        handle.seek(0)
        data = np.load(handle, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a pickle is refused by np.load itself
            raise MoePruneError(f"{name}: not an .npz archive")
    except BaseException:
        handle.close()
        raise
    data.fid = handle  # closed with the archive (np.load leaves a file object it was given open)
    try:
        _check_npz_claims(data.zip, os.fstat(handle.fileno()).st_size, name)
    except BaseException:
        data.close()
        raise
    return data


def _check_npz_claims(archive: zipfile.ZipFile, size: int, name: str) -> None:
    """Every member's sizes agree with each other and all fit in the file plus `MAX_NPZ_INFLATION`."""
    budget, total = size + MAX_NPZ_INFLATION, 0
    for info in archive.infolist():
        field = info.filename.removesuffix(".npy")
        total += info.file_size
        if total > budget:
            raise MoePruneError(
                f"{name}: field {field} expands the archive to over {budget} bytes ({size} on disk); "
                f"compressed archives may add at most {MAX_NPZ_INFLATION} bytes (np.savez writes uncompressed ones)"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise MoePruneError(
                f"{name}: field {field} claims {info.file_size} bytes but stores {info.compress_size}, uncompressed"
            )
        with archive.open(info) as member:
            header = _npy_header(member, field, name)
        if header is None or header[1].hasobject:
            continue  # bytes, not an array (counted above), or a pickle, which np.load refuses unread
        shape, dtype, length = header
        claimed = length + math.prod(shape) * dtype.itemsize
        if claimed != info.file_size:
            raise MoePruneError(
                f"{name}: field {field} claims shape {shape} of {dtype} ({claimed} bytes with its header), "
                f"but the archive holds {info.file_size} bytes for it"
            )


def _npy_header(member: Any, field: str, name: str) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """(shape, dtype, header length) from the .npy header at the start of `member`; None if it is no .npy."""
    if member.read(6) != b"\x93NUMPY":
        return None
    member.seek(0)
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0)):
        raise MoePruneError(f"{name}: field {field} is in .npy format version {version}, not 1.0 or 2.0")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(member)
    return shape, dtype, member.tell()


def claimed_shapes(data: np.lib.npyio.NpzFile, name: str) -> dict[str, tuple[int, ...]]:
    """Shape each array member's .npy header claims, by field name, read without reading the arrays."""
    shapes = {}
    for info in data.zip.infolist():
        field = info.filename.removesuffix(".npy")
        with data.zip.open(info) as member:
            header = _npy_header(member, field, name)
        if header is not None:
            shapes[field] = header[0]
    return shapes
