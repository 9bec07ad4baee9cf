"""`eval --tasks`: downstream-task accuracy through lm-evaluation-harness (an optional dependency).

The model is loaded by `runtime.loading` (same trust rule, dtype, device and device map as perplexity) and
wrapped in lm-eval's `HFLM`; lm-eval does the scoring, few-shot sampling and metrics. Task names resolve
against the shipped demo suite (`moe_prune/demo/tasks`, group `demo`), `--include-path` and, only when a
name is not found there, lm-eval's own registry (indexing it takes seconds). lm-eval's logging, warnings and
tqdm bars are silenced: errors surface as one `MoePruneError` line, progress through `progress`.

A task folder is code like a checkpoint's. Without --trust-remote-code, code runs only from the tasks shipped
with moe-prune or lm-eval: `check_task_yamls` refuses a user YAML's code constructs, `sandboxed_templates`
renders every Jinja template in jinja2's immutable sandbox.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.demo import DEMO_DIR
from moe_prune.errors import MoePruneError
from moe_prune.stages.task_models import TaskProgressFn, task_lm

DEMO_TASKS_DIR: Path = DEMO_DIR / "tasks"
INSTALL_HINT = "task evaluation needs lm-evaluation-harness: pip install 'moe-prune[tasks]' (or lm-eval==0.4.13)"
_OFFLINE_ERRORS = ("ConnectionError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "DatasetNotFoundError")


def require_lm_eval() -> None:
    """Fail with the install command (one line) when the optional dependency is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MoePruneError(INSTALL_HINT)


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


def plain(value: Any) -> Any:
    """lm-eval results as JSON-able Python (numpy scalars to floats, NaN to None, unknown objects to str)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval's loggers, Python warnings, datasets' and lm-eval's tqdm bars for the duration."""
    import datasets
    from tqdm import tqdm

    silent = functools.partial(tqdm, disable=True)
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets", "evaluate")]
    levels = [lg.level for lg in loggers]
    bars = datasets.utils.logging.is_progress_bar_enabled()
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        datasets.disable_progress_bars()
        for name, module in list(sys.modules.items()):
            if name.startswith("lm_eval") and getattr(module, "tqdm", None) is tqdm:
                stack.enter_context(_patched(module, "tqdm", silent))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if bars:
                datasets.enable_progress_bars()


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def _import_lm_eval() -> None:
    """Import lm-eval's modules once, quietly (importing them logs and warns)."""
    require_lm_eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lm_eval").setLevel(logging.CRITICAL)
        import lm_eval.api.task
        import lm_eval.evaluator
        import lm_eval.models.huggingface  # noqa: F401


def check_task_yamls(folder: Path, trust_remote_code: bool = False) -> None:
    """Refuse a malformed task YAML under --include-path (lm-eval's index skips them without a word) and,
    without --trust-remote-code, every construct through which a task folder runs code (see `_task_code`).

    A task folder is code like a checkpoint's: `!function` imports Python, `include:` pulls in another
    YAML's functions, and a metric lm-eval does not register is loaded by HF `evaluate` as a script.
    """
    root = folder.resolve()
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        config = _read_task_yaml(path)
        if not isinstance(config, dict) or not {"task", "group", "tag", "include"} & set(config):
            raise MoePruneError(f"{path}: not an lm-eval task YAML (no task, group, tag or include key)")
        if not trust_remote_code:
            _refuse_task_code(path, root, set())


@dataclass(frozen=True)
class Tagged:
    """A `!tag value` node of a task YAML (lm-eval's `!function`), kept to be named in the refusal."""

    tag: str
    value: str


@functools.cache
def _tagged_loader() -> Any:
    """PyYAML's safe loader, plus every `!tag` read as `Tagged` instead of imported."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader: Any, suffix: str, node: Any) -> Tagged:
        value = loader.construct_scalar(node) if isinstance(node, yaml.ScalarNode) else "..."
        return Tagged(f"!{suffix}", str(value))

    Loader.add_multi_constructor("!", tagged)
    return Loader


def _read_task_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_tagged_loader())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise MoePruneError(f"{path}: malformed task YAML{line}") from exc


TRUST_HINT = "a task folder is code like a checkpoint's: pass --trust-remote-code only for task folders you trust"


def _refuse_task_code(path: Path, root: Path, seen: set[Path]) -> None:
    """One line naming `path` and the first construct of it (or of a YAML it includes) that would run code."""
    if path.resolve() in seen:
        return
    seen.add(path.resolve())
    config = _read_task_yaml(path)
    for where, value in _walk(config, ""):
        construct = _task_code(where, value)
        if construct:
            raise MoePruneError(f"{path}: {construct}; {TRUST_HINT}")
    for where, value in _walk(config, ""):
        if where.rpartition(".")[2] != "include":
            continue
        for include in value if isinstance(value, list) else [value]:
            target = (path.resolve().parent / str(include)).resolve()
            if _shipped(target):
                continue  # lm-eval's or moe-prune's own task YAMLs: their code ships with the package
            if not target.is_relative_to(root):
                raise MoePruneError(f"{path}: `include: {include}` points outside --include-path; {TRUST_HINT}")
            if not target.is_file():
                raise MoePruneError(f"{path}: `include: {include}`: no such file")
            _refuse_task_code(target, root, seen)


def _walk(value: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every node of a parsed YAML, depth first."""
    yield where, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{where}[{index}]")


