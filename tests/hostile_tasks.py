"""Hostile cases: a task folder (--include-path) that carries code; refused without --trust-remote-code.

Each folder holds one YAML task `evil` over the demo arithmetic data (plain JSON files, no code needed)
plus one construct that would write the workspace's marker file if lm-eval were let to run it.
`tests/test_tasks.py` runs the same folders with --trust-remote-code and sees the marker appear, so
these cases can fail.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hostile import Workspace, hostile

from moe_prune.demo import DEMO_DIR

DATA = DEMO_DIR / "tasks" / "data"
TASK = "evil"


def base_yaml(name: str = TASK) -> str:
    """A code-free multiple-choice task over the demo arithmetic JSONL files."""
    return (
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    train: {DATA / 'arithmetic_train.jsonl'}\n"
        f"    test: {DATA / 'arithmetic_test.jsonl'}\n"
        "output_type: multiple_choice\n"
        "training_split: train\n"
        "test_split: test\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\n"
        'target_delimiter: " "\n'
    )


def marker_python(marker: Path) -> str:
    """A module that writes `marker` when imported, and an identity `process_docs`."""
    write = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    return write + "def process_docs(docs):\n    return docs\n"


def _function(folder: Path, marker: Path) -> None:
    (folder / "utils.py").write_text(marker_python(marker))
    (folder / f"{TASK}.yaml").write_text(base_yaml() + "process_docs: !function utils.process_docs\n")


def _jinja(folder: Path, marker: Path) -> None:
    # Reaches Python's builtins through a Jinja global's function globals (an unsandboxed Environment).
    escape = f"{{% set _ = cycler.__init__.__globals__.__builtins__['open']('{marker}', 'w').write('ran') %}}"
    text = base_yaml().replace('doc_to_text: "{{context}}"', f'doc_to_text: "{escape}{{{{context}}}}"')
    (folder / f"{TASK}.yaml").write_text(text)


def _include(folder: Path, marker: Path) -> None:
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "utils.py").write_text(marker_python(marker))
    (elsewhere / "base.yaml").write_text(base_yaml("base") + "process_docs: !function utils.process_docs\n")
    (folder / f"{TASK}.yaml").write_text(f"include: ../elsewhere/base.yaml\ntask: {TASK}\n")


def _metric(folder: Path, marker: Path) -> None:
    # A metric lm-eval does not register goes to `evaluate.load`, which imports a local script.
    (folder / "metric.py").write_text(marker_python(marker))
    metric = f"metric_list:\n  - metric: {folder / 'metric.py'}\n    aggregation: mean\n    higher_is_better: true\n"
    (folder / f"{TASK}.yaml").write_text(base_yaml() + metric)


# construct -> (writer of the task folder, what the refusal line names)
TASK_CODE: dict[str, Callable[[Path, Path], None]] = {
    "function": _function,
    "jinja": _jinja,
    "include-outside": _include,
    "metric-script": _metric,
}

# Every command that reads a task, as the extra arguments that make it read `evil` from {root}/tasks.
TASK_READERS = {
    "eval": ("--tasks", TASK, "--include-path", "{root}/tasks", "--limit", "2"),
    "profile": ("--data", f"task:{TASK}", "--include-path", "{root}/tasks"),
    "sweep": ("--tasks", TASK, "--include-path", "{root}/tasks", "--limit", "2"),
}


def _register(construct: str, command: str) -> None:
    def build(ws: Workspace) -> None:
        folder = ws.root / "tasks"
        folder.mkdir()
        TASK_CODE[construct](folder, ws.marker)

    hostile(f"task-code-{construct}-{command}", (command,), f"{TASK}.yaml", extra=TASK_READERS[command])(build)


for _construct in TASK_CODE:
    for _command in TASK_READERS:
        _register(_construct, _command)
