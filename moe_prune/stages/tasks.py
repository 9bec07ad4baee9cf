"""`eval --tasks`: downstream-task accuracy through lm-evaluation-harness (an optional dependency).

The model is loaded by `runtime.loading` (same trust rule, dtype, device and device map as perplexity) and
wrapped in lm-eval's `HFLM`; lm-eval does the scoring, few-shot sampling and metrics. lm-eval itself is
reached through `task_harness` (import, silence, task lookup and checks), and a task folder's code is
refused or sandboxed by `task_code` unless --trust-remote-code. `task_calibration.calibration_texts`
(re-exported here) reads a task's own documents for task-aware profiling (`--data task:NAME`).
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.stages.task_calibration import TASK_PREFIX as TASK_PREFIX  # registers the `task:` reader
from moe_prune.stages.task_calibration import calibration_texts as calibration_texts
from moe_prune.stages.task_code import check_task_yamls, sandboxed_templates
from moe_prune.stages.task_harness import (
    check_tasks,
    import_lm_eval,
    plain,
    quiet_lm_eval,
    require_lm_eval,
    task_manager,
)
from moe_prune.stages.task_models import TaskProgressFn, task_lm


@dataclass
class TaskSettings:
    """What `--tasks` evaluates and how; shared by the model and its baseline."""

    tasks: list[str]
    num_fewshot: int | None = None
    limit: int | None = None
    include_path: Path | None = None
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    seed: int = 0
    engine: str = "transformers"  # or vllm: lm-eval's vLLM backend (`task_models.task_lm`)


@dataclass
class ModelTasks:
    """lm-eval's results for one model: per-task metrics, per-task configuration, per-sample records."""

    model: str
    results: dict[str, dict[str, Any]]
    groups: dict[str, list[str]]
    n_shot: dict[str, Any]
    versions: dict[str, Any]
    n_samples: dict[str, Any]
    higher_is_better: dict[str, dict[str, bool]]
    config: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "results": self.results,
            "groups": self.groups,
            "n_shot": self.n_shot,
            "versions": self.versions,
            "n_samples": self.n_samples,
            "higher_is_better": self.higher_is_better,
            "config": self.config,
        }

    def metrics(self, task: str) -> list[tuple[str, str, float, float | None]]:
        """(metric, filter, value, stderr) rows of one task, in lm-eval's order."""
        rows = []
        for key, value in self.results.get(task, {}).items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr") or metric == "alias" or not isinstance(value, (int, float)):
                continue
            stderr = self.results[task].get(f"{metric}_stderr,{filt}")
            rows.append((metric, filt, float(value), stderr if isinstance(stderr, (int, float)) else None))
        return rows


def evaluate_tasks(
    name: str, folder: Path, label: str, manager: Any, settings: TaskSettings, progress: TaskProgressFn
) -> ModelTasks:
    """Load one model the moe-prune way (or serve it in vLLM) and run lm-eval's `simple_evaluate` on the built
    tasks."""
    from lm_eval import simple_evaluate

    from moe_prune.runtime.loading import opened

    ckpt = opened(folder)  # headers read and validated once for the tokenizer and the model
    s = settings
    lm = task_lm(ckpt, s.engine, (s.dtype, s.device, s.batch_size, s.trust_remote_code, s.seed), label, progress)
    seeds = {"random_seed": settings.seed, "numpy_random_seed": settings.seed, "torch_random_seed": settings.seed}
    with sandboxed_templates(settings.trust_remote_code):
        out = simple_evaluate(
            lm,
            tasks=list(settings.tasks),
            num_fewshot=settings.num_fewshot,
            limit=settings.limit,
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=1000,
            fewshot_random_seed=settings.seed,
            **seeds,
        )
    del lm  # one model in memory at a time: vLLM's engine is shut down before the baseline's starts
    gc.collect()
    config = plain(out.get("config", {}))
    config.update(
        model=name,
        limit=settings.limit,
        num_fewshot=settings.num_fewshot,
        seeds={**seeds, "fewshot_random_seed": settings.seed},
        lm_eval_version=_lm_eval_version(),
        dtype=settings.dtype,
        device=settings.device,
        engine=settings.engine,
    )
    config.pop("model_args", None)
    return ModelTasks(
        model=name,
        results=plain(out["results"]),
        groups=plain(out.get("group_subtasks", {})),
        n_shot=plain(out.get("n-shot", {})),
        versions=plain(out.get("versions", {})),
        n_samples=plain(out.get("n-samples", {})),
        higher_is_better=plain(out.get("higher_is_better", {})),
        config=config,
        samples=out.get("samples", {}),
    )


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@dataclass
class TasksResult:
    """Task results of the model and, when asked, of its baseline."""

    model: ModelTasks
    baseline: ModelTasks | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "baseline": self.baseline.to_dict() if self.baseline else None}


