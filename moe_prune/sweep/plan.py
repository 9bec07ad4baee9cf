"""What a sweep runs: every criterion x direction x scope x ratio, merge method x ratio, random masks and the original.

Each combination has a stable `key` (what a rerun looks up in results.jsonl) and a `line` (the combination
without its ratio: one line of the plot, the unit `--prune-hopeless` stops). Combinations are ordered by
ratio, random masks first within a ratio, so the floor of a ratio is known before the lines it judges.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

from moe_prune.errors import MoePruneError
from moe_prune.scoring.registry import Criterion

Kind = Literal["original", "random", "prune", "merge"]
OPPOSITE = {"min": "max", "max": "min"}
DIRECTIONS = ("default", "opposite", "both")
SCOPES = ("layer", "global", "both")


@dataclass(frozen=True)
class Combo:
    """One model to build and evaluate: the original, a random mask, a criterion's mask, or a merge."""

    kind: Kind
    ratio: float = 0.0
    name: str = ""  # criterion or merge method
    direction: str | None = None
    scope: str = "layer"  # layer: the ratio in every layer; global: of all experts, chosen across layers
    seed: int | None = None  # random masks and merges

    @property
    def line(self) -> str:
        if self.kind == "prune":
            return f"{self.name} ({self.direction}{', global' if self.scope == 'global' else ''})"
        return f"merge {self.name}" if self.kind == "merge" else self.kind

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}:{self.direction}:{self.scope}:{self.seed}:{self.ratio!r}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Combo:
        return cls(**obj)


def parse_names(spec: str, option: str) -> list[str]:
    """'a, b,a' -> ['a', 'b'] (order kept, duplicates dropped)."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise MoePruneError(f"{option} needs at least one name")
    return names


def parse_ratios(spec: str) -> tuple[float, ...]:
    """'0.5,0.25' -> (0.25, 0.5): fractions of experts to drop, each in (0, 1), ascending."""
    ratios = set()
    for part in parse_names(spec, "--ratios"):
        try:
            ratio = float(part)
        except ValueError as exc:
            raise MoePruneError(f"--ratios {part!r}: expected a fraction such as 0.25") from exc
        if not 0.0 < ratio < 1.0:
            raise MoePruneError(f"--ratios {part}: each ratio must be above 0 and below 1 (the original is always run)")
        ratios.add(ratio)
    return tuple(sorted(ratios))


def choice(value: str, option: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise MoePruneError(f"{option} {value!r}: use one of {', '.join(allowed)}")
    return value


def combinations(
    criteria: list[Criterion],
    methods: list[str],
    ratios: tuple[float, ...],
    directions: str,
    scopes: str,
    seeds: int,
    merge_seed: int = 0,
) -> list[Combo]:
    """The original, then per ratio: `seeds` random masks, every criterion line, every merge method.

    `scopes="both"` adds global selection only for criteria whose scores compare across layers; asking
    for `global` alone keeps the others, to be reported as skipped with score's reason.
    """
    combos = [Combo("original")]
    for ratio in ratios:
        combos += [Combo("random", ratio, "random", "min", "layer", seed) for seed in range(seeds)]
        for crit in criteria:
            wanted = {"default": [crit.direction], "opposite": [OPPOSITE[crit.direction]]}
            for direction in wanted.get(directions, [crit.direction, OPPOSITE[crit.direction]]):
                for scope in ("layer", "global"):
                    if scopes == scope or (scopes == "both" and (scope == "layer" or crit.global_ok)):
                        combos.append(Combo("prune", ratio, crit.name, direction, scope))
        combos += [Combo("merge", ratio, method, None, "layer", merge_seed) for method in methods]
    return combos


def command(combo: Combo, model: str, stats: str, kept: dict[int, int]) -> str:
    """The `moe-prune` command line(s) that build this combination's checkpoint on their own."""
    slug = "-".join(
        str(p) for p in (combo.name, combo.direction, combo.scope, combo.seed, combo.ratio) if p is not None
    )
    out = shlex.quote(slug)
    if combo.kind == "merge":
        counts = Counter(kept.values())
        keep = counts.most_common(1)[0][0]
        extra = "".join(f" --keep {layer}={n}" for layer, n in kept.items() if n != keep)
        seed = f" --seed {combo.seed}" if combo.seed else ""
        return (
            f"moe-prune merge {shlex.quote(model)} --stats {shlex.quote(stats)} --keep {keep}{extra} "
            f"--method {combo.name}{seed} --out {out}"
        )
    if combo.kind == "original":
        return ""
    mask = shlex.quote(f"{slug}.json")
    options = f"--direction {combo.direction} --ratio {combo.ratio}"
    options += " --global" if combo.scope == "global" else ""
    options += f" --seed {combo.seed}" if combo.kind == "random" else ""
    return (
        f"moe-prune score {shlex.quote(stats)} --model {shlex.quote(model)} --criterion {combo.name} {options} "
        f"--out {mask} && moe-prune prune {shlex.quote(model)} --mask {mask} --out {out}"
    )
