"""One registry for every plug-in kind (criteria, merge methods, layer rules, architectures).

A registry maps names to entries, refuses a name registered twice (a programming error, so ValueError)
and answers an unknown name with one user-facing line that suggests the closest name and lists the rest.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from moe_prune.errors import MoePruneError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """`name -> entry` for one plug-in kind; `kind` names it in messages (e.g. "merge method")."""

    def __init__(self, kind: str, hint: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.hint = hint  # appended to the unknown-name error, e.g. where to add one

    def add(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self[name] = entry
        return entry

    def decorator(self, name: str) -> Callable[[T], T]:
        """`@registry.decorator("name")` registers the decorated object under `name`."""
        return lambda entry: self.add(name, entry)

    def get_or_fail(self, name: str) -> T:
        """The entry called `name`, or one line with a suggestion and the list of names."""
        if name in self:
            return self[name]
        close = difflib.get_close_matches(name, list(self), n=1, cutoff=0.5)
        suggestion = f" (did you mean {close[0]!r}?)" if close else ""
        hint = f" {self.hint}" if self.hint else ""
        raise MoePruneError(f"unknown {self.kind} {name!r}{suggestion}; available: {', '.join(sorted(self))}.{hint}")

    def names(self) -> Iterator[str]:
        return iter(sorted(self))
