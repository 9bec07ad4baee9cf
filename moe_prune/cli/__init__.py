"""The `moe-prune` command line: one module per subcommand, each a thin wrapper over a stage."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from moe_prune.cli import eval as eval_cmd
from moe_prune.cli import finetune as finetune_cmd
from moe_prune.cli import lottery as lottery_cmd
from moe_prune.cli import merge as merge_cmd
from moe_prune.cli import profile as profile_cmd
from moe_prune.cli import prune as prune_cmd
from moe_prune.cli import score as score_cmd
from moe_prune.cli.common import DEBUG_ENV

app = typer.Typer(
    name="moe-prune",
    help="Make Mixture-of-Experts language models smaller by dropping or merging whole experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback of a failure (for bug reports).")
    ] = False,
) -> None:
    """Options of every subcommand, given before it: `moe-prune --debug prune ...`."""
    if debug:
        os.environ[DEBUG_ENV] = "1"


app.command("profile", help=profile_cmd.__doc__)(profile_cmd.profile)
app.command("score", help=score_cmd.__doc__)(score_cmd.score)
app.command("prune", help=prune_cmd.__doc__)(prune_cmd.prune)
app.command("merge", help=merge_cmd.__doc__)(merge_cmd.merge)
app.command("finetune", help=finetune_cmd.__doc__)(finetune_cmd.finetune)
app.command("lottery", help=lottery_cmd.__doc__)(lottery_cmd.lottery)
app.command("eval", help=eval_cmd.__doc__)(eval_cmd.evaluate)


def main() -> None:
    """Console-script entry point."""
    app()
