"""Next-token finetuning on a token budget: recover a pruned or merged model, optionally at a lower top-k;
on text (one source or a mix by share), or on prompt/response records with the loss on the responses
(`--format chat|completion`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    JsonOpt,
    LazyBar,
    ModelArg,
    OutDirOpt,
    TextDataOpt,
    err_console,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.finetune import FinetuneSpec
from moe_prune.stages.common import DEMO_CALIBRATION, check_not_input

if TYPE_CHECKING:
    from moe_prune.stages.finetune import FinetuneResult


@user_errors
@takes_spec(FinetuneSpec, "options")
def finetune(
    out: OutDirOpt,
    model: ModelArg = DEFAULT_MODEL,
    data: TextDataOpt = None,
    *,
    options: FinetuneSpec,  # one option per field (cli/spec_options.py)
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import finetune as stage
    from moe_prune.stages.finetune import check_records_source, parse_data

    options.check()  # before accelerate is set up: a bad option must not reach it
    if not data and options.format != "text":
        raise MoePruneError(f"--format {options.format} needs --data FILE (JSONL records; the demo data is plain text)")
    given = data or [str(DEMO_CALIBRATION)]
    specs = parse_data(given)  # parsed once: the stage takes these, not the strings
    check_records_source(specs, options.format)
    sources = tuple(spec.source for spec in specs)
    eval_data = options.eval_data
    with _training_bar() as bar:
        try:
            check_not_input(out, (model, *sources, *([eval_data] if eval_data else [])))
            result = stage.run(model, specs, out, options, progress=lambda p: _report(bar, p))
        except KeyboardInterrupt as exc:
            bar.stop()
            err_console.print("[bold red]interrupted[/]; continue from the last saved state with --resume")
            raise typer.Exit(130) from exc
    if not result.main_process:
        return
    for message in result.warnings:
        warn(message)
    if json_output:
        print_json(result.to_dict())
        return
    _print(result)


def _training_bar() -> LazyBar:
    """Loss, tokens/s and ETA over optimizer steps (held-out scoring and saving shown as phases)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    return LazyBar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeRemainingColumn(),
    )


def _report(bar: LazyBar, p: Any) -> None:
    labels = {"before": "scoring held-out", "after": "scoring held-out", "saving": "saving"}
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    speed = f"{p.tokens / p.seconds:,.0f}" if p.seconds > 0 else "-"
    description = labels.get(p.phase, "training (steps)")
    bar.update("run", description, completed=p.step, total=p.total, loss=loss, speed=speed)


def _print(r: FinetuneResult) -> None:
    out_console.print(
        f"finetuned [bold]{r.model}[/] → {r.out}: {r.steps} steps × {r.tokens_per_step:,} tokens "
        f"= {r.tokens_trained:,} tokens ({r.epochs:.2f} epochs), {r.loss_tokens:,} {_loss_tokens(r.format)}, "
        f"{r.trainable_params:,} of {r.total_params:,} parameters trained"
        + (f", resumed at step {r.resumed_from}" if r.resumed_from else ""),
        highlight=False,
    )
    if isinstance(r.data, list) and r.sources:
        from moe_prune.cli.profile import sources_table

        out_console.print(sources_table(r.sources))
    if r.before is None or r.after is None:
        return
    scored = "" if r.eval_format == "text" else ", loss on response tokens"
    table = Table(title=f"held-out ({r.eval_data}{scored})", title_justify="left")
    for name in ("", "before", "after"):
        table.add_column(name, justify="left" if not name else "right")
    table.add_row("loss", f"{r.before.loss:.4f}", f"{r.after.loss:.4f}")
    table.add_row("perplexity", *(_ppl(h.loss) for h in (r.before, r.after)))
    table.add_row("top-k", str(r.before.top_k), str(r.after.top_k))
    table.add_row("router entropy (nats)", f"{r.before.router_entropy:.3f}", f"{r.after.router_entropy:.3f}")
    out_console.print(table)
    load = Table(title="expert load balance (max/mean tokens per expert · entropy H/log E)", title_justify="left")
    for name in ("layer", "max/mean before", "max/mean after", "entropy before", "entropy after"):
        load.add_column(name, justify="right")
    for b, a in zip(r.before.load, r.after.load, strict=True):
        load.add_row(
            str(b.layer), f"{b.max_over_mean:.2f}", f"{a.max_over_mean:.2f}", f"{b.entropy:.3f}", f"{a.entropy:.3f}"
        )
    out_console.print(load)


def _loss_tokens(data_format: str) -> str:
    return "tokens with loss" if data_format == "text" else "response tokens with loss (padding and prompts excluded)"


def _ppl(loss: float) -> str:
    import math

    return f"{math.exp(loss):.3f}" if loss < 700 else "inf"
