"""Data from one or several sources, mixed by share of a token budget: `--data SOURCE[:SHARE]`, repeatable.

REAP found that the calibration domain decides the result (C4 vs code); a mix makes it a one-line choice:
`--data code.jsonl:0.5 --data chat.jsonl:0.5`.

SHARE is what follows the LAST ':' when it reads as one:
  fraction  a decimal with a point, or a percentage: 0.5, .25, 1.0, 50%   (0 < x <= 1)
  count     a whole number of tokens, optionally with k/M/B: 20000, 20k, 1.5M
Anything else after a ':' belongs to the source (`org/name:config` hub ids, `task:NAME`, `C:\\corpus.txt`),
except after a local-looking file name (`a.jsonl:20q`, `a.jsonl:half`: refused, unless that whole name is
a file); hub ids keep configs such as `cnn_dailymail:3.0.0`. A source whose own name ends in
':<number>' needs an explicit share (`odd:5:1.0`).

Budget B (profile: --samples x --seq-len; finetune: --tokens): counts are taken as given (more than B in
all is refused); the rest R = B - counts goes to the other sources, fractions being fractions of R that
must add up to exactly 1, and sources without a share splitting equally what the fractions leave. With
counts only, the total is their sum. Fractions are exact decimals; whole tokens by largest remainder, so
the sources' tokens add up to R exactly.

Each source is tokenized alone (documents joined by EOS) and gives its first n tokens, or with a seed
(profile) n tokens of windows drawn from up to `pool` x n. Sources follow each other in the order given:
deterministic, nothing shuffled across runs. A source short of its tokens: a count is refused; otherwise
every non-count source shrinks by the same factor so the shares hold (a warning names the source).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from moe_prune.errors import MoePruneError
from moe_prune.runtime.chat import Chat, render
from moe_prune.runtime.data import FILE_SUFFIXES, Document, load_documents, token_stream, warn_if_no_eos
from moe_prune.sizes import parse_tokens

CHARS_PER_TOKEN_BOUND = 16  # characters read per wanted token: more than any tokenizer needs
_FRACTION = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")
_PERCENT = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))%")
_COUNT = re.compile(r"[+-]?\d+(?:\.\d+)?[kKmMbB]?")


@dataclass(frozen=True)
class SourceSpec:
    """One `--data` value: the source and its share (a fraction of the budget) or count (of tokens)."""

    source: str
    share: Fraction | None = None
    count: int | None = None
    suffix: str = ""  # ':0.5' as typed, '' without a share

    @property
    def given(self) -> str:
        return self.source + self.suffix

    def relocated(self, source: str) -> SourceSpec:
        """The same share of another name for the source (e.g. its absolute path)."""
        return replace(self, source=source)


def parse_source(text: str, option: str = "--data") -> SourceSpec:
    """'code.jsonl:0.5' -> SourceSpec('code.jsonl', share=1/2); see the module docstring for the rules."""
    head, sep, tail = text.rpartition(":")
    value = tail.strip()
    where = f"{option} {text}"
    if not sep or not head:
        return SourceSpec(text)
    if _FRACTION.fullmatch(value) or _PERCENT.fullmatch(value):
        share = Fraction(value[:-1]) / 100 if value.endswith("%") else Fraction(value)
        if not 0 < share <= 1:
            raise MoePruneError(
                f"{where}: share {value} is not in (0, 1] (a fraction of the token budget; "
                "give a token count such as 20k for an absolute amount)"
            )
        return SourceSpec(head, share=share, suffix=sep + tail)
    if _COUNT.fullmatch(value):
        count = parse_tokens(value, where)
        if count < 1:
            raise MoePruneError(f"{where}: token count {value} must be at least 1")
        return SourceSpec(head, count=count, suffix=sep + tail)
    if _looks_local(head) and not Path(text).expanduser().exists():
        raise MoePruneError(
            f"{where}: ':{tail}' is neither a share (0 < x <= 1, e.g. 0.5 or 50%) nor a token count (e.g. 20k), "
            f"and no file {text} exists"
        )
    return SourceSpec(text)  # the ':' is the source's own: `org/name:config`, `task:NAME`, `C:\\corpus.txt`


def _looks_local(source: str) -> bool:
    path = Path(source).expanduser()
    return path.exists() or source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES


def parse_sources(texts: Sequence[str | SourceSpec], option: str = "--data") -> list[SourceSpec]:
    """Every `--data` value parsed, and the shares checked together (see the module docstring)."""
    specs = [t if isinstance(t, SourceSpec) else parse_source(t, option) for t in texts]
    if not specs:
        raise MoePruneError(f"{option}: no data source given")
    seen = [s.source for s in specs]
    for spec in specs:
        if seen.count(spec.source) > 1:
            raise MoePruneError(f"{option} {spec.source}: given more than once; give it once with its whole share")
    shares = [s.share for s in specs if s.share is not None]
    free = [s for s in specs if s.count is None]
    total = sum(shares, Fraction(0))
    listed = " + ".join(str(float(s)) for s in shares)
    if total > 1:
        raise MoePruneError(f"{option}: shares {listed} add up to {float(total):g}, more than 1")
    unshared = [s for s in free if s.share is None]
    if free and not unshared and total != 1:
        raise MoePruneError(
            f"{option}: shares {listed} add up to {float(total):g}; make them add up to 1, "
            "or leave one source without a share to take the rest"
        )
    if unshared and total == 1:
        raise MoePruneError(f"{option}: shares add up to 1, leaving nothing for {unshared[0].source}")
    return specs


def allocate(specs: Sequence[SourceSpec], budget: int, what: str = "the token budget") -> list[int]:
    """Tokens per source of a budget of `budget` tokens; `what` names the budget in errors."""
    counted = sum(s.count for s in specs if s.count is not None)
    if counted > budget:
        raise MoePruneError(f"--data: token counts add up to {counted:,}, more than the {budget:,} tokens of {what}")
    weights = _weights(specs)
    rest = _largest_remainder(list(weights.values()), budget - counted) if weights else []
    tokens = dict(zip(weights, rest, strict=True))
    return [s.count if s.count is not None else tokens[i] for i, s in enumerate(specs)]


def _weights(specs: Sequence[SourceSpec]) -> dict[int, Fraction]:
    """Index -> fraction of the non-counted budget, for every source without a count."""
    free = [i for i, s in enumerate(specs) if s.count is None]
    shared = sum((specs[i].share for i in free if specs[i].share is not None), Fraction(0))
    unshared = sum(specs[i].share is None for i in free)
    even = (1 - shared) / unshared if unshared else Fraction(0)
    return {i: specs[i].share if specs[i].share is not None else even for i in free}


def _largest_remainder(weights: list[Fraction], total: int) -> list[int]:
    """Whole numbers proportional to `weights` (which add up to 1) that add up to `total`; ties: first source."""
    exact = [w * total for w in weights]
    floors = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors


@dataclass
class SourceData:
    """One source's documents as read (chats not yet rendered) and the split they came from."""

    spec: SourceSpec
    documents: list[Document]
    split: str | None = None  # of a hub dataset or a task; None for a local file


