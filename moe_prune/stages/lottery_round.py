"""`lottery`'s rounds: one method's rounds, each `profile` -> `score` -> `prune` -> `finetune` -> `eval` on the
previous round's output, reusing whatever a round already wrote (see `stages.lottery` for the layout of DIR).
Split from `stages.lottery` (issue #22: files <= 300 lines)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_prune.artifacts.common import check_header, dump_json, read_json
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file
from moe_prune.lottery.recipe import LotteryParams
from moe_prune.lottery.results import MethodResult, RoundResult
from moe_prune.runtime.shares import SourceSpec
from moe_prune.scoring import get_criterion
from moe_prune.scoring.selection import Budget
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, finetune, profile, prune, score
from moe_prune.training.options import FinetuneOptions

ROUND_SCHEMA = "moe-prune/lottery-round"
VERSION = 1

# progress(method, round, rounds, step): called before each step of each round.
ProgressFn = Callable[[str, int, int, str], None]


@dataclass
class Method:
    """One way of reaching the target: how many rounds, with or without finetuning."""

    name: str
    drops: list[int]  # experts dropped per layer in each round
    tokens: list[int]  # finetuning tokens per round (0: no finetuning)


def _run_method(
    params: LotteryParams,
    specs: tuple[SourceSpec, ...],
    digest: str,
    method: Method,
    folder: Path,
    original: Path,
    report: ProgressFn,
    first_round: Path | None,
) -> MethodResult:
    """All rounds of one method, each on the previous round's output; round 1 may copy from `first_round`."""
    folder.mkdir(parents=True, exist_ok=True)
    current = original
    rounds: list[RoundResult] = []
    for index, (drop, tokens) in enumerate(zip(method.drops, method.tokens, strict=True), 1):
        shared = first_round if index == 1 else None
        step = _Round(params, digest, method.name, index, len(method.drops), folder, report, shared, specs)
        result = step.run(current, drop, tokens)
        rounds.append(result)
        current = folder / result.checkpoint
    return MethodResult(method.name, folder, rounds)


