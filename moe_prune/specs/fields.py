"""One field of a stage spec: its default, its CLI twin, and whether it belongs to the run's fingerprint.

A spec is a frozen dataclass whose fields are made by `option()`; the metadata it attaches is all the CLI
generator (`cli/spec_options.py`) needs to write the typer option, and all `fingerprint()` needs to know
which fields decide the result. So the library signature, the `--help` options, the recorded step and the
resume fingerprint cannot drift apart: they are read off the same field.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import Field, dataclass, field
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from moe_prune.artifacts.common import is_int, json_type
from moe_prune.errors import MoePruneError

KEY = "moe_prune.cli"  # the key of a field's `Cli` in its metadata
# parse(value given on the command line, the flag it was given with) -> the field's value
Parse = Callable[[Any, str], Any]


class _Same:
    """The command line's default is the field's own (`Cli.default`)."""

    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()


@dataclass(frozen=True)
class Cli:
    """How a spec field appears on the command line (see `option`)."""

    help: str
    flags: tuple[str, ...] = ()  # e.g. ("--out", "-o"); () -> --field-name
    panel: str | None = None  # rich help panel
    type: Any = None  # the command line's type when it differs from the field's (e.g. str for "1M")
    default: Any = SAME  # the command line's default when it differs (e.g. "1M" for 1_000_000)
    parse: Parse | None = None  # command-line value -> field value (None: taken as is)
    affects_result: bool = True  # False: left out of the fingerprint (progress, output, trust, ...)
    argument: bool = False  # a positional argument, not an option
    extra: tuple[tuple[str, Any], ...] = ()  # further typer.Option keywords: min, max, metavar, show_default

    def flag(self, name: str) -> str:
        """The option's main flag, as error messages name it."""
        return self.flags[0].split("/")[0] if self.flags else "--" + name.replace("_", "-")


def option(
    default: Any,
    help: str,
    *flags: str,
    panel: str | None = None,
    cli_type: Any = None,
    cli_default: Any = SAME,
    parse: Parse | None = None,
    affects_result: bool = True,
    argument: bool = False,
    **extra: Any,
) -> Any:
    """A spec field with its CLI twin; `default=MISSING` makes the field required."""
    cli = Cli(help, flags, panel, cli_type, cli_default, parse, affects_result, argument, tuple(extra.items()))
    return field(default=default, metadata={KEY: cli})


def like(group: type, name: str, *, help: str | None = None, panel: str | None = None) -> Any:
    """Field `name` of `group` again (under another name or in another spec): its default and CLI twin reused."""
    source = next(f for f in dataclasses.fields(group) if f.name == name)
    changes = {key: value for key, value in (("help", help), ("panel", panel)) if value is not None}
    cli = dataclasses.replace(source.metadata[KEY], **changes)
    return field(default=source.default, metadata={KEY: cli})


def cli_of(spec: Any) -> list[tuple[Field[Any], Cli]]:
    """The fields of a spec (class or instance) that have a CLI twin, in declaration order."""
    return [(f, f.metadata[KEY]) for f in dataclasses.fields(spec) if KEY in f.metadata]


def check_complete(spec: Any) -> None:
    """Every field of the spec has its CLI twin (a field added without one would silently never be set)."""
    missing = [f.name for f in dataclasses.fields(spec) if KEY not in f.metadata]
    if missing:
        raise TypeError(f"{spec.__name__}: field(s) {', '.join(missing)} have no CLI twin (make them with option())")


def record(spec: Any) -> dict[str, Any]:
    """Every field, as it reads back from JSON (tuples become lists, paths strings): the recorded step."""
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


def fingerprint(spec: Any) -> dict[str, Any]:
    """The fields that decide the result (JSON-ready): what a resumed run must match."""
    kept = {f.name for f in dataclasses.fields(spec) if KEY not in f.metadata or f.metadata[KEY].affects_result}
    return {name: value for name, value in record(spec).items() if name in kept}


def from_record(cls: type, obj: Any, name: str, required: tuple[str, ...] = ()) -> Any:
    """A spec from its `record` (e.g. a hand-edited recipe): each field of its declared JSON type, one line else."""
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(obj, dict) or set(obj) - known or set(required) - set(obj):
        raise MoePruneError(f"{name}: malformed 'params' block (expected the fields {', '.join(sorted(known))})")
    hints = get_type_hints(cls)
    for key, value in obj.items():
        if not has_type(value, hints[key]):
            raise MoePruneError(f"{name}: params.{key} must be {describe_type(hints[key])}, not {shown(value)}")
    return cls(**{key: float(v) if hints[key] is float else v for key, v in obj.items()})


def has_type(value: Any, hint: Any) -> bool:
    """`value` (parsed JSON) fits the annotation `hint`: str, bool, int, float, None, list[str] and unions of them."""
    if get_origin(hint) in (Union, UnionType):
        return any(has_type(value, arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON writes 1.0 as 1 sometimes
    if hint is int:
        return is_int(value)
    return type(value) is hint


def shown(value: Any) -> str:
    """A wrong value in a message: its JSON type, and a short repr unless it is null."""
    return "null" if value is None else f"{json_type(value)} {value!r:.80}"


def describe_type(hint: Any) -> str:
    """An annotation in JSON's words, for messages."""
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(describe_type(arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {describe_type(get_args(hint)[0]).split(' ', 1)[1]}s"
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", type(None): "null"}[hint]
