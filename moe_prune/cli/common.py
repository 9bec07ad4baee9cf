"""What every subcommand shares: option types, error rendering, JSON vs Rich output."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.specs.groups import data_help
from moe_prune.specs.parse import MAX_SEED as MAX_SEED  # every --seed's range
from moe_prune.stages.common import DEMO_MODEL_DIR

try:  # typer vendors its own click (its exceptions are not click's)
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer: plain click
    from click import exceptions as click_exceptions

out_console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    str, typer.Argument(help="Model folder or hub id (default: the shipped demo model).", show_default=False)
]
DEFAULT_MODEL = str(DEMO_MODEL_DIR)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def _data_option(tasks: bool) -> Any:
    """`--data`, offering task:NAME only where the command reads tasks (through profile's reader)."""
    return typer.Option(
        "--data",
        "-d",
        help=data_help(tasks),
        metavar="SOURCE[:SHARE]",
        show_default=False,
    )


DataOpt = Annotated[list[str] | None, _data_option(tasks=True)]  # profile, allocate
TextDataOpt = Annotated[list[str] | None, _data_option(tasks=False)]  # finetune, lottery: they refuse task:NAME
OutDirOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output checkpoint folder (must not exist unless --force).")
]


DEBUG_ENV = "MOE_PRUNE_DEBUG"


def debugging() -> bool:
    """Full tracebacks for bug reports: `moe-prune --debug ...` or MOE_PRUNE_DEBUG=1."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _fail(message: str) -> typer.Exit:
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(1)


def user_errors(fn: F) -> F:
    """One line on stderr and exit code 1 for every failure, never a traceback (unless debugging).

    MoePruneError is the user's input; OSError is the machine (read-only folder, full disk), named by path;
    anything else is a bug in moe-prune, reported in one line with the way to get the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", MoePruneWarning)
                result = fn(*args, **kwargs)
            for message in dict.fromkeys(
                str(w.message) if w.category is MoePruneWarning else f"{w.category.__name__}: {w.message}"
                for w in caught
                if w.category is MoePruneWarning or debugging()  # library warnings only when debugging
            ):
                warn(message)
            return result
        except (typer.Exit, typer.Abort, click_exceptions.ClickException):
            raise
        except KeyboardInterrupt as exc:
            err_console.print("[bold red]interrupted[/]; outputs were not written")
            raise typer.Exit(130) from exc
        except Exception as exc:
            if debugging():
                raise
            raise _fail(escape(describe(exc))) from exc

    return wrapper  # type: ignore[return-value]


def describe(exc: BaseException) -> str:
    """The one line a failure is reported as."""
    if isinstance(exc, MoePruneError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"unexpected {type(exc).__name__}: {first} (a bug in moe-prune: rerun with --debug "
        f"or {DEBUG_ENV}=1 for the traceback and report it)"
    )


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


class LazyBar:
    """The one way commands draw progress: a transient Rich bar on stderr, started at the first update.

    Started late so a command that fails before any work prints its one error line and no bar (Rich's
    stop prints a newline even for a bar never shown); `update(key, ...)` adds a task per key.
    """

    def __init__(self, *columns: Any) -> None:
        self.bar = Progress(*columns, console=err_console, transient=True)
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> LazyBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.tasks:
            self.bar.stop()
            self.tasks.clear()

    def update(self, key: str = "", description: str | None = None, **fields: Any) -> None:
        """Advance task `key` (`completed=`, `total=`, and the columns' own fields), creating it first."""
        if not self.tasks:
            self.bar.start()
        if key not in self.tasks:
            extra = {k: v for k, v in fields.items() if k not in ("completed", "total")}
            self.tasks[key] = self.bar.add_task(description or key, total=fields.get("total"), **extra)
        if description is not None:
            fields["description"] = description
        self.bar.update(self.tasks[key], **fields)

    def speed(self, key: str = "") -> float | None:
        task = self.tasks.get(key)
        return None if task is None else self.bar.tasks[self.bar.task_ids.index(task)].speed


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A bar fed by `update(done_bytes, total_bytes)`."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with LazyBar(*columns, TimeRemainingColumn()) as bar:
        yield lambda done, total: bar.update(description, completed=done, total=total)
