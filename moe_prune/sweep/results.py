"""What a sweep reports: one row per combination, the random floor per ratio, which direction held, the recommendation.

Quality is held-out perplexity (lower is better). The floor of a ratio is the BEST (lowest) perplexity of its
random masks: a line above it chose worse than a lucky draw of chance on this model. (It was their mean; with
skewed draws such as 40, 70 and 443 every line "beat random" while one seed alone beat most of them.) The mean,
median and range are reported beside it. Rows are plain JSON (results.jsonl holds
one per line), so a resumed sweep reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.sweep.plan import Combo

STATUS_ORDER = {"done": 0, "failed": 1, "hopeless": 2, "skipped": 3}


def _number(x: float | None) -> float | str | None:
    """JSON has no inf/NaN: such a perplexity is written as a string."""
    return x if x is None or math.isfinite(x) else str(x)


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


@dataclass
class Row:
    """The outcome of one combination: measured (done), refused before building (skipped), or not finite (failed)."""

    combo: Combo
    status: str  # done | skipped | failed | hopeless
    reason: str = ""
    perplexity: float | None = None
    nll: float | None = None
    tokens_scored: int | None = None
    kept: dict[int, int] = field(default_factory=dict)  # experts per MoE layer of the evaluated model
    active_params: int | None = None
    bytes_on_disk: int | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {"metric": ..., "value": ...}
    command: str = ""  # how to build this model without the sweep

    @property
    def quality(self) -> float:
        """Perplexity for sorting; a failed model (non-finite) is worst."""
        return self.perplexity if self.status == "done" and self.perplexity is not None else math.inf

    @property
    def experts_kept(self) -> float | None:
        """Mean experts per MoE layer (a global mask keeps different counts per layer)."""
        return sum(self.kept.values()) / len(self.kept) if self.kept else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.combo.key,
            "line": self.combo.line,
            "combo": self.combo.to_dict(),
            "status": self.status,
            "reason": self.reason,
            "perplexity": _number(self.perplexity),
            "nll": self.nll,
            "tokens_scored": self.tokens_scored,
            "kept": {str(k): v for k, v in self.kept.items()},
            "experts_kept": self.experts_kept,
            "active_params": self.active_params,
            "bytes_on_disk": self.bytes_on_disk,
            "tasks": self.tasks,
            "command": self.command,
        }

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Row:
        return cls(
            combo=Combo.from_dict(obj["combo"]),
            status=str(obj["status"]),
            reason=str(obj["reason"]),
            perplexity=_float(obj["perplexity"]),
            nll=_float(obj["nll"]),
            tokens_scored=obj["tokens_scored"],
            kept={int(k): int(v) for k, v in obj["kept"].items()},
            active_params=obj["active_params"],
            bytes_on_disk=obj["bytes_on_disk"],
            tasks=dict(obj["tasks"]),
            command=str(obj["command"]),
        )


@dataclass
class Floor:
    """Perplexity of the random masks of one ratio: the best (the floor), mean, std, median and range."""

    ratio: float
    mean: float
    std: float
    low: float
    high: float
    seeds: int
    median: float = math.nan

    @property
    def value(self) -> float:
        """What a line must beat: the best random mask."""
        return self.low

    @property
    def rule(self) -> str:
        return f"best of {self.seeds} random mask{'s' if self.seeds > 1 else ''}"

    def to_dict(self) -> dict[str, Any]:
        out = {k: _number(v) if isinstance(v, float) else v for k, v in vars(self).items()}
        return {**out, "floor": _number(self.value), "rule": self.rule}


def floors(rows: list[Row]) -> dict[float, Floor]:
    """The floor of every ratio with at least one measured (or failed: infinite) random mask."""
    by_ratio: dict[float, list[float]] = {}
    for row in rows:
        if row.combo.kind == "random" and row.status in ("done", "failed"):
            by_ratio.setdefault(row.combo.ratio, []).append(row.quality)
    return {
        ratio: Floor(
            ratio,
            statistics.fmean(v),
            statistics.pstdev(v) if all(map(math.isfinite, v)) else math.nan,
            min(v),
            max(v),
            len(v),
            statistics.median(v),
        )
        for ratio, v in sorted(by_ratio.items())
    }


def hopeless(combo: Combo, rows: list[Row], floor: dict[float, Floor]) -> str | None:
    """Why `combo` need not run: its line was already worse than random at a smaller ratio (None: run it)."""
    if combo.kind not in ("prune", "merge"):
        return None  # the original and the random masks are what the others are judged by
    for row in sorted(rows, key=lambda r: r.combo.ratio):
        if row.combo.line != combo.line or row.combo.ratio >= combo.ratio:
            continue
        base = floor.get(row.combo.ratio)
        if row.status in ("done", "failed") and base is not None and row.quality > base.value:
            return (
                f"worse than random at ratio {row.combo.ratio:g} "
                f"(perplexity {row.quality:.4g} > {base.rule} {base.value:.4g})"
            )
    return None


def ranked(rows: list[Row]) -> list[Row]:
    """The original, then each ratio's rows best first (measured, failed, hopeless, skipped)."""
    return sorted(rows, key=lambda r: (r.combo.ratio, STATUS_ORDER[r.status], r.quality, r.combo.key))


def not_measured(rows: list[Row]) -> list[str]:
    """Skipped and hopeless combinations, one line per reason (and line): which ones, at which ratios."""
    groups: dict[tuple[str, str], dict[str, list[str]]] = {}
    for row in rows:
        if row.status in ("skipped", "hopeless"):
            lines = groups.setdefault((row.status, row.reason), {})
            lines.setdefault(row.combo.line, []).append(f"{row.combo.ratio:g}")
    out = []
    for (status, reason), lines in groups.items():
        what = "; ".join(f"{line} at {', '.join(ratios)}" for line, ratios in lines.items())
        label = "skipped" if status == "skipped" else "not evaluated (--prune-hopeless)"
        out.append(f"{label}: {what}: {reason}")
    return out


