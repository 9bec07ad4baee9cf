"""Shared reading/writing helpers for artifacts: JSON (files or `-` for stdin/stdout) and .npz errors.

Artifacts come from other people's checkpoints and pipes, so the one reader is strict: a key given
twice (which plain `json` silently resolves to the last one) and the non-standard NaN/Infinity
constants are refused, and the `require_*` helpers check types exactly (a bool is not an int, 1.0 is
not an expert id).
"""

from __future__ import annotations

import json
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError

# Reading a damaged .npz raises any of these (zip, zlib and numpy's own format errors).
NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error)


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


def parse_json(text: str, name: str, what: str) -> Any:
    """Parse strict JSON (no duplicate keys, no NaN/Infinity); errors name `name`."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise MoePruneError(f"{name}: {what} is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise MoePruneError(f"{name}: {what} is not valid JSON ({exc})") from exc


def read_json(source: str | Path, what: str) -> tuple[dict[str, Any], str]:
    """Parse a JSON object from a path or `-` (stdin); returns (object, name for messages)."""
    name = "<stdin>" if str(source) == "-" else str(source)
    try:
        text = sys.stdin.read() if str(source) == "-" else Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoePruneError(f"{name}: {what} file not found") from None
    except IsADirectoryError:
        raise MoePruneError(f"{name}: {what} is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise MoePruneError(f"{name}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise MoePruneError(f"{name}: cannot read {what} ({exc.strerror or exc})") from exc
    if not text.strip():
        raise MoePruneError(f"{name}: {what} is empty")
    obj = parse_json(text, name, what)
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