Reader = Callable[[SourceSpec, int], SourceData]  # (spec, max_chars) -> its documents


def read_source(
    spec: SourceSpec, max_chars: int | None, text_field: str = "text", split: str = "train", split_on: str = "none"
) -> SourceData:
    """The documents of a file or hub dataset (the default `Reader`)."""
    local = Path(spec.source).expanduser().exists()
    documents = load_documents(spec.source, text_field, split, max_chars, split_on)
    return SourceData(spec, documents, None if local else split)


def read_sources(
    specs: Sequence[SourceSpec],
    budget: int,
    *,
    text_field: str = "text",
    split: str = "train",
    split_on: str = "none",
    pool: int = 1,
    what: str = "the token budget",
    read: Reader | None = None,
) -> list[SourceData]:
    """Every source's documents, read up to what its share of `budget` can need (`read` for special sources)."""
    plan = allocate(specs, budget, what)
    reader = read or (lambda spec, max_chars: read_source(spec, max_chars, text_field, split, split_on))
    return [reader(spec, pool * max(n, 1) * CHARS_PER_TOKEN_BOUND) for spec, n in zip(specs, plan, strict=True)]


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
    budget: int,
    *,
    unit: int = 1,
    seed: int | None = None,
    pool: int = 1,
    what: str = "the token budget",
) -> Mix:
    """Each source's share of `budget` tokens, one after the other (see the module docstring).

    `unit`: the total is kept a multiple of it when sources fall short (profile: --seq-len), so no
    window straddles the end; with `seed`, tokens come in windows of `unit` drawn from `pool` x n.
    """
    specs = [s.spec for s in sources]
    planned = allocate(specs, budget, what)
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
    weights = list(_weights(specs).values())
    counted = sum(planned) - sum(planned[i] for i in free)
    rest = min(available[i] * sum(planned[j] for j in free) // planned[i] for i in short)
    rest -= (counted + rest) % unit
    while rest > 0 and any(n > available[i] for i, n in zip(free, _largest_remainder(weights, rest), strict=True)):
        rest -= unit
    tokens = list(planned)
    for i, n in zip(free, _largest_remainder(weights, max(rest, 0)), strict=True):
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


def load_mix(
    specs: Sequence[str | SourceSpec],
    tokenizer: Any,
    budget: int,
    *,
    text_field: str = "text",
    split: str = "train",
    split_on: str = "none",
    unit: int = 1,
    seed: int | None = None,
    what: str = "the token budget",
) -> Mix:
    """`--data` values -> exactly `budget` tokens mixed by share (fewer when the data runs out); for finetune."""
    parsed = parse_sources(specs)
    sources = read_sources(parsed, budget, text_field=text_field, split=split, split_on=split_on, what=what)
    return mix(sources, tokenizer, budget, unit=unit, seed=seed, what=what)
