"""lm-evaluation-harness (an optional dependency) behind one door: import, silence, find and check tasks.

Task names resolve against the shipped demo suite (`moe_prune/demo/tasks`, group `demo`), `--include-path`
and, only when a name is not found there, lm-eval's own registry (indexing it takes seconds). lm-eval's
logging, warnings and tqdm bars are silenced: errors surface as one `MoePruneError` line. Every task is
built and its documents rendered before a model is loaded, so a bad task fails first.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe_prune.errors import MoePruneError
from moe_prune.stages.task_code import DEMO_TASKS_DIR, patched, template_refusal

INSTALL_HINT = "task evaluation needs lm-evaluation-harness: pip install 'moe-prune[tasks]' (or lm-eval==0.4.13)"
_OFFLINE_ERRORS = ("ConnectionError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "DatasetNotFoundError")


def require_lm_eval() -> None:
    """Fail with the install command (one line) when the optional dependency is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MoePruneError(INSTALL_HINT)


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
                stack.enter_context(patched(module, "tqdm", silent))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)
            if bars:
                datasets.enable_progress_bars()


def import_lm_eval() -> None:
    """Import lm-eval's modules once, quietly (importing them logs and warns)."""
    require_lm_eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("lm_eval").setLevel(logging.CRITICAL)
        import lm_eval.api.task
        import lm_eval.evaluator
        import lm_eval.models.huggingface  # noqa: F401


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