def _task_code(where: str, value: Any) -> str | None:
    """What in one YAML node runs code outside lm-eval's and moe-prune's own, or None."""
    key = where.rpartition(".")[2]
    if isinstance(value, Tagged):
        return f"`{where}: {value.tag} {value.value}` runs Python from the task folder"
    if key == "metric" and isinstance(value, str) and value not in _registered_metrics():
        return f"`{where}: {value}` is not an lm-eval metric (HF evaluate would load it as a script)"
    if key == "hf_evaluate" and value:
        return f"`{where}: {value}` loads the metric through HF evaluate (a script)"
    if key == "dataset_path" and isinstance(value, str) and _loader_script(value):
        return f"`{where}: {value}` is or holds a python dataset loader script"
    return None


def _registered_metrics() -> set[str]:
    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import metric_registry

    return set(metric_registry.keys())


def _loader_script(dataset_path: str) -> bool:
    path = Path(dataset_path).expanduser()
    return path.suffix == ".py" or (path.is_dir() and any(path.glob("*.py")))


def _shipped(path: Path) -> bool:
    """Whether a YAML belongs to the demo suite or to lm-eval's own tasks (trusted like the packages)."""
    import lm_eval.tasks

    shipped = (DEMO_TASKS_DIR.resolve(), Path(lm_eval.tasks.__file__).resolve().parent)
    return any(path.is_relative_to(folder) for folder in shipped)


@contextlib.contextmanager
def sandboxed_templates(trust_remote_code: bool) -> Iterator[None]:
    """lm-eval renders every task's Jinja template in jinja2's immutable sandbox unless code is trusted.

    lm-eval 0.4.13 renders `doc_to_text` & co. with a plain `jinja2.Environment`, where a template reaches
    Python's object graph (`''.__class__.__mro__[1].__subclasses__()`) and from there `os`. The sandbox
    keeps field substitution, filters, loops and conditions, and refuses private attributes, unsafe calls
    and mutation; a refusal surfaces as `jinja2.exceptions.SecurityError` (`template_refusal` words it).
    """
    if trust_remote_code:
        yield
        return
    import lm_eval.utils
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    original = lm_eval.utils.env
    sandbox = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
    for name, fn in original.filters.items():
        sandbox.filters.setdefault(name, fn)
    with _patched(lm_eval.utils, "env", sandbox):
        try:
            yield
        except SecurityError as exc:
            raise template_refusal(exc) from exc


def template_refusal(exc: Exception, task: str | None = None, yaml_path: Any = None) -> MoePruneError:
    """The one line for a task template the sandbox refused, naming the task and its YAML when known."""
    which = f"task {task!r}" if task else "a task"
    where = f"{yaml_path}: " if yaml_path else ""
    return MoePruneError(
        f"{where}{which}: its Jinja template does what the sandbox forbids ({str(exc).rstrip('.')}); task "
        "templates render in jinja2's sandbox unless --trust-remote-code"
    )


def task_manager(names: list[str], include_path: Path | None) -> Any:
    """A TaskManager knowing every name: demo and user tasks first, lm-eval's registry only when needed."""
    from lm_eval.tasks import TaskManager

    paths = [str(DEMO_TASKS_DIR), *([str(include_path)] if include_path else [])]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=paths)
    for name in names:
        if name not in manager.all_tasks:
            where = " or under --include-path" if include_path else ""
            raise MoePruneError(f"unknown task {name!r}: not an lm-eval task, group or tag{where}")
    return manager


