"""`--data SOURCE[:SHARE]` values parsed, and a token budget shared among them in whole tokens.

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

Reading and mixing the sources is `runtime.sources`; the stages make both through one `stages.data_plan`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from moe_prune.errors import MoePruneError
from moe_prune.runtime.data import FILE_SUFFIXES
from moe_prune.sizes import parse_tokens

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
    weights = share_weights(specs)
    rest = largest_remainder(list(weights.values()), budget - counted) if weights else []
    tokens = dict(zip(weights, rest, strict=True))
    return [s.count if s.count is not None else tokens[i] for i, s in enumerate(specs)]


def share_weights(specs: Sequence[SourceSpec]) -> dict[int, Fraction]:
    """Index -> fraction of the non-counted budget, for every source without a count."""
    free = [i for i, s in enumerate(specs) if s.count is None]
    shared = sum((specs[i].share for i in free if specs[i].share is not None), Fraction(0))
    unshared = sum(specs[i].share is None for i in free)
    even = (1 - shared) / unshared if unshared else Fraction(0)
    return {i: specs[i].share if specs[i].share is not None else even for i in free}


def largest_remainder(weights: list[Fraction], total: int) -> list[int]:
    """Whole numbers proportional to `weights` (which add up to 1) that add up to `total`; ties: first source."""
    exact = [w * total for w in weights]
    floors = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - floors[i]), i))
    for i in order[: total - sum(floors)]:
        floors[i] += 1
    return floors
