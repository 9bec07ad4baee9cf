"""What every subcommand shares: option types, error rendering, JSON vs Rich output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from moe_prune.demo import DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError

out_console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    str, typer.Argument(help="Model folder or hub id (default: the shipped demo model).", show_default=False)
]
DEFAULT_MODEL = str(DEMO_MODEL_DIR)
DEFAULT_DATA = str(DEMO_HELDOUT)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
OutDirOpt = Annotated[
    Path, typer.Option("--out", "-o", help="Output checkpoint folder (must not exist unless --force).")
]


def user_errors(fn: F) -> F:
    """Turn MoePruneError into one line on stderr and exit code 1; never a traceback for user errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MoePruneError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]; outputs were not written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


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


@contextmanager
def byte_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A Rich bar on stderr fed by `update(done_bytes, total_bytes)` (hidden when stderr is not a terminal)."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeRemainingColumn(), console=err_console, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
