"""One data plan: the `--data` values parsed once, the budget shared among them once, and one loader of windows.

Every stage that reads `--data` (profile, finetune, lottery through both, allocate and sweep's searches
through `stages.allocate_data`, `merge --refit` through `stages.calibration`) makes a `DataPlan` and loads
its windows with `load_windows`: the same values, budget and window settings give the same windows (the
same `artifacts.provenance.hash_tokens`) in every stage. Parsing and sharing are `runtime.shares`, reading
and mixing `runtime.sources`.

Sources whose name starts with a registered prefix (`task:NAME`, registered by `stages.tasks`) are read by
that prefix's reader (`runtime.readers`, free of torch so that registering costs the CLI nothing); a stage
that does not read them refuses them in one line (`refuse_prefixed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from moe_prune.runtime.chat import render
from moe_prune.runtime.data import fixed_chunks, token_stream
from moe_prune.runtime.readers import READERS, Reading, prefixed
from moe_prune.runtime.readers import refuse_prefixed as refuse_prefixed
from moe_prune.runtime.readers import register_reader as register_reader
from moe_prune.runtime.shares import SourceSpec, allocate, parse_sources
from moe_prune.runtime.sources import CHARS_PER_TOKEN_BOUND, Mix, SourceData, Taken, mix, read_source

POOL_FACTOR = 4  # profile: windows are drawn from at most this many times the tokens needed
BUDGET = "--samples x --seq-len"  # profile's budget, as errors name it


@dataclass(frozen=True)
class DataPlan:
    """Parsed sources, each one's whole tokens of the budget (allocated once), and how windows are cut.

    `unit`: window length (the total stays a multiple of it); `seed`: windows drawn with it from up to `pool`
    x each source's tokens (None: each source's first tokens); `whole`: one source without a share keeps
    every whole window of its stream (finetune's one-source read, `training.text`), never cut at the budget.
    """

    specs: tuple[SourceSpec, ...]
    budget: int
    tokens: tuple[int, ...]
    what: str = "the token budget"
    unit: int = 1
    seed: int | None = None
    pool: int = 1
    reading: Reading = field(default_factory=Reading)
    whole: bool = False

    @property
    def given(self) -> str | list[str]:
        """`--data` as given: one value, or the list of a mix (what provenance and recipes record)."""
        return self.specs[0].given if len(self.specs) == 1 else [s.given for s in self.specs]

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(s.source for s in self.specs)

    @property
    def is_mix(self) -> bool:
        """Several sources, or one with a share or token count."""
        return len(self.specs) > 1 or bool(self.specs[0].suffix)

    def rebudget(self, budget: int, unit: int | None = None) -> DataPlan:
        """The same parsed sources with their shares of another budget (a clipped seq-len, a finetune round)."""
        if budget == self.budget and unit in (None, self.unit):
            return self
        tokens = tuple(allocate(self.specs, budget, self.what))
        return replace(self, budget=budget, tokens=tokens, unit=self.unit if unit is None else unit)


DataLike = str | Path | SourceSpec | DataPlan | Sequence[str | Path | SourceSpec]


def parse_data(data: DataLike, option: str = "--data") -> tuple[SourceSpec, ...]:
    """The parsed sources of `data`: values as typed are parsed (once), parsed ones and a plan's are reused."""
    if isinstance(data, DataPlan):
        return data.specs
    values = [data] if isinstance(data, (str, Path, SourceSpec)) else list(data)
    return tuple(parse_sources([v if isinstance(v, SourceSpec) else str(v) for v in values], option))


def plan_data(
    data: DataLike,
    budget: int,
    *,
    what: str = "the token budget",
    unit: int = 1,
    seed: int | None = None,
    pool: int = 1,
    reading: Reading | None = None,
    whole: bool = False,
) -> DataPlan:
    """`data` (values or parsed sources) planned for `budget` tokens: parsed and shared once, here."""
    specs = parse_data(data)
    tokens = tuple(allocate(specs, budget, what))
    return DataPlan(specs, budget, tokens, what, unit, seed, pool, reading or Reading(), whole)


def calibration_plan(data: DataLike, samples: int, seq_len: int, seed: int, reading: Reading) -> DataPlan:
    """profile's plan (also allocate's and merge --refit's re-reading): `samples` windows of `seq_len` tokens
    drawn with `seed` from up to POOL_FACTOR times each source's share."""
    return plan_data(data, samples * seq_len, what=BUDGET, unit=seq_len, seed=seed, pool=POOL_FACTOR, reading=reading)


def read_plan(plan: DataPlan) -> list[SourceData]:
    """Every source's documents, read up to what its share can need (registered prefixes by their reader)."""
    out = []
    for spec, n in zip(plan.specs, plan.tokens, strict=True):
        max_chars = plan.pool * max(n, 1) * CHARS_PER_TOKEN_BOUND
        prefix = prefixed(spec) if plan.reading.prefixed else None
        if prefix is not None:
            out.append(READERS[prefix](spec, max_chars, plan.reading))
        else:
            r = plan.reading
            out.append(read_source(spec, max_chars, r.text_field, r.split, r.split_on))
    return out


@dataclass
class Windows:
    """The plan's mixed stream, its [N, unit] windows, and what the user should know about them."""

    mix: Mix
    windows: torch.Tensor
    warnings: list[str]


def load_windows(plan: DataPlan, tokenizer: Any, sources: list[SourceData] | None = None) -> Windows:
    """The one loader: the plan's windows (`sources` when already read by `read_plan`, e.g. before the model)."""
    sources = read_plan(plan) if sources is None else sources
    if plan.whole and not plan.is_mix:
        return _whole(plan, sources[0], tokenizer)
    mixed = mix(sources, tokenizer, plan.tokens, unit=plan.unit, seed=plan.seed, pool=plan.pool)
    return Windows(mixed, fixed_chunks(mixed.ids, plan.unit, source=mixed.label), list(mixed.warnings))


def _whole(plan: DataPlan, data: SourceData, tokenizer: Any) -> Windows:
    """One source's stream of at least the budget, every whole window kept (finetune's one-source read)."""
    source = data.spec.source
    ids = token_stream(render(data.documents, tokenizer, source), tokenizer, plan.budget)
    windows = fixed_chunks(ids, plan.unit, source=source)
    return Windows(Mix(ids, [Taken(data, plan.budget, ids.numel(), 0)], []), windows, [])


def load_calibration(plan: DataPlan, tokenizer: Any, seq_len: int, sources: list[SourceData] | None = None) -> Windows:
    """A calibration plan's windows at the model's `seq_len` (its `unit` clipped to the context), with the
    warnings profile gives: the length clipped, fewer windows than the samples asked."""
    samples = plan.budget // plan.unit
    warnings = []
    if seq_len < plan.unit:
        warnings.append(f"sequence length {plan.unit} exceeds the model's context; using {seq_len}")
    loaded = load_windows(plan.rebudget(samples * seq_len, seq_len), tokenizer, sources)
    warnings += loaded.warnings
    if len(loaded.windows) < samples:
        warnings.append(
            f"{loaded.mix.label}: holds only {len(loaded.windows)} sequences of {seq_len} tokens ({samples} asked)"
        )
    return Windows(loaded.mix, loaded.windows, warnings)
