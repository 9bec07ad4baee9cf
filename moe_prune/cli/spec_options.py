"""A command's options generated from its stage spec (`moe_prune.specs`): one typer option per spec field.

`@takes_spec(Spec, "settings")` replaces the command function's `settings` parameter by one parameter per
field of `Spec` (name, type, default, flags, help and panel from the field's `Cli` metadata; typer reads
them from the function's `__signature__`), and calls the function with the spec built from what was
given. With `unset=True` the options default to None and the function gets only the fields the user
passed, as a dict (lottery: a recipe sets every field, so a passed one must be told apart from a default).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_type_hints

import typer

from moe_prune.specs.fields import SAME, Cli, check_complete, cli_of

F = TypeVar("F", bound=Callable[..., Any])


def _is_flag(cli: Cli, kind: Any) -> bool:
    """A yes/no flag named once (`--gradients`): passed or not, never None."""
    return kind is bool and not any("/" in flag for flag in cli.flags)


def _help(cli: Cli, default: Any, unset: bool, flag: bool) -> str:
    """The option's help; an `unset` option says the default it stands for, unless its help already does."""
    if not unset or flag or default in (None, dataclasses.MISSING) or "(default" in cli.help:
        return cli.help
    return f"{cli.help.rstrip('.')} (default: {default})."


def parameter(field: dataclasses.Field[Any], cli: Cli, hint: Any, unset: bool) -> inspect.Parameter:
    """The typer parameter of one spec field."""
    kind = hint if cli.type is None else cli.type
    default = field.default if cli.default is SAME else cli.default
    flag = _is_flag(cli, kind)
    value = (False if flag else None) if unset or default is dataclasses.MISSING else default
    if value is None and kind is not Any:
        kind = kind | None
    maker = typer.Argument if cli.argument else typer.Option
    decls = () if cli.argument else cli.flags
    info = maker(*decls, help=_help(cli, default, unset, flag), rich_help_panel=cli.panel, **dict(cli.extra))
    keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Parameter(field.name, keyword, default=value, annotation=Annotated[kind, info])


def parameters(spec: type, unset: bool = False) -> list[inspect.Parameter]:
    """The typer parameters of every field of `spec` that has a CLI twin, in declaration order."""
    hints = get_type_hints(spec)
    return [parameter(field, cli, hints[field.name], unset) for field, cli in cli_of(spec)]


def build(spec: type, values: dict[str, Any]) -> Any:
    """The spec from the command line's values: each parsed; one not given (None) keeps the field's default."""
    return spec(**given(spec, values))


def given(spec: type, values: dict[str, Any]) -> dict[str, Any]:
    """The fields the command line set, parsed: None, or a yes/no flag not passed, sets nothing (the default)."""
    hints = get_type_hints(spec)
    out: dict[str, Any] = {}
    for field, cli in cli_of(spec):
        value = values[field.name]
        kind = hints[field.name] if cli.type is None else cli.type
        if value is None or (_is_flag(cli, kind) and value is False):
            continue
        out[field.name] = cli.parse(value, cli.flag(field.name)) if cli.parse is not None else value
    return out


def takes_spec(spec: type, into: str, *, unset: bool = False) -> Callable[[F], F]:
    """Replace parameter `into` of the command by `spec`'s options; call it with the spec (or, `unset`, the dict
    of the fields given)."""

    check_complete(spec)  # a field without its CLI twin could never be set from the command line

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        generated = parameters(spec, unset)
        names = [p.name for p in generated]
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            params.extend([p.replace(kind=param.kind) for p in generated] if param.name == into else [param])

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            kwargs[into] = given(spec, values) if unset else build(spec, values)
            return fn(**kwargs)

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": signature.return_annotation}
        return command  # type: ignore[return-value]

    return decorate
