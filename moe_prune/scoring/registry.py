"""The criterion registry: every criterion is one decorated function, listed by `moe-prune score --list`.

A criterion turns its inputs (statistics and/or checkpoint weights) into scores:
- `kind="expert"`: an `[L, E]` array, one score per expert; `min` drops the lowest first, `max` the highest.
- `kind="pair"`: `(values [L, E, E], usage [L, E])`; greedily the remaining pair with the min/max value
  is picked and its less used expert dropped (MC-Suite eqs. 8 and 10).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from moe_prune.errors import MoePruneError
from moe_prune.registry import Registry

if TYPE_CHECKING:
    from moe_prune.artifacts.identity import ModelIdentity
    from moe_prune.artifacts.stats import Stats
    from moe_prune.checkpoint.expert_weights import ExpertWeights

Direction = Literal["min", "max"]


@dataclass
class Inputs:
    """What criteria read: the model's identity, statistics (arrays `[L, E, ...]`), checkpoint weights, a seed."""

    identity: ModelIdentity
    stats: Stats | None
    weights: ExpertWeights | None
    seed: int = 0
    vocab_size: int | None = None

    def array(self, name: str) -> np.ndarray:
        assert self.stats is not None
        return np.asarray(self.stats.arrays[name], dtype=np.float64)

    @property
    def counts(self) -> list[int]:
        """Experts of each MoE layer (they differ in a ragged model)."""
        return [len(self.identity.original_ids[layer]) for layer in self.identity.moe_layers]

    @property
    def shape(self) -> tuple[int, int]:
        """(MoE layers, slots): the largest count; a ragged model's smaller layers are padded (see `real`)."""
        return len(self.identity.moe_layers), max(self.counts)

    def real(self) -> np.ndarray:
        """[L, E] bool: the slots that hold an expert (False on the padding of smaller layers)."""
        experts = self.shape[1]
        return np.arange(experts)[None, :] < np.array(self.counts)[:, None]


def stack_layers(rows: list[np.ndarray], experts: int) -> np.ndarray:
    """Per-layer `[E_l]` or `[E_l, E_l]` arrays as one `[L, E, ...]` array, zero-padded to `experts` slots
    (a ragged model's smaller layers; `Inputs.real()` says which slots are experts)."""
    padded = []
    for row in rows:
        missing = experts - row.shape[0]
        padded.append(np.pad(row, [(0, missing)] * row.ndim) if missing else row)
    return np.stack(padded)


@dataclass(frozen=True)
class Criterion:
    """One registered criterion: its function and what it needs."""

    name: str
    fn: Callable[[Inputs], Any]
    description: str
    kind: Literal["expert", "pair"] = "expert"
    direction: Direction = "min"  # the direction the papers recommend (or, unreported, the sensible one)
    stats: tuple[str, ...] = ()  # statistics fields it reads
    weights: bool = False  # reads checkpoint weights (needs --model)
    global_ok: bool = False  # scores comparable across layers, so `--global` is meaningful
    source: str = ""  # paper and equation

    def needs(self) -> str:
        parts = [*self.stats] + (["model weights"] if self.weights else [])
        return ", ".join(parts) or "-"


CRITERIA: Registry[Criterion] = Registry("criterion")


def evaluate(crit: Criterion, inputs: Inputs) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(scores [L, E], usage, pair values): run the criterion and check what it returned.

    Only the slots that hold experts are checked; a ragged model's padding may score anything and is ignored.
    """
    shape, real = inputs.shape, inputs.real()
    if crit.kind == "pair":
        values, usage = crit.fn(inputs)
        values, usage = np.asarray(values, dtype=np.float64), np.asarray(usage, dtype=np.float64)
        assert values.shape == (*shape, shape[1]) and usage.shape == shape, (values.shape, usage.shape)
        checked = values
    else:
        usage = values = None
        checked = np.asarray(crit.fn(inputs), dtype=np.float64)
        assert checked.shape == shape, (crit.name, checked.shape, shape)
    real_pairs = real[:, :, None] & real[:, None, :] if checked.ndim == 3 else real
    bad = np.argwhere(np.isnan(checked) & real_pairs)
    if bad.size:
        raise MoePruneError(
            f"criterion {crit.name!r} gave NaN scores (first at MoE layer index {bad[0][0]}); "
            "the statistics may be corrupt"
        )
    return (checked if values is None else usage), usage, values


def criterion(name: str, description: str, **fields: Any) -> Callable[[Callable[[Inputs], Any]], Callable]:
    """Register `fn` under `name`; the decorated function's docstring holds the formula."""

    def register(fn: Callable[[Inputs], Any]) -> Callable[[Inputs], Any]:
        CRITERIA.add(name, Criterion(name, fn, description, **fields))
        return fn

    return register


def get_criterion(name: str) -> Criterion:
    """The named criterion, or a one-line error with a suggestion and the list."""
    return CRITERIA.get_or_fail(name)


def all_criteria() -> list[Criterion]:
    return list(CRITERIA.values())
