"""A task's own documents as calibration text: `--data task:NAME` (or `profile --task NAME`).

UNCURL and SEER-MoE prune for a task with statistics of that task's data. The `task:` reader is registered
with the data plans (`runtime.readers`) when this module is imported (`stages.tasks` re-exports it), so a
plan that reads prefixed sources (profile's, allocate's) reads tasks, and the others refuse them in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_prune.errors import MoePruneError
from moe_prune.runtime.readers import Reading, register_reader
from moe_prune.stages.task_code import check_task_yamls, sandboxed_templates
from moe_prune.stages.task_harness import check_tasks, import_lm_eval, quiet_lm_eval, require_lm_eval, task_manager

if TYPE_CHECKING:
    from moe_prune.runtime.shares import SourceSpec
    from moe_prune.runtime.sources import SourceData

TASK_PREFIX = "task:"  # `--data task:NAME` (or `profile --task NAME`): a task's own documents as calibration text


@register_reader(TASK_PREFIX)
def task_source(spec: SourceSpec, max_chars: int, reading: Reading) -> SourceData:
    """`task:NAME` in a data plan: the task's own documents (`calibration_texts`), read whole."""
    from moe_prune.runtime.sources import SourceData  # torch: only when a plan reads a task

    texts, split = calibration_texts(spec.source[len(TASK_PREFIX) :], reading.include_path, reading.trust_remote_code)
    return SourceData(spec, list(texts), split)


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
    import_lm_eval()
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
