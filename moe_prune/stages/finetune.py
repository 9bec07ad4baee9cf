"""`finetune`: next-token training of a (pruned or merged) MoE on a token budget, built on `accelerate`.

Data: chunks of a text corpus (`--format text`): one source, or a mix of sources by share of the tokens
trained (`data` a list of `SOURCE[:SHARE]`, see `runtime.sources` and `training.text`); or prompt/response
records of one JSONL file with the loss on response tokens only (`--format chat|completion`, supervised
instruction recovery; see `training.sft`). The result and the manifest's history entry list every source
with its share and tokens.

The same code runs on CPU, one GPU, or many processes under `accelerate launch` (DDP, FSDP or DeepSpeed
from an accelerate config): each process trains on its own slice of every step's batch (see
`training.batches`), gradients are averaged by the wrapper. Loss = next-token cross-entropy
+ entropy_weight × mean router entropy (SEER-MoE 3.3.2) + aux_loss_weight × the family's own
load-balancing loss. AdamW, linear warm-up then cosine decay, gradient clipping, all seeded.

The output is a standard checkpoint (resharded safetensors, the input's tensor names and dtype, its
config with the final top-k, tokenizer and side files, `moe_prune.json` with a "finetune" history
entry). Unfinished runs save resumable state beside the output (`training.state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.architectures.config import ModelConfig
from moe_prune.runtime.data_plan import DataLike
from moe_prune.runtime.data_plan import parse_data as parse_data
from moe_prune.runtime.loading import load_model
from moe_prune.runtime.shares import SourceSpec
from moe_prune.stages.finetune_setup import (
    _accelerator,
    _Data,
    _held,
    _load,
    _optimizer,
    _Plan,
    _plan,
    _warnings,
    _work,
)
from moe_prune.stages.finetune_write import _save_state, _write
from moe_prune.stages.tasks import TASK_PREFIX as TASK_PREFIX  # its `task:` reader registered, to refuse it
from moe_prune.training.batches import BatchPlan
from moe_prune.training.freeze import group_members, members_of, select_trainable
from moe_prune.training.heldout import HeldOut, measure
from moe_prune.training.loop import TrainingLoop
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.sft import check_records_source as check_records_source


@dataclass
class Progress:
    """One report to the progress callback: phase is 'before', 'train', 'after' or 'saving'."""

    phase: str
    step: int
    total: int
    loss: float | None = None
    tokens: int = 0  # tokens trained so far in this invocation (all processes)
    seconds: float = 0.0  # wall time spent training in this invocation


ProgressFn = Callable[[Progress], None]


@dataclass
class FinetuneResult:
    """What a finetuning run did; `before`/`after` are held-out measurements."""

    out: Path
    model: str
    data: str | list[str]  # `--data` as given: one value, or every value of a mix
    sources: list[dict[str, Any]] | None  # text: every source with its share and tokens in the rows; else None
    eval_data: str
    format: str  # text, chat or completion
    eval_format: str  # the training format for --eval-data, text for the default held-out set
    steps: int
    resumed_from: int
    seq_len: int
    tokens_per_step: int
    tokens_trained: int  # sequence slots (batch × seq-len per row, padding included)
    loss_tokens: int  # tokens that carried loss in this invocation (response tokens for chat/completion)
    epochs: float
    processes: int
    trainable_params: int
    total_params: int
    train_loss_first: float | None
    train_loss_last: float | None
    before: HeldOut | None
    after: HeldOut | None
    warnings: list[str] = field(default_factory=list)
    main_process: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["out"] = str(self.out)
        out.pop("main_process")
        return out


def run(
    model: str | Path,
    data: DataLike,
    out: str | Path,
    options: FinetuneOptions | None = None,
    progress: ProgressFn | None = None,
) -> FinetuneResult:
    """Finetune `model` on `data` (one `SOURCE[:SHARE]` or several) and write the result to `out` (see the
    module docstring). The main process holds `out` (`work_lock`) from the checks to the end, the others wait for its
    decision (`_held`): a second run on the same output, which would share its resume folder, is refused
    in every process before it writes anything."""
    options = options or FinetuneOptions()
    out = Path(out).expanduser().absolute()
    specs = list(parse_data(data))  # parsed once (already parsed `SourceSpec`s are taken as they are)
    given: str | list[str] = specs[0].given if len(specs) == 1 else [s.given for s in specs]
    accelerator = _accelerator(options)
    main = accelerator.is_main_process
    report = progress if (progress is not None and main) else (lambda p: None)
    plan = _plan(model, out, options, accelerator.num_processes, specs)
    with _held(out, accelerator):
        return _train(model, out, options, accelerator, report, plan, specs, given)


def _loop(
    accelerator: Any, inner: Any, plan: _Plan, options: FinetuneOptions, data: _Data, batches: BatchPlan
) -> TrainingLoop:
    """What trains, the optimizer, both prepared by accelerate, and the loop over them."""
    config = plan.ckpt.config
    groups = options.train + (("router",) if options.router_warmup_steps and "router" not in options.train else ())
    names = select_trainable(inner, config, groups)
    routers = set(group_members(inner, config, "router"))
    selected = members_of(inner, config, options.train)
    optimizer = _optimizer(inner, names, options)
    wrapped, optimizer = accelerator.prepare(inner, optimizer)
    return TrainingLoop(
        accelerator=accelerator,
        wrapped=wrapped,
        inner=accelerator.unwrap_model(wrapped),
        config=config,
        optimizer=optimizer,
        data=data.loaded.sequences,
        batches=batches,
        options=options,
        steps=plan.steps,
        top_k=(plan.top_k_start, plan.top_k_end),
        trainable=names,
        routers=routers,
        selected=selected,
    )


def _measure(
    phase: str,
    report: ProgressFn,
    models: tuple[Any, Any],
    config: ModelConfig,
    top_k: int,
    data: _Data,
    options: FinetuneOptions,
    accelerator: Any,
    model: str | Path,
) -> HeldOut | None:
    """The held-out measurement `phase` ('before' or 'after' training) when --eval-tokens asks for one;
    `models`: (the model to run, the unwrapped one)."""
    if data.eval_rows is None:
        return None
    report(Progress(phase, 0, 1))
    return measure(*models, config, data.eval_rows, options.batch_size, top_k, accelerator.device, model)


def _train(
    model: str | Path,
    out: Path,
    options: FinetuneOptions,
    accelerator: Any,
    report: ProgressFn,
    plan: _Plan,
    specs: list[SourceSpec],
    given: str | list[str],
) -> FinetuneResult:
    """The run itself, once the options are checked and the output is held."""
    from accelerate.utils import set_seed

    config = plan.ckpt.config
    work = _work(out, options)
    data = _load(plan, specs, options, accelerator.num_processes)
    start_step = work.check_resumable(data.fingerprint) if options.resume else 0
    if accelerator.is_main_process and work.exists() and not options.resume:
        work.remove()  # --force: the old interrupted run is discarded
    accelerator.wait_for_everyone()

    set_seed(options.seed)
    inner = load_model(plan.ckpt, "float32", trust_remote_code=options.trust_remote_code).to(accelerator.device)
    rows = len(data.loaded.sequences)
    batches = BatchPlan(rows, options.batch_size, options.grad_accum, accelerator.num_processes, options.seed)
    epochs = batches.epochs(plan.steps)
    data.warnings += _warnings(plan, options, rows, epochs)
    before = _measure("before", report, (inner, inner), config, config.top_k, data, options, accelerator, model)
    loop = _loop(accelerator, inner, plan, options, data, batches)
    if start_step:
        accelerator.load_state(str(work.state_dir(start_step)))

    def on_step(done: int, loss: float, elapsed: float) -> None:
        report(Progress("train", done, plan.steps, loss, (done - start_step) * plan.tokens_per_step, elapsed))
        if options.save_every and done % options.save_every == 0 and done < plan.steps:
            _save_state(accelerator, work, done, data.fingerprint)

    report(Progress("train", start_step, plan.steps))
    losses, current_k, loss_tokens = loop.run(start_step, on_step)
    models = (loop.wrapped, loop.inner)
    after = _measure("after", report, models, config, current_k, data, options, accelerator, model)
    report(Progress("saving", 0, 1))
    provenance = {"data": given, "sources": data.loaded.sources}
    _write(accelerator, loop.wrapped, loop.inner, plan.ckpt, model, provenance, out, options, plan, current_k)
    if accelerator.is_main_process:
        work.remove()
    accelerator.wait_for_everyone()
    trained = (start_step, epochs, losses, loss_tokens)
    return _result(model, out, options, accelerator, plan, data, given, loop, trained, (before, after))


def _result(
    model: str | Path,
    out: Path,
    options: FinetuneOptions,
    accelerator: Any,
    plan: _Plan,
    data: _Data,
    given: str | list[str],
    loop: TrainingLoop,
    trained: tuple[int, float, list[float], int],
    measured: tuple[HeldOut | None, HeldOut | None],
) -> FinetuneResult:
    """The run's record; `trained`: (resumed from, epochs, losses, loss tokens), `measured`: (before, after)."""
    start_step, epochs, losses, loss_tokens = trained
    params = dict(loop.inner.named_parameters())
    return FinetuneResult(
        out=out,
        model=str(model),
        data=given,
        sources=data.loaded.sources,
        eval_data=data.eval_source,
        format=options.format,
        eval_format=data.eval_format,
        steps=plan.steps,
        resumed_from=start_step,
        seq_len=plan.seq_len,
        tokens_per_step=plan.tokens_per_step,
        tokens_trained=plan.steps * plan.tokens_per_step,
        loss_tokens=loss_tokens,
        epochs=epochs,
        processes=accelerator.num_processes,
        trainable_params=sum(params[n].numel() for n in loop.trainable),
        total_params=sum(p.numel() for p in loop.inner.parameters()),
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        before=measured[0],
        after=measured[1],
        warnings=data.warnings,
        main_process=accelerator.is_main_process,
    )


__all__ = ["FinetuneOptions", "FinetuneResult", "Progress", "ProgressFn", "run"]
