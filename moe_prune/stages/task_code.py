"""A task folder is code like a checkpoint's: what `eval --tasks` refuses without --trust-remote-code.

Code runs only from the tasks shipped with moe-prune or lm-eval: `check_task_yamls` refuses a user YAML's
code constructs (`!function`, an `include:` outside the folder, a metric HF evaluate would load as a script,
a dataset loader script), and `sandboxed_templates` renders every Jinja template in jinja2's immutable
sandbox.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_prune.artifacts.common import decode_utf8, read_capped
from moe_prune.demo import DEMO_DIR
from moe_prune.errors import MoePruneError

DEMO_TASKS_DIR: Path = DEMO_DIR / "tasks"
# A task YAML is a few KB; larger ones are refused unread.
TASK_YAML_BYTES = 1 << 20


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

    blob, name = read_capped(path, "task YAML", TASK_YAML_BYTES)  # a pipe or /dev/zero is refused, not read
    try:
        return yaml.load(decode_utf8(blob, name, "task YAML"), Loader=_tagged_loader())
    except (yaml.YAMLError, OSError) as exc:
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
    with patched(lm_eval.utils, "env", sandbox):
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


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