def check_tasks(manager: Any, names: list[str]) -> None:
    """Build each task once (this reads its data) and render every document's prompt, target and choices, so
    a failure names the task and its YAML before any model is loaded: offline data, a template that does
    not parse, names a field some document lacks, or does what the sandbox forbids."""
    from jinja2.exceptions import SecurityError, TemplateError

    for name in names:
        rendering = name  # the task whose template runs (a group's subtask once built)
        try:
            for task in manager.load([name])["tasks"].values():
                rendering = getattr(getattr(task, "config", None), "task", None) or name
                _render_all(task)
        except MoePruneError:
            raise
        except SecurityError as exc:
            raise template_refusal(exc, rendering, _yaml_path(manager, rendering, name)) from exc
        except TemplateError as exc:
            where = _yaml_path(manager, rendering, name)
            raise MoePruneError(
                f"{where}: task {rendering!r}: its Jinja template fails"
                f"{getattr(exc, 'document', '')} ({type(exc).__name__}: {str(exc).rstrip('.')})"
            ) from exc
        except Exception as exc:
            chain = [exc, exc.__cause__, exc.__context__]
            if any(type(e).__name__ in _OFFLINE_ERRORS for e in chain if e is not None):
                raise MoePruneError(
                    f"task {name!r}: its data is not available offline (it must be downloaded from the hub)"
                ) from exc
            raise MoePruneError(f"task {name!r}: could not be loaded ({type(exc).__name__}: {exc})") from exc


def _yaml_path(manager: Any, task: str, name: str) -> Any:
    """The YAML file a task (or the group it came from) was read from, for messages."""
    entry = manager.task_index.get(task) or manager.task_index.get(name)
    return getattr(entry, "yaml_path", None) or f"task {name!r}"


def _render_all(task: Any) -> None:
    """Render the prompt, target and choices of every evaluated and few-shot document, as building requests
    will: a template that fails on any of them fails here, before a model is loaded (lm-eval would fail
    mid-run, on the first such document). Objects that are not tasks are skipped."""
    from jinja2.exceptions import TemplateError

    if not hasattr(task, "doc_to_text"):
        return
    splits = [("test", getattr(task, "eval_docs", None))]
    if getattr(task, "has_training_docs", lambda: False)():
        splits.append(("training", task.training_docs()))
    for split, docs in splits:
        for index, doc in enumerate(docs or ()):
            try:
                task.doc_to_text(doc)
                task.doc_to_target(doc)
                if task.config.output_type == "multiple_choice":
                    task.doc_to_choice(doc)
            except TemplateError as exc:
                exc.document = f" on {split} document {index}"
                raise


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
    _import_lm_eval()
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


TASK_PREFIX = "task:"  # `--data task:NAME` (or `profile --task NAME`): a task's own documents as calibration text


def calibration_texts(
    name: str, include_path: Path | None = None, trust_remote_code: bool = False
) -> tuple[list[str], str]:
    """(documents of task `name` as lm-eval renders them, the split they come from), for task-aware profiling.

    UNCURL and SEER-MoE prune for a task with statistics of that task's data. Each document is its prompt,
    the target delimiter and the gold answer. The split is the task's training split, else its few-shot
    split, else its validation split when it evaluates on test: never the split it evaluates (that would
    tune the model to its own test set).
    """
    require_lm_eval()
    _import_lm_eval()
    with quiet_lm_eval(), sandboxed_templates(trust_remote_code):
        if include_path is not None:
            check_task_yamls(include_path, trust_remote_code)
        task = _load_one(task_manager([name], include_path), name)
        config = task.config
        evaluated = config.test_split or config.validation_split
        candidates = [config.training_split, config.fewshot_split]
        if config.test_split:
            candidates.append(config.validation_split)
        split = next((s for s in candidates if s and s != evaluated), None)
        if split is None:
            raise MoePruneError(
                f"task {name!r}: has no split besides {evaluated!r}, the one it evaluates; calibrating on it "
                "would fit the model to its own test set"
            )
        docs = {config.training_split: task.training_docs, config.validation_split: task.validation_docs}.get(
            split, lambda: task.fewshot_docs()
        )()
        texts = [_rendered(task, doc) for doc in docs]
    if not texts:
        raise MoePruneError(f"task {name!r}: its {split!r} split holds no documents")
    return texts, split


def _load_one(manager: Any, name: str) -> Any:
    check_tasks(manager, [name])
    loaded = manager.load([name])["tasks"]
    if name not in loaded:
        raise MoePruneError(f"task {name!r}: is a group of tasks; profile on one task")
    return loaded[name]


def _rendered(task: Any, doc: Any) -> str:
    """Prompt + delimiter + gold answer (the chosen option of a multiple-choice task)."""
    text, target = task.doc_to_text(doc), task.doc_to_target(doc)
    if task.config.output_type == "multiple_choice":
        choices = task.doc_to_choice(doc)
        target = choices[target] if isinstance(target, int) else target
    if isinstance(target, list):
        target = target[0]
    return f"{text}{task.config.target_delimiter}{target}"
