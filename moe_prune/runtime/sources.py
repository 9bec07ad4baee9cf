"""The `--data` sources read and mixed into one token stream, each giving its share of a budget.

How the values are parsed and the budget shared among them in whole tokens is `runtime.shares` (re-exported
here); the stages make the parsed sources, their shares and the windows cut from the mix through one
`stages.data_plan`.

Each source is tokenized alone (documents joined by EOS) and gives its first n tokens, or with a seed
(profile) n tokens of windows drawn from up to `pool` x n. Sources follow each other in the order given:
deterministic, nothing shuffled across runs. A source short of its tokens: a count is refused; otherwise
every non-count source shrinks by the same factor so the shares hold (a warning names the source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_prune.errors import MoePruneError
from moe_prune.runtime.chat import Chat, render
from moe_prune.runtime.data import Document, load_documents, token_stream, warn_if_no_eos
from moe_prune.runtime.shares import SourceSpec as SourceSpec
from moe_prune.runtime.shares import allocate as allocate
from moe_prune.runtime.shares import largest_remainder, share_weights
from moe_prune.runtime.shares import parse_source as parse_source
from moe_prune.runtime.shares import parse_sources as parse_sources

CHARS_PER_TOKEN_BOUND = 16  # characters read per wanted token: more than any tokenizer needs


@dataclass
class SourceData:
    """One source's documents as read (chats not yet rendered) and the split they came from."""

    spec: SourceSpec
    documents: list[Document]
    split: str | None = None  # of a hub dataset or a task; None for a local file


def read_source(
    spec: SourceSpec, max_chars: int | None, text_field: str = "text", split: str = "train", split_on: str = "none"
) -> SourceData:
    """The documents of a file or hub dataset (the default `Reader`)."""
    local = Path(spec.source).expanduser().exists()
    documents = load_documents(spec.source, text_field, split, max_chars, split_on)
    return SourceData(spec, documents, None if local else split)


@dataclass
class Taken:
    """What one source gave to a mix: its tokens sit at `start` ... `start + tokens` of the mixed stream."""

    data: SourceData
    planned: int  # tokens its share asked of the budget
    tokens: int
    start: int

    @property
    def format(self) -> str:
        kinds = {"chat" if isinstance(d, Chat) else "text" for d in self.data.documents}
        return "+".join(sorted(kinds))


@dataclass
class Mix:
    """The mixed token stream, where each source's tokens lie in it, and what the user should know."""

    ids: torch.Tensor
    taken: list[Taken]
    warnings: list[str]

    @property
    def label(self) -> str:
        return " + ".join(t.data.spec.given for t in self.taken)

    def provenance(self, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Every source with its requested share and the tokens of `ids[start:stop]` it gave."""
        stop = self.ids.numel() if stop is None else stop
        rows = []
        for t in self.taken:
            tokens = max(0, min(stop, t.start + t.tokens) - max(start, t.start))
            spec = t.data.spec
            rows.append(
                {
                    "source": spec.source,
                    "share": None if spec.share is None else float(spec.share),
                    "count": spec.count,
                    "format": t.format,
                    "split": t.data.split,
                    "tokens_planned": t.planned,
                    "tokens": tokens,
                    "share_of_tokens": tokens / (stop - start) if stop > start else 0.0,
                }
            )
        return rows


def mix(
    sources: Sequence[SourceData],
    tokenizer: Any,
    planned: Sequence[int],
    *,
    unit: int = 1,
    seed: int | None = None,
    pool: int = 1,
) -> Mix:
    """Each source's `planned` tokens (its share of the budget, `runtime.shares.allocate`), one after the other.

    `unit`: the total is kept a multiple of it when sources fall short (profile: --seq-len), so no
    window straddles the end; with `seed`, tokens come in windows of `unit` drawn from `pool` x n.
    The stages call it through `runtime.data_plan.load_windows`.
    """
    specs = [s.spec for s in sources]
    planned = list(planned)
    streams = [
        token_stream(render(s.documents, tokenizer, s.spec.source), tokenizer, pool * n)
        for s, n in zip(sources, planned, strict=True)
    ]
    if len(sources) > 1:
        warn_if_no_eos(tokenizer)
    tokens, warnings = _fit(specs, planned, [s.numel() for s in streams], unit)
    parts = [take(stream, n, unit, seed) for stream, n in zip(streams, tokens, strict=True)]
    starts = [sum(tokens[:i]) for i in range(len(tokens))]
    taken = [Taken(*row) for row in zip(sources, planned, tokens, starts, strict=True)]
    ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return Mix(ids, taken, warnings)


def _fit(
    specs: Sequence[SourceSpec], planned: list[int], available: list[int], unit: int
) -> tuple[list[int], list[str]]:
    """The tokens each source gives: as planned, or every non-count source shrunk alike when one falls short."""
    for spec, want, have in zip(specs, planned, available, strict=True):
        if spec.count is not None and have < want:
            raise MoePruneError(f"{spec.given}: holds {have:,} tokens, fewer than the {want:,} asked")
    free = [i for i, s in enumerate(specs) if s.count is None]
    short = [i for i in free if available[i] < planned[i]]
    if not short:
        return planned, []
    weights = list(share_weights(specs).values())
    counted = sum(planned) - sum(planned[i] for i in free)
    rest = min(available[i] * sum(planned[j] for j in free) // planned[i] for i in short)
    rest -= (counted + rest) % unit
    while rest > 0 and any(n > available[i] for i, n in zip(free, largest_remainder(weights, rest), strict=True)):
        rest -= unit
    tokens = list(planned)
    for i, n in zip(free, largest_remainder(weights, max(rest, 0)), strict=True):
        tokens[i] = n
    if len(specs) == 1:
        return tokens, []  # one source: it simply gives all it has (the caller says how little that is)
    limit = min(short, key=lambda i: available[i] / planned[i])
    return tokens, [
        f"{specs[limit].given}: holds only {available[limit]:,} tokens, fewer than the {planned[limit]:,} its share "
        f"asks; every share is kept with {sum(tokens):,} tokens in all instead of {sum(planned):,}"
    ]


def take(stream: torch.Tensor, n: int, unit: int, seed: int | None) -> torch.Tensor:
    """`n` tokens of `stream`: its first ones, or (seed) windows of `unit` drawn with `seed`, in stream order."""
    windows = stream.numel() // unit
    needed = -(-n // unit)
    if seed is None or windows <= needed:
        return stream[:n]
    chosen = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[:needed].sort().values
    return stream[: windows * unit].view(windows, unit)[chosen].flatten()[:n]