@dataclass
class _Round:
    """One round of one method, reusing whatever it already wrote."""

    params: LotteryParams
    digest: str
    method: str
    index: int
    total: int
    folder: Path
    report: ProgressFn
    shared: Path | None = None  # another method's round on the same input model: its statistics (and mask)
    specs: tuple[SourceSpec, ...] = ()  # --data, parsed once by `_plan`: every round's profile and finetune

    @property
    def path(self) -> Path:
        return self.folder / f"round-{self.index:02d}"

    def run(self, current: Path, drop: int, tokens: int) -> RoundResult:
        marker = self.path / "round.json"
        if marker.exists():
            return self._finished(marker)
        self.path.mkdir(parents=True, exist_ok=True)
        stats = self._stats(current)
        mask = self._mask(current, stats, drop)
        pruned = self.path / "pruned"
        if not pruned.exists():
            self.report(self.method, self.index, self.total, "prune")
            prune.run(current, mask, pruned, mask_name=str(self.path / "mask.json"))
        final = pruned
        if tokens:
            final = self.path / "finetuned"
            if not final.exists():
                self.report(self.method, self.index, self.total, "finetune")
                options = FinetuneOptions(
                    **_finetune_fields(self.params, tokens), seed=self.params.seed + self.index - 1
                )
                finetune.run(pruned, self.specs, final, options)  # one source or the same mix as profile
        trained = _trained(final) if tokens else 0
        perplexity = None
        if self.params.eval_tokens:
            self.report(self.method, self.index, self.total, "eval")
            perplexity = _perplexity(self.params, final)
        layers = mask.model.moe_layers
        result = RoundResult(
            round=self.index,
            dropped={layer: list(mask.drop(layer)) for layer in layers},
            kept={layer: list(mask.keep[layer]) for layer in layers},
            tokens=tokens,
            trained=trained,
            checkpoint=str(final.relative_to(self.folder)),
            perplexity=perplexity,
        )
        entry = {"schema": ROUND_SCHEMA, "version": VERSION, "recipe": self.digest, **result.to_dict()}
        entry.pop("reused")
        _write_json(marker, entry)
        return result

    def _finished(self, marker: Path) -> RoundResult:
        obj, name = read_json(marker, "lottery round marker")
        check_header(obj, ROUND_SCHEMA, VERSION, name)
        if obj.get("recipe") != self.digest:
            raise MoePruneError(f"{name}: belongs to another lottery run; pass --force to start over")
        try:
            result = RoundResult.from_dict(obj)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MoePruneError(f"{name}: malformed round marker ({exc!r})") from exc
        if result.trained is None:  # a marker written before rounds recorded it
            result.trained = _trained(self.folder / result.checkpoint) if result.tokens else 0
        return result

    def _stats(self, current: Path) -> Stats | None:
        crit = get_criterion(self.params.criterion)
        if not crit.stats:
            return None
        path = self.path / "stats.npz"
        if not path.exists() and self.shared is not None and (self.shared / "stats.npz").exists():
            _copy(self.shared / "stats.npz", path)
        if path.exists():
            return Stats.load(path)
        self.report(self.method, self.index, self.total, "profile")
        settings = profile.Settings(
            samples=self.params.profile_samples,
            seq_len=self.params.profile_seq_len,
            seed=self.params.seed,
            batch_size=self.params.profile_batch_size,
            gradients=any(name.startswith("grad") for name in crit.stats),
            text_field=self.params.text_field,
            split_on=self.params.split_on,
        )
        stats = profile.run(current, self.specs, settings).stats
        stats.save(path)
        return stats

    def _mask(self, current: Path, stats: Stats | None, drop: int) -> DropMask:
        path = self.path / "mask.json"
        twin = self.shared / "mask.json" if self.shared is not None else None
        if not path.exists() and twin is not None and twin.exists():
            shared = DropMask.read(twin)  # same input, statistics and seed: the same drop count is the same mask
            if all(len(shared.drop(layer)) == drop for layer in shared.model.moe_layers):
                _copy(twin, path)
        if path.exists():
            return DropMask.read(path)
        self.report(self.method, self.index, self.total, "score")
        mask, _ = score.score(
            stats,
            current,
            self.params.criterion,
            direction=self.params.direction,  # type: ignore[arg-type]
            budget=Budget(drop=drop),
            seed=self.params.seed + self.index - 1,
            stats_name=str(self.path / "stats.npz"),
        )
        score.write_mask(mask, path)
        return mask


def _finetune_fields(params: LotteryParams, tokens: int) -> dict[str, Any]:
    return {
        "tokens": tokens,
        "seq_len": params.seq_len,
        "batch_size": params.batch_size,
        "grad_accum": params.grad_accum,
        "lr": params.lr,
        "weight_decay": params.weight_decay,
        "warmup_ratio": params.warmup_ratio,
        "max_grad_norm": params.max_grad_norm,
        "text_field": params.text_field,
        "split_on": params.split_on,
        "eval_tokens": 0,  # the round is evaluated once, by `eval`, after finetuning
    }


def _perplexity(params: LotteryParams, model: Path) -> float:
    result = evaluate.run(
        model,
        EvalSpec(
            data=params.eval_data,
            seq_len=params.seq_len,
            batch_size=params.batch_size,
            max_tokens=params.eval_tokens,
            split_on=params.split_on,
        ),
    )
    return result.model.perplexity


def _trained(checkpoint: Path) -> int:
    """Tokens the finetune that wrote `checkpoint` trained (whole steps), from its manifest's last entry."""
    manifest = Checkpoint.open(checkpoint).manifest
    entry = manifest.history[-1] if manifest and manifest.history else {}
    if entry.get("stage") != "finetune":
        raise MoePruneError(f"{checkpoint}: its manifest does not end with a finetune; pass --force to start over")
    return int(entry["tokens"])


def _copy(source: Path, target: Path) -> None:
    """Copy atomically (the run folder's own files: replaced when a round is redone)."""
    with atomic_file(target, force=True) as tmp:
        shutil.copyfile(source, tmp)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(dump_json(json.loads(json.dumps(obj, default=str))))