def parse_tasks(spec: str) -> list[str]:
    """'a, b,a' -> ['a', 'b'] (order kept, duplicates dropped); an empty list is refused."""
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise MoePruneError("--tasks needs at least one task name (e.g. --tasks demo)")
    return names


def validate(settings: TaskSettings) -> None:
    """Every argument check that needs neither lm-eval's registry nor a model."""
    from moe_prune.runtime.vllm_engine import check_engine

    check_engine(settings.engine, settings.device)
    if settings.limit is not None and settings.limit < 1:
        raise MoePruneError(f"--limit must be at least 1 (got {settings.limit})")
    if settings.num_fewshot is not None and settings.num_fewshot < 0:
        raise MoePruneError(f"--num-fewshot must be at least 0 (got {settings.num_fewshot})")
    if settings.batch_size < 1:
        raise MoePruneError(f"batch size must be at least 1 (got {settings.batch_size})")
    if settings.include_path is not None and not settings.include_path.is_dir():
        raise MoePruneError(f"--include-path {settings.include_path}: not a folder")


def prepare(settings: TaskSettings) -> Any:
    """lm-eval's task manager with every task of `settings` built once: a wrong name, a malformed YAML or
    data out of reach fails here, before any model is loaded."""
    require_lm_eval()
    import_lm_eval()
    with quiet_lm_eval():
        if settings.include_path is not None:
            check_task_yamls(settings.include_path, settings.trust_remote_code)
        manager = task_manager(settings.tasks, settings.include_path)
        with sandboxed_templates(settings.trust_remote_code):
            check_tasks(manager, settings.tasks)
    return manager


def run(
    model: str | Path,
    settings: TaskSettings,
    baseline: str | Path | None = None,
    progress: TaskProgressFn | None = None,
) -> TasksResult:
    """Evaluate `model` (then `baseline`, one in memory at a time) on `settings.tasks` through lm-eval."""
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.runtime.loading import parse_dtype

    validate(settings)
    parse_dtype(settings.dtype)
    checkpoints = {"model": (str(model), Checkpoint.open(model))}
    if baseline is not None:
        checkpoints["baseline"] = (str(baseline), Checkpoint.open(baseline))
    for _, ckpt in checkpoints.values():
        _ = ckpt.identity  # config.json checked before lm-eval indexes anything
    report = progress or (lambda label, done, total, kind: None)
    manager = prepare(settings)
    with quiet_lm_eval():
        results = {
            label: evaluate_tasks(name, ckpt.folder, label, manager, settings, report)
            for label, (name, ckpt) in checkpoints.items()
        }
    return TasksResult(results["model"], results.get("baseline"))


def write_samples(result: TasksResult, path: Path, force: bool = False, protect: tuple[str | Path, ...] = ()) -> int:
    """Per-sample records as JSONL (one line per model, task and document), written whole or not at all by the
    one atomic writer (an existing file only with `force`, never one of `protect`); returns the number written."""
    from moe_prune.io.output import atomic_file

    lines = []
    for label, tasks in (("model", result.model), ("baseline", result.baseline)):
        if tasks is None:
            continue
        for task, records in tasks.samples.items():
            for record in records:
                lines.append(json.dumps({"model": label, "task": task, **plain(record)}, ensure_ascii=False))
    with atomic_file(path, force, protect=tuple(Path(p) for p in protect)) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)
