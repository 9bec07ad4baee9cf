"""`profile --for NAME[,NAME..]`: the statistics fields the named criteria and merge options read, and no others.

Data-driven: every criterion declares the fields it reads (`Criterion.stats`, `scoring.registry`), every merge
method its own (`merging.registry.NEEDS`, plus the selection counts every merge reads); `FOR_OPTIONS` names
the few options of `score`/`merge` that read a field of their own. The selection counts (`tokens`,
`hard_counts`) are always recorded: they cost one `bincount` per layer call and `profile`'s own usage table
reads them. A field that only an opt-in pass produces (gradients, every expert on every token) turns that pass
on, since the user asked for what needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_prune.errors import MoePruneError
from moe_prune.merging.registry import NEEDS, WEIGHTS
from moe_prune.registry import Registry
from moe_prune.runtime.expert_outputs import EXPERT_OUTPUT_FIELDS, REFIT_FIELDS
from moe_prune.runtime.gradients import GRADIENT_FIELDS
from moe_prune.scoring import all_criteria

ALWAYS = ("tokens", "hard_counts")
# Options of later commands that read a statistic of their own (name -> fields).
FOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "refit": REFIT_FIELDS,  # merge --refit
    "protect-super-experts": ("act_max",),  # score --protect-super-experts
    **{f"weights-{rule}": (field,) for rule, field in WEIGHTS.items()},  # merge --weights RULE
}


@dataclass(frozen=True)
class Wanted:
    """What `profile --for` records: the fields, and the opt-in passes they need."""

    names: tuple[str, ...]
    fields: frozenset[str]

    @property
    def gradients(self) -> bool:
        return any(f in GRADIENT_FIELDS for f in self.fields)

    @property
    def expert_outputs(self) -> bool:
        return any(f in EXPERT_OUTPUT_FIELDS for f in self.fields)

    @property
    def refit_stats(self) -> bool:
        return any(f in REFIT_FIELDS for f in self.fields)


def _table() -> Registry[tuple[str, ...]]:
    """Every name `--for` accepts -> the fields it reads."""
    table: Registry[tuple[str, ...]] = Registry("--for name", "Names: criteria (score --list), merge methods, options.")
    for crit in all_criteria():
        table.add(crit.name, crit.stats)
    for method, needs in NEEDS.items():
        table.add(method, ("hard_counts", *needs))
    for option, fields in FOR_OPTIONS.items():
        table.add(option, fields)
    return table


def wanted(names: Sequence[str]) -> Wanted:
    """The fields of `names` (criteria, merge methods, `FOR_OPTIONS`); an unknown name is one line."""
    table = _table()
    cleaned = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    if not cleaned:
        raise MoePruneError("--for: name at least one criterion or merge method (see `moe-prune score --list`)")
    fields = set(ALWAYS)
    for name in cleaned:
        fields.update(table.get_or_fail(name))
    return Wanted(cleaned, frozenset(fields))


def parse_for(text: str | None) -> Wanted | None:
    """`--for a,b` -> what to record; None (every forward statistic) when not given."""
    return None if text is None else wanted(text.split(","))
