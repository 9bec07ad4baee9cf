"""The `moe-prune` command line: one module per subcommand, each a thin wrapper over a stage."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from moe_prune.cli import allocate as allocate_cmd
from moe_prune.cli import eval as eval_cmd
from moe_prune.cli import finetune as finetune_cmd
from moe_prune.cli import lottery as lottery_cmd
from moe_prune.cli import merge as merge_cmd
from moe_prune.cli import profile as profile_cmd
from moe_prune.cli import prune as prune_cmd
from moe_prune.cli import score as score_cmd
from moe_prune.cli import sweep as sweep_cmd
from moe_prune.cli.common import DEBUG_ENV, click_exceptions, err_console


class _FlagsTakeNoValue:
    """Yes/no flags (`--force`) take no value: typer's help would show `--force <bool>`, inviting `--force true`."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""  # the help panel prints a metavar in place of the type
        return params


class _Command(_FlagsTakeNoValue, TyperCommand):
    """Every subcommand."""


class _OneLineUsageErrors(_FlagsTakeNoValue, TyperGroup):
    """Usage errors (an unknown option, a value of the wrong type) are one line and exit 1, like every failure.

    click prints a usage box over several lines and exits 2; scripts and CI read the one line instead.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click_exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click_exceptions.UsageError as exc:
            where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
            err_console.print(
                f"[bold red]error:[/] {escape(where + exc.format_message())}", highlight=False, soft_wrap=True
            )
            sys.exit(1)
        except typer.Abort:
            err_console.print("[bold red]aborted[/]")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="moe-prune",
    cls=_OneLineUsageErrors,
    help="Make Mixture-of-Experts language models smaller by dropping or merging whole experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of a failure (for bug reports).")
    ] = False,
) -> None:
    """Options of every subcommand, given before it: `moe-prune --debug prune ...`.

    `--debug` lasts for this invocation only: the environment is restored when the command ends, so a
    program (or test) that calls the app twice in one process does not keep tracebacks on.
    """
    if debug:
        before = os.environ.get(DEBUG_ENV)
        os.environ[DEBUG_ENV] = "1"
        ctx.call_on_close(lambda: _restore(DEBUG_ENV, before))


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


app.command("profile", help=profile_cmd.__doc__, cls=_Command)(profile_cmd.profile)
app.command("score", help=score_cmd.__doc__, cls=_Command)(score_cmd.score)
app.command("allocate", help=allocate_cmd.__doc__, cls=_Command)(allocate_cmd.allocate)
app.command("prune", help=prune_cmd.__doc__, cls=_Command)(prune_cmd.prune)
app.command("merge", help=merge_cmd.__doc__, cls=_Command)(merge_cmd.merge)
app.command("finetune", help=finetune_cmd.__doc__, cls=_Command)(finetune_cmd.finetune)
app.command("lottery", help=lottery_cmd.__doc__, cls=_Command)(lottery_cmd.lottery)
app.command("eval", help=eval_cmd.__doc__, cls=_Command)(eval_cmd.evaluate)
app.command("sweep", help=sweep_cmd.__doc__, cls=_Command)(sweep_cmd.sweep)


def main() -> None:
    """Console-script entry point."""
    app()
