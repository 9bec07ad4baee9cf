"""What a sweep runs: every criterion x direction x scope x ratio, merge method x ratio, random masks and the original.

Scopes: `layer` (the ratio in every layer), `global` (one ranking across layers) and `search` (per-layer counts
searched by `allocate`, the criterion's order inside a layer; for merges, counts searched for that merge).
Merge methods run with each `--merge-weights` rule and, with `--merge-refit`, with refit down projections.

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
from moe_prune.specs.parse import names

Kind = Literal["original", "random", "prune", "merge"]
OPPOSITE = {"min": "max", "max": "min"}
DIRECTIONS = ("default", "opposite", "both")
SCOPES = ("layer", "global", "search")
SCOPE_SETS = {"both": ("layer", "global"), "all": SCOPES}  # --global both keeps its old meaning
REFITS = {"no": (False,), "yes": (True,), "both": (False, True)}


@dataclass(frozen=True)
class Combo:
    """One model to build and evaluate: the original, a random mask, a criterion's mask, or a merge."""

    kind: Kind
    ratio: float = 0.0
    name: str = ""  # criterion or merge method
    direction: str | None = None
    scope: str = "layer"  # layer: the ratio in every layer; global: chosen across layers; search: `allocate`
    seed: int | None = None  # random masks and merges
    weights: str = "frequency"  # merges: what members are averaged in proportion to
    refit: bool = False  # merges: down projections refit to the layer's output
    evals: int | None = None  # scope search: candidates the allocation search evaluates

    @property
    def line(self) -> str:
        scope = {"global": ", global", "search": ", searched"}.get(self.scope, "")
        if self.kind == "prune":
            return f"{self.name} ({self.direction}{scope})"
        if self.kind != "merge":
            return self.kind
        options = [
            *(["output"] if self.weights != "frequency" else []),
            *(["refit"] if self.refit else []),
            *(["searched"] if self.scope == "search" else []),
        ]
        return f"merge {self.name}" + (f" ({', '.join(options)})" if options else "")

    @property
    def key(self) -> str:
        extra = (f":{self.weights}" if self.weights != "frequency" else "") + (":refit" if self.refit else "")
        extra += f":evals={self.evals}" if self.evals is not None else ""
        return f"{self.kind}:{self.name}:{self.direction}:{self.scope}:{self.seed}:{self.ratio!r}{extra}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Combo:
        return cls(**obj)


def choice(value: str, option: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise MoePruneError(f"{option} {value!r}: use one of {', '.join(allowed)}")
    return value


def parse_scopes(spec: str) -> tuple[str, ...]:
    """--global: layer, global, search, comma-separated ones, both (layer,global) or all."""
    if spec in SCOPE_SETS:
        return SCOPE_SETS[spec]
    given = names(spec, "--global")
    for name in given:
        choice(name, "--global", (*SCOPES, *SCOPE_SETS))
    return tuple(s for s in SCOPES if s in given or any(s in SCOPE_SETS.get(n, ()) for n in given))


def combinations(
    criteria: list[Criterion],
    methods: list[str],
    ratios: tuple[float, ...],
    directions: str,
    scopes: str,
    seeds: int,
    merge_seed: int = 0,
    weights: tuple[str, ...] = ("frequency",),
    refit: str = "no",
    evals: int = 32,
) -> list[Combo]:
    """The original, then per ratio: `seeds` random masks, every criterion line, every merge line.

    With several scopes, global selection is added only for criteria whose scores compare across layers, and
    a searched allocation only in the criterion's own direction (the order `allocate` keeps inside a layer);
    asking for `global` alone keeps the others, to be reported as skipped with score's reason. Merges run
    layer-wise and, with `search`, with searched counts, for every weights rule and refit choice.
    """
    chosen = parse_scopes(scopes)
    combos = [Combo("original")]
    for ratio in ratios:
        combos += [Combo("random", ratio, "random", "min", "layer", seed) for seed in range(seeds)]
        for crit in criteria:
            wanted = {"default": [crit.direction], "opposite": [OPPOSITE[crit.direction]]}
            for direction in wanted.get(directions, [crit.direction, OPPOSITE[crit.direction]]):
                for scope in chosen:
                    usable = {"layer": True, "global": crit.global_ok, "search": direction == crit.direction}
                    if len(chosen) == 1 or usable[scope]:
                        budget = evals if scope == "search" else None
                        combos.append(Combo("prune", ratio, crit.name, direction, scope, evals=budget))
        for method in methods:
            for scope in [s for s in ("layer", "search") if s == "layer" or s in chosen]:
                for rule in weights:
                    for fit in REFITS[refit]:
                        if not (method == "prune" and rule != "frequency"):  # prune keeps anchors: no averaging
                            budget = evals if scope == "search" else None
                            combos.append(Combo("merge", ratio, method, None, scope, merge_seed, rule, fit, budget))
    return combos


def command(combo: Combo, model: str, stats: str, kept: dict[int, int]) -> str:
    """The `moe-prune` command line(s) that build this combination's checkpoint on their own.

    A searched row's command builds the counts it measured (the search is in its provenance, not rerun).
    """
    parts = (combo.name, combo.direction, combo.scope, combo.seed, combo.ratio)
    extra_parts = (combo.weights if combo.weights != "frequency" else None, "refit" if combo.refit else None)
    slug = "-".join(str(p) for p in (*parts, *extra_parts) if p is not None)
    out = shlex.quote(slug)
    if combo.kind == "merge":
        counts = Counter(kept.values())
        keep = counts.most_common(1)[0][0]
        extra = "".join(f" --keep {layer}={n}" for layer, n in kept.items() if n != keep)
        seed = f" --seed {combo.seed}" if combo.seed else ""
        options = (f" --weights {combo.weights}" if combo.weights != "frequency" else "") + " --refit" * combo.refit
        return (
            f"moe-prune merge {shlex.quote(model)} --stats {shlex.quote(stats)} --keep {keep}{extra} "
            f"--method {combo.name}{options}{seed} --out {out}"
        )
    if combo.kind == "original":
        return ""
    mask = shlex.quote(f"{slug}.json")
    if combo.scope == "search":
        return (
            f"moe-prune allocate {shlex.quote(model)} --stats {shlex.quote(stats)} -c {combo.name} "
            f"--ratio {combo.ratio} --budget-evals {combo.evals} --out {mask} && "
            f"moe-prune prune {shlex.quote(model)} --mask {mask} --out {out}"
        )
    options = f"--direction {combo.direction} --ratio {combo.ratio}"
    options += " --global" if combo.scope == "global" else ""
    options += f" --seed {combo.seed}" if combo.kind == "random" else ""
    return (
        f"moe-prune score {shlex.quote(stats)} --model {shlex.quote(model)} --criterion {combo.name} {options} "
        f"--out {mask} && moe-prune prune {shlex.quote(model)} --mask {mask} --out {out}"
    )
