"""Shared reading/writing helpers for JSON artifacts (files or `-` for stdin/stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError


def read_json(source: str | Path, what: str) -> tuple[dict[str, Any], str]:
    """Parse a JSON object from a path or `-` (stdin); returns (object, name for messages)."""
    name = "<stdin>" if str(source) == "-" else str(source)
    try:
        text = sys.stdin.read() if str(source) == "-" else Path(source).read_text()
    except FileNotFoundError:
        raise MoePruneError(f"{name}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MoePruneError(f"{name}: cannot read {what} ({exc})") from None
    if not text.strip():
        raise MoePruneError(f"{name}: {what} is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoePruneError(f"{name}: {what} is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise MoePruneError(f"{name}: {what} must be a JSON object")
    return obj, name


def check_header(obj: dict[str, Any], schema: str, version: int, name: str) -> None:
    """Refuse an artifact of another kind or a newer schema than this tool knows."""
    if obj.get("schema") != schema:
        raise MoePruneError(f"{name}: not a {schema} file (schema field is {obj.get('schema')!r})")
    found = obj.get("version")
    if not isinstance(found, int) or found < 1 or found > version:
        raise MoePruneError(f"{name}: {schema} version {found!r} is not supported (this tool reads 1..{version})")


def dump_json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=False) + "\n"
