"""Next-token finetuning on a token budget: recover a pruned or merged model, optionally at a lower top-k;
on text (one source or a mix by share), or on prompt/response records with the loss on the responses
(`--format chat|completion`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    MAX_SEED,
    ForceOpt,
    JsonOpt,
    LazyBar,
    ModelArg,
    OutDirOpt,
    SplitOnOpt,
    TextDataOpt,
    TrustOpt,
    err_console,
    out_console,
    parse_tokens,
    print_json,
    user_errors,
    warn,
)
from moe_prune.errors import MoePruneError
from moe_prune.stages.common import DEMO_CALIBRATION, check_not_input

if TYPE_CHECKING:
    from moe_prune.stages.finetune import FinetuneResult

TRAIN = "Training"
ROUTING = "Routing"
STATE = "Checkpoints"


@user_errors
def finetune(
    out: OutDirOpt,
    model: ModelArg = DEFAULT_MODEL,
    data: TextDataOpt = None,
    data_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="text: every token of --data trains (repeat --data to mix sources by share); completion: JSONL "
            "prompt/completion, loss on the completion; chat: JSONL messages, loss on assistant turns (chat "
            "template if the tokenizer has one); both read one --data file, without a share.",
            rich_help_panel=TRAIN,
        ),
    ] = "text",
    eos: Annotated[
        bool,
        typer.Option(
            "--eos/--no-eos",
            help="chat/completion: end each example with EOS, which carries loss (the model learns to stop); "
            "--no-eos for continuation data (a chat template ends turns its own way).",
            rich_help_panel=TRAIN,
        ),
    ] = True,
    tokens: Annotated[
        str,
        typer.Option(
            help="Token budget, e.g. 1M, 250k (chat/completion: --seq-len per example).", rich_help_panel=TRAIN
        ),
    ] = "1M",
    seq_len: Annotated[
        int,
        typer.Option(
            help="Tokens per sequence (chat/completion: longer examples keep their first ones).", rich_help_panel=TRAIN
        ),
    ] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch per process.", rich_help_panel=TRAIN)] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", rich_help_panel=TRAIN)] = 1,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.", rich_help_panel=TRAIN)] = 1e-5,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay (2-D weights).", rich_help_panel=TRAIN)
    ] = 0.01,
    warmup_ratio: Annotated[
        float, typer.Option(help="Share of steps of linear warm-up before cosine decay.", rich_help_panel=TRAIN)
    ] = 0.05,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping (0: off).", rich_help_panel=TRAIN)] = 1.0,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of data order and randomness.", rich_help_panel=TRAIN)
    ] = 0,
    train: Annotated[
        str, typer.Option(help="What trains: all, router, experts, attention (comma-separated).", rich_help_panel=TRAIN)
    ] = "all",
    router_warmup_steps: Annotated[
        int, typer.Option(help="Train only the routers for this many steps first.", rich_help_panel=TRAIN)
    ] = 0,
    mixed_precision: Annotated[
        str | None, typer.Option(help="no, bf16 or fp16 (default: accelerate's config).", rich_help_panel=TRAIN)
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Route to k experts (static).", rich_help_panel=ROUTING)] = None,
    top_k_anneal: Annotated[
        str | None, typer.Option(help="FROM:TO, top-k lowered linearly over the run.", rich_help_panel=ROUTING)
    ] = None,
    entropy_weight: Annotated[
        float, typer.Option(help="Weight of the mean router entropy in the loss.", rich_help_panel=ROUTING)
    ] = 0.0,
    aux_loss_weight: Annotated[
        float, typer.Option(help="Weight of the family's load-balancing loss.", rich_help_panel=ROUTING)
    ] = 0.0,
    text_field: Annotated[str, typer.Option(help="Field/column holding the text in structured data.")] = "text",
    split_on: SplitOnOpt = "none",
    eval_data: Annotated[
        str | None,
        typer.Option(help="Held-out data for the before/after table, in --format (default: demo held-out text)."),
    ] = None,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens scored before and after (0: skip).")] = 16384,
    save_every: Annotated[
        int, typer.Option(help="Save resumable state every N steps (0: never).", rich_help_panel=STATE)
    ] = 0,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the interrupted run of this --out.", rich_help_panel=STATE)
    ] = False,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output shard, e.g. 5GB, 500MB.", rich_help_panel=STATE)
    ] = "5GB",
    trust_remote_code: TrustOpt = False,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import finetune as stage
    from moe_prune.stages.finetune import (
        FinetuneOptions,
        check_records_source,
        parse_anneal,
        parse_data,
        parse_train,
    )

    options = FinetuneOptions(
        tokens=parse_tokens(tokens),
        seq_len=seq_len,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        max_grad_norm=max_grad_norm,
        seed=seed,
        train=parse_train(train),
        router_warmup_steps=router_warmup_steps,
        top_k=top_k,
        top_k_anneal=parse_anneal(top_k_anneal) if top_k_anneal else None,
        entropy_weight=entropy_weight,
        aux_loss_weight=aux_loss_weight,
        mixed_precision=mixed_precision,
        text_field=text_field,
        split_on=split_on,
        format=data_format,
        eos=eos,
        eval_data=eval_data,
        eval_tokens=eval_tokens,
        save_every=save_every,
        max_shard_size=max_shard_size,
        force=force,
        resume=resume,
        trust_remote_code=trust_remote_code,
    )
    options.check()  # before accelerate is set up: a bad option must not reach it
    if not data and data_format != "text":
        raise MoePruneError(f"--format {data_format} needs --data FILE (JSONL records; the demo data is plain text)")
    given = data or [str(DEMO_CALIBRATION)]
    specs = parse_data(given)  # parsed once: the stage takes these, not the strings
    check_records_source(specs, data_format)
    sources = tuple(spec.source for spec in specs)
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
