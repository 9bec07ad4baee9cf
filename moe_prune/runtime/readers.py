"""How a data plan's sources are read, and the readers of prefixed sources (`task:NAME`), registered by name.

Kept free of torch and of the readers themselves: `stages.tasks` registers its reader at import, and the
CLI imports that module to name `task:` without loading torch (`runtime.data_plan` does the reading).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_prune.errors import MoePruneError

if TYPE_CHECKING:
    from moe_prune.runtime.shares import SourceSpec
    from moe_prune.runtime.sources import SourceData


@dataclass(frozen=True)
class Reading:
    """How each source is read: a structured file's or hub dataset's field and split, how .txt files are cut
    into documents, and (registered readers, e.g. tasks) the user's task folder and the code-trust decision."""

    text_field: str = "text"
    split: str = "train"
    split_on: str = "none"
    include_path: Path | None = None
    trust_remote_code: bool = False
    prefixed: bool = False  # registered prefixes (task:NAME) read by their reader; else names like any other


PrefixReader = Callable[["SourceSpec", int, Reading], "SourceData"]  # (spec, max_chars, reading) -> documents
READERS: dict[str, PrefixReader] = {}  # source prefix -> its reader (`register_reader`)


def register_reader(prefix: str) -> Callable[[PrefixReader], PrefixReader]:
    """Sources named `prefix...` are read by the decorated function instead of as files or hub datasets."""

    def add(reader: PrefixReader) -> PrefixReader:
        READERS[prefix] = reader
        return reader

    return add


def prefixed(spec: SourceSpec) -> str | None:
    """The registered prefix `spec`'s source starts with, if any."""
    return next((p for p in READERS if spec.source.startswith(p)), None)


def refuse_prefixed(specs: Sequence[SourceSpec], stage: str) -> None:
    """A stage that reads no registered source (tasks are profile's) refuses one in one line."""
    for spec in specs:
        prefix = prefixed(spec)
        if prefix is not None:
            raise MoePruneError(f"--data {prefix}NAME: {stage} reads files and hub datasets (profile reads tasks)")
