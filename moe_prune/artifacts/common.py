"""Shared reading/writing helpers for artifacts: JSON (files or `-` for stdin/stdout); .npz in `artifacts.npz`.

Artifacts come from other people's checkpoints and pipes, so the one reader is strict: a key given
twice (which plain `json` silently resolves to the last one) and the non-standard NaN/Infinity
constants are refused, and the `require_*` helpers check types exactly (a bool is not an int, 1.0 is
not an expert id). It is also bounded, so that no input can reach a crash of the `json` module or
of code walking the result: files are read up to a byte cap (a link to /dev/zero ends), nesting
deeper than `MAX_JSON_DEPTH`, integers longer than `MAX_INT_DIGITS` digits and numbers that
overflow a float are refused. Every JSON moe-prune reads (configs, indexes, safetensors headers,
artifacts, recipes, data records) goes through `parse_json`. Only regular files are opened (`open_regular`):
a named pipe nobody writes to would block a plain open() forever.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from moe_prune.errors import MoePruneError

# Larger JSON files are refused before parsing: configs, indexes, masks, manifests and recipes of
# the largest checkpoints are a few MB. Safetensors headers have their own cap (checkpoint.safetensors_io).
MAX_JSON_BYTES = 64 << 20
# Deeper nesting is refused: nothing moe-prune reads nests past ~6 levels, and `json` itself fails
# with RecursionError near 1,000.
MAX_JSON_DEPTH = 64
# Longer integers are refused (Python refuses 4,300 digits with a ValueError); 2**64 has 20 digits.
MAX_INT_DIGITS = 100


def open_regular(path: str | Path, name: str, what: str) -> BinaryIO:
    """`path` opened for reading in binary, refused in one line unless it is a regular file.

    A named pipe nobody writes to blocks a plain open() forever, and a device (a link to /dev/zero) never
    ends: the file is opened without blocking and its type checked on the open descriptor, before any read.
    A folder raises IsADirectoryError and a missing file FileNotFoundError, for the caller to word.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise MoePruneError(f"{name}: {what} is not a regular file (a pipe, socket or device); refusing to read it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def describe(exc: BaseException) -> str:
    """Type and first line of an exception's message, for one-line errors (chain the exception for the rest)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class _DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(f"key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A number that could exceed the bounds: more digits than MAX_INT_DIGITS in a row, or an exponent of
# 3+ digits (a float overflows only past e308 or with 309+ digits). Two searches: 4x faster than one alternation.
_LONG_NUMBER = (re.compile(rf"[0-9]{{{MAX_INT_DIGITS + 1}}}"), re.compile("[eE][+-]?[0-9]{3}"))


class _OutOfBounds(ValueError):
    """Valid JSON that moe-prune refuses to hold: a number too long or too large."""


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _OutOfBounds(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _OutOfBounds(f"the number {text[:40]}, beyond the range of a float")
    return value


def _too_deep(obj: Any) -> bool:
    """Nesting of lists and objects deeper than `MAX_JSON_DEPTH`, found level by level (no recursion)."""
    level = [obj] if isinstance(obj, (dict, list)) else []
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for value in level
            for child in (value.values() if isinstance(value, dict) else value)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return True


def parse_json(text: str, name: str, what: str, *, limit: int = MAX_JSON_BYTES, duplicates: bool = False) -> Any:
    """Parse strict, bounded JSON; every way it can fail is a one-line error naming `name`.

    Refused: text longer than `limit` characters, a key given twice in one object (unless
    `duplicates`: the last one wins, as safetensors does), NaN/Infinity, nesting deeper than
    `MAX_JSON_DEPTH`, integers longer than `MAX_INT_DIGITS` digits and numbers beyond a float.
    """
    if len(text) > limit:
        raise MoePruneError(f"{name}: {what} is longer than the {limit} characters moe-prune reads")
    # The number hooks cost a Python call per number (a large safetensors header parses 4x slower): they run only
    # when the text holds a run of digits or an exponent long enough to need them.
    long_numbers = any(pattern.search(text) for pattern in _LONG_NUMBER)
    numbers = {"parse_int": _bounded_int, "parse_float": _finite_float} if long_numbers else {}
    try:
        obj = json.loads(
            text,
            object_pairs_hook=None if duplicates else _unique_keys,  # None: the last one wins
            parse_constant=_no_constant,
            **numbers,
        )
    except RecursionError as exc:
        raise MoePruneError(f"{name}: {what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)") from exc
    except _OutOfBounds as exc:
        raise MoePruneError(f"{name}: {what} holds {exc}") from exc
    except ValueError as exc:  # JSONDecodeError is a ValueError, as are the other hooks' refusals
        raise MoePruneError(f"{name}: {what} is not valid JSON ({_parse_error(exc)})") from exc
    if _too_deep(obj):
        raise MoePruneError(f"{name}: {what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return obj


def _parse_error(exc: ValueError) -> str:
    """The first line of a parse error, shortened (a hook's message may quote a long number)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def read_capped(source: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> tuple[bytes, str]:
    """At most `limit` bytes of a file or `-` (stdin): (bytes, name for messages); a longer input is refused.

    Reads with a cap instead of trusting the size the file system reports: /dev/zero, a pipe or a
    file that grows would otherwise be read until memory runs out.
    """
    name = "<stdin>" if str(source) == "-" else str(source)
    try:
        if str(source) == "-":
            blob = sys.stdin.buffer.read(limit + 1) if hasattr(sys.stdin, "buffer") else sys.stdin.read(limit + 1)
        else:
            with open_regular(source, name, what) as handle:
                blob = handle.read(limit + 1)
    except FileNotFoundError as exc:
        raise MoePruneError(f"{name}: {what} file not found") from exc
    except IsADirectoryError as exc:
        raise MoePruneError(f"{name}: {what} is a folder, not a file") from exc
    except OSError as exc:
        raise MoePruneError(f"{name}: cannot read {what} ({exc.strerror or exc})") from exc
    if isinstance(blob, str):
        blob = blob.encode("utf-8", "surrogatepass")
    if len(blob) > limit:
        raise MoePruneError(f"{name}: {what} is larger than the {limit} bytes moe-prune reads")
    return blob, name


def decode_utf8(blob: bytes, name: str, what: str) -> str:
    """Bytes as UTF-8 text, or a one-line error naming the file and the first bad byte."""
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoePruneError(f"{name}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def read_json(source: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> tuple[dict[str, Any], str]:
    """Parse a JSON object from a path or `-` (stdin), read with a byte cap; returns (object, name for messages)."""
    blob, name = read_capped(source, what, limit)
    text = decode_utf8(blob, name, what)
    if not text.strip():
        raise MoePruneError(f"{name}: {what} is empty")
    obj = parse_json(text, name, what, limit=limit)
    if not isinstance(obj, dict):
        raise MoePruneError(f"{name}: {what} must be a JSON object")
    return obj, name


def check_header(obj: dict[str, Any], schema: str, version: int, name: str) -> None:
    """Refuse an artifact of another kind or a newer schema than this tool knows."""
    if obj.get("schema") != schema:
        raise MoePruneError(f"{name}: not a {schema} file (schema field is {obj.get('schema')!r})")
    found = obj.get("version")
    if not is_int(found) or found < 1 or found > version:
        raise MoePruneError(f"{name}: {schema} version {found!r} is not supported (this tool reads 1..{version})")


def is_int(value: Any) -> bool:
    """A JSON integer: not a bool, not a float such as 1.0, not a numeric string."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_int(value: Any, name: str, where: str, minimum: int | None = None) -> int:
    """`value` as an int, or a one-line error naming the file and the field."""
    if not is_int(value):
        raise MoePruneError(f"{name}: {where} must be an integer, not {json_type(value)} {value!r}")
    if minimum is not None and value < minimum:
        raise MoePruneError(f"{name}: {where} must be at least {minimum}, not {value}")
    return value


def require_layer_key(key: str, name: str, where: str) -> int:
    """A layer key as written by this tool: the canonical decimal form of a non-negative int ('3', not '03' or ' 3')."""
    if not (key.isascii() and key.isdigit()) or str(int(key)) != key:
        raise MoePruneError(f"{name}: {where} key {key!r} is not a layer number")
    return int(key)


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}


def json_type(value: Any) -> str:
    """How JSON calls the type of `value`, for messages."""
    if value is None:
        return "null"
    return _JSON_TYPES.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def require_type(value: Any, kind: type, name: str, where: str) -> Any:
    """`value` if it is a `kind` (dict, list or str), else a one-line error naming the file and the field."""
    if not isinstance(value, kind):
        raise MoePruneError(f"{name}: {where} must be {_JSON_TYPES[kind]}, not {json_type(value)}")
    return value


def dump_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"


def first_difference(saved: Any, current: Any, path: str = "") -> str | None:
    """Dotted path of the first field that differs, with both values (None when equal): fingerprints of runs."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            found = first_difference(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if saved == current else f"{path} ({saved!r} there, {current!r} now)"
