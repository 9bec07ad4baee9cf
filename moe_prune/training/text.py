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

A mix (several `--data` values, or one with a share) goes through `runtime.sources.load_mix`: each source
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

from moe_prune.runtime.chat import render
from moe_prune.runtime.data import fixed_chunks, token_stream
from moe_prune.runtime.sources import CHARS_PER_TOKEN_BOUND, Mix, SourceSpec, Taken, load_mix, read_source
from moe_prune.training.batches import Sequences


@dataclass
class Rows:
    """Rows of a run, what the user should know about them, and (text) every source with its share and tokens."""

    sequences: Sequences
    warnings: list[str]
    sources: list[dict[str, Any]] | None = None  # `Mix.provenance()` rows; None for prompt/response records


def is_mix(specs: Sequence[SourceSpec]) -> bool:
    """Several sources, or one with a share or token count: what goes through `load_mix`."""
    return len(specs) > 1 or bool(specs[0].suffix)


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
    """Chunks of `seq_len` tokens: one source for a budget of `budget` tokens (--tokens) as read before, or a
    mix of exactly `trained` tokens (the tokens the run trains; default `budget`), see the module docstring."""
    if is_mix(specs):
        return _mixed(specs, tokenizer, seq_len, budget if trained is None else trained, text_field, split_on)
    return _single(specs[0].source, tokenizer, seq_len, budget, text_field, split_on)


def _single(source: str, tokenizer: Any, seq_len: int, budget: int, text_field: str, split_on: str) -> Rows:
    """One source's stream as finetune always read it (chats rendered with the model's chat template)."""
    data = read_source(SourceSpec(source), budget * CHARS_PER_TOKEN_BOUND, text_field, split_on=split_on)
    ids = token_stream(render(data.documents, tokenizer, source), tokenizer, budget)
    chunks = fixed_chunks(ids, seq_len, source=source)
    stream = Mix(ids, [Taken(data, budget, ids.numel(), 0)], [])
    return Rows(Sequences(chunks), [], stream.provenance(0, chunks.numel()))


def _mixed(
    specs: Sequence[SourceSpec], tokenizer: Any, seq_len: int, budget: int, text_field: str, split_on: str
) -> Rows:
    what = "--tokens in whole optimizer steps"
    mixed = load_mix(specs, tokenizer, budget, text_field=text_field, split_on=split_on, unit=seq_len, what=what)
    chunks = fixed_chunks(mixed.ids, seq_len, source=mixed.label)
    return Rows(Sequences(chunks), list(mixed.warnings), mixed.provenance(0, chunks.numel()))


__all__ = ["Rows", "is_mix", "text_rows"]
