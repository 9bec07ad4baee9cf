"""The one parser of byte sizes the user types (`--max-shard-size`, `--buffer-memory`), and of token counts.

Agrees with transformers' `convert_file_size_to_int` wherever both accept a size (so a size handed on
to `save_pretrained` means the same there): KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2,
and a lowercase `b` means bits (`5Gb` is 625 MB, as transformers reads it). Also accepts decimals and
plain byte counts, which transformers does not; callers hand transformers the parsed integer.
"""

from __future__ import annotations

import math
import re

from moe_prune.errors import MoePruneError

_SCALE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*(?:([KkMmGgTt])([iI])?)?([Bb])?\s*")


def parse_size(text: str | int, option: str = "size") -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, '5Gb' -> 625_000_000, '1000' -> 1000; positive only."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m or (m[3] and not m[2]):
            raise MoePruneError(f"{option} {text!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")
        prefix = (m[2] or "").upper()
        scale = _BINARY[prefix] if m[3] else _SCALE[prefix]
        bits = m[4] == "b" and not m[3]
        number = float(m[1]) * scale / (8 if bits else 1)
        if not math.isfinite(number):
            raise MoePruneError(f"{option} {text!r}: not a finite size")
        value = int(number)
    if value <= 0:
        raise MoePruneError(f"{option} {text!r}: must be a positive size")
    return value


def parse_tokens(text: str, option: str = "--tokens") -> int:
    """'1M' -> 1_000_000, '250k' -> 250_000, '4096' -> 4096 (a count of tokens, not bytes)."""
    units = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    cleaned = text.strip().upper().replace("_", "")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        return int(float(number) * units[unit])
    except (ValueError, OverflowError) as exc:  # not a number, or nan / inf
        raise MoePruneError(f"{option} {text!r}: expected a count such as 1M, 250k or 4096") from exc
