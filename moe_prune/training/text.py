"""`finetune --format text` rows: chunks of --seq-len tokens from one source, or from a mix of sources by share.

One source without a share is read as finetune has always read it: its documents up to
CHARS_PER_TOKEN_BOUND characters per budgeted token, tokenized into one stream (documents joined by EOS)
until at least the budget is reached, and every whole chunk of that stream kept (a few more tokens than
the budget; the run's seeded batches draw from them). A document longer than `runtime.data.PIECE_CHARS`
(a .txt file is one) is tokenized piece by piece and stops at exactly the budget (issue #19: tokenizing
all of a .txt file's characters cost memory in proportion to the text). One source needs no mixing, and
sending it through the mix would cut the stream at exactly the budget: fewer rows, another batch order,
so the same command would train another model than the one measured before mixes existed (the README's
tables).

A mix (several `--data` values, or one with a share) goes through the mixer (`runtime.sources.mix`): each source
gives the FIRST tokens of its share (no seed: like one source, a file is read from its start) of the
tokens the run trains, i.e. --tokens in whole optimizer steps; the sources follow each other and the
stream is cut into chunks. So every chunk trains exactly once, and the tokens that the provenance gives
for a source are the tokens trained on it. A source short of its share shrinks every share alike (the
mix warns) and the total stays whole chunks; the run then repeats its data (finetune warns about epochs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moe_prune.runtime.data_plan import DataPlan, Reading, load_windows, plan_data
from moe_prune.runtime.shares import SourceSpec
from moe_prune.training.batches import Sequences


@dataclass
class Rows:
    """Rows of a run, what the user should know about them, and (text) every source with its share and tokens."""

    sequences: Sequences
    warnings: list[str]
    sources: list[dict[str, Any]] | None = None  # `Mix.provenance()` rows; None for prompt/response records


def is_mix(specs: Sequence[SourceSpec]) -> bool:
    """Several sources, or one with a share or token count: what goes through the mixer."""
    return len(specs) > 1 or bool(specs[0].suffix)


def text_plan(
    specs: Sequence[SourceSpec],
    seq_len: int,
    budget: int,
    *,
    trained: int | None = None,
    text_field: str = "text",
    split_on: str = "none",
) -> DataPlan:
    """finetune's data plan: one source for a budget of `budget` tokens (--tokens), every whole chunk of its
    stream kept, or a mix of exactly `trained` tokens (the tokens the run trains; default `budget`)."""
    reading = Reading(text_field=text_field, split_on=split_on)
    if is_mix(specs):
        total = budget if trained is None else trained
        return plan_data(specs, total, what="--tokens in whole optimizer steps", unit=seq_len, reading=reading)
    return plan_data(specs, budget, unit=seq_len, reading=reading, whole=True)


def text_rows(
    specs: Sequence[SourceSpec],
    tokenizer: Any,
    seq_len: int,
    budget: int,
    *,
    trained: int | None = None,
    text_field: str = "text",
    split_on: str = "none",
) -> Rows:
    """Chunks of `seq_len` tokens of `text_plan`'s data (see the module docstring)."""
    plan = text_plan(specs, seq_len, budget, trained=trained, text_field=text_field, split_on=split_on)
    loaded = load_windows(plan, tokenizer)
    return Rows(Sequences(loaded.windows), loaded.warnings, loaded.mix.provenance(0, loaded.windows.numel()))


__all__ = ["Rows", "is_mix", "text_plan", "text_rows"]