@dataclass
class DirectionVerdict:
    """For a criterion tried both ways: which direction gave the lower perplexity at how many ratios."""

    criterion: str
    scope: str
    default: str  # the papers' direction (the criterion's registered default)
    winner: str | None  # None: a tie
    wins: dict[str, int]
    ratios: int  # ratios where both directions were measured
    beats_random: dict[str, int]  # ratios where that direction is below the random floor (the best random mask)

    def text(self) -> str:
        name = self.criterion + (" (global)" if self.scope == "global" else "")
        random = ", ".join(f"{d} {self.beats_random[d]}/{self.ratios}" for d in ("min", "max"))
        if self.winner is None:
            return f"{name}: min and max tie over {self.ratios} ratio(s); better than random: {random}"
        loser = "min" if self.winner == "max" else "max"
        tag = "the papers' default" if self.winner == self.default else f"not the papers' default {self.default}"
        return (
            f"{name}: {self.winner} ({tag}) beats {loser} at {self.wins[self.winner]} of {self.ratios} ratio(s); "
            f"better than random: {random}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**vars(self), "text": self.text()}


def verdicts(rows: list[Row], defaults: dict[str, str], floor: dict[float, Floor]) -> list[DirectionVerdict]:
    """One verdict per (criterion, scope) measured in both directions at one ratio or more."""
    measured: dict[tuple[str, str], dict[float, dict[str, float]]] = {}
    for row in rows:
        if row.combo.kind == "prune" and row.status in ("done", "failed"):
            lines = measured.setdefault((row.combo.name, row.combo.scope), {})
            lines.setdefault(row.combo.ratio, {})[str(row.combo.direction)] = row.quality
    out = []
    for (criterion, scope), by_ratio in measured.items():
        both = {r: v for r, v in by_ratio.items() if len(v) == 2}
        if not both:
            continue
        wins = {d: sum(1 for v in both.values() if v[d] < v[o]) for d, o in (("min", "max"), ("max", "min"))}
        logs = {d: sum(math.log(v[d]) for v in both.values()) for d in ("min", "max")}
        winner = max(wins, key=wins.__getitem__) if wins["min"] != wins["max"] else None
        if winner is None and logs["min"] != logs["max"]:
            winner = min(logs, key=logs.__getitem__)
        beats = {d: sum(1 for r, v in both.items() if r in floor and v[d] < floor[r].value) for d in ("min", "max")}
        out.append(DirectionVerdict(criterion, scope, defaults[criterion], winner, wins, len(both), beats))
    return out


@dataclass
class SweepResult:
    """Every row, and the summaries the table, `--json` and the plot are made of."""

    out: Path | None
    model: str
    stats: str
    data: str
    fingerprint: dict[str, Any]
    experts: dict[int, int]  # experts per MoE layer of the original
    top_k: int
    ratios: tuple[float, ...]
    rows: list[Row]
    defaults: dict[str, str]  # criterion -> its registered (papers') direction
    tasks: list[str] = field(default_factory=list)
    reused: int = 0  # rows read back from an earlier run
    warnings: list[str] = field(default_factory=list)

    @property
    def floors(self) -> dict[float, Floor]:
        return floors(self.rows)

    def best(self) -> dict[float, Row]:
        """The measured row of lowest perplexity at each ratio (random masks excluded)."""
        out: dict[float, Row] = {}
        for row in ranked(self.rows):
            if row.status == "done" and row.combo.kind in ("prune", "merge") and row.combo.ratio not in out:
                out[row.combo.ratio] = row
        return out

    def recommended(self) -> dict[str, Any] | None:
        """The line measured at every ratio with the lowest geometric-mean perplexity, and at how many it is best."""
        lines: dict[str, list[Row]] = {}
        for row in self.rows:
            if row.status == "done" and row.combo.kind in ("prune", "merge"):
                lines.setdefault(row.combo.line, []).append(row)
        complete = {line: rows for line, rows in lines.items() if len(rows) == len(self.ratios)}
        if not complete:
            return None
        line, rows = min(complete.items(), key=lambda kv: (sum(math.log(r.quality) for r in kv[1]), kv[0]))
        best = self.best()
        return {
            "line": line,
            "geometric_mean_perplexity": math.exp(sum(math.log(r.quality) for r in rows) / len(rows)),
            "best_at": [r.combo.ratio for r in rows if best[r.combo.ratio].combo.line == line],
            "commands": {str(r.combo.ratio): r.command for r in rows},
        }

    def to_dict(self) -> dict[str, Any]:
        floor = self.floors
        return {
            "out": str(self.out) if self.out else None,
            "model": self.model,
            "stats": self.stats,
            "data": self.data,
            "fingerprint": self.fingerprint,
            "experts": {str(k): v for k, v in self.experts.items()},
            "top_k": self.top_k,
            "ratios": list(self.ratios),
            "tasks": self.tasks,
            "rows": [r.to_dict() for r in ranked(self.rows)],
            "floors": [f.to_dict() for f in floor.values()],
            "directions": [v.to_dict() for v in verdicts(self.rows, self.defaults, floor)],
            "best": {str(ratio): row.to_dict() for ratio, row in self.best().items()},
            "recommended": self.recommended(),
            "not_measured": not_measured(self.rows),
            "reused": self.reused,
            "warnings": self.warnings,
        }
