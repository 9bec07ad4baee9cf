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

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.provenance import fingerprint_json
from moe_prune.checkpoint.quantized import Quantization
from moe_prune.checkpoint.relayout import restore_source_layout
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.writer import copy_side_files
from moe_prune.demo import DEMO_HELDOUT
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_folder, check_writable, work_lock
from moe_prune.runtime.data_plan import DataLike, refuse_prefixed
from moe_prune.runtime.data_plan import parse_data as parse_data
from moe_prune.runtime.loading import load_model, load_tokenizer
from moe_prune.runtime.shares import SourceSpec
from moe_prune.runtime.skeleton import quiet_transformers
from moe_prune.sizes import parse_size
from moe_prune.stages.tasks import TASK_PREFIX as TASK_PREFIX  # its `task:` reader registered, to refuse it
from moe_prune.training.batches import BatchPlan, Sequences
from moe_prune.training.freeze import group_members, members_of, select_trainable
from moe_prune.training.heldout import HeldOut, measure
from moe_prune.training.loop import TrainingLoop
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.sft import check_records_source as check_records_source
from moe_prune.training.sft import load_rows
from moe_prune.training.state import WorkFolder, work_folder
from moe_prune.training.text import Rows
from moe_prune.training.topk import check_top_k

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


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


@dataclass
class _Plan:
    """Everything decided before the model is loaded."""

    ckpt: Checkpoint
    seq_len: int
    steps: int
    tokens_per_step: int
    top_k_start: int
    top_k_end: int


def _plan(model: str | Path, out: Path, options: FinetuneOptions, processes: int, specs: Sequence[SourceSpec]) -> _Plan:
    """Validate options against the checkpoint: cheap checks first, so bad input costs nothing."""
    options.check()
    check_records_source(specs, options.format)
    refuse_prefixed(specs, "finetune")
    ckpt = Checkpoint.open(model)
    _ = ckpt.identity
    config = ckpt.config
    if out.resolve() == ckpt.folder.resolve():
        raise MoePruneError(f"{out}: is the input checkpoint; choose another output folder")
    check_writable(out, options.force, "folder")
    parse_size(options.max_shard_size, "--max-shard-size")
    start, end = options.top_k_anneal or (options.top_k or config.top_k,) * 2
    check_top_k(config, start, "--top-k-anneal" if options.top_k_anneal else "--top-k")
    check_top_k(config, end, "--top-k-anneal" if options.top_k_anneal else "--top-k")
    context = config.get("max_position_embeddings")
    seq_len = min(options.seq_len, context) if isinstance(context, int) and context > 0 else options.seq_len
    tokens_per_step = options.batch_size * options.grad_accum * processes * seq_len
    steps = options.tokens // tokens_per_step
    if steps == 0:
        raise MoePruneError(
            f"--tokens {options.tokens} is smaller than one optimizer step: batch {options.batch_size} × "
            f"accumulation {options.grad_accum} × {processes} process(es) × {seq_len} tokens = {tokens_per_step}"
        )
    return _Plan(ckpt, seq_len, steps, tokens_per_step, start, end)


def _accelerator(options: FinetuneOptions) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    kwargs: dict[str, Any] = {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}
    if options.mixed_precision is not None:
        kwargs["mixed_precision"] = options.mixed_precision
    try:
        return Accelerator(**kwargs)
    except (ValueError, RuntimeError) as exc:  # e.g. fp16 on a CPU
        raise MoePruneError(f"cannot set up training ({str(exc).strip().splitlines()[0]})") from exc


def _rows(
    data: str | list[SourceSpec],
    fmt: str,
    budget: int,
    tokenizer: Any,
    options: FinetuneOptions,
    seq_len: int,
    trained: int | None = None,
) -> Rows:
    fields = {"split_on": options.split_on, "trained": trained}
    return load_rows(data, fmt, tokenizer, seq_len, budget, options.text_field, options.eos, **fields)


def _fingerprint(
    plan: _Plan, data: Sequences, specs: list[SourceSpec], options: FinetuneOptions, processes: int
) -> dict[str, Any]:
    """What makes two runs the same run: input model, training tokens and the share asked of each source
    (not its path, which a resumed command may spell differently), settings, process count."""
    headers = json.dumps([[t.name, t.dtype, list(t.shape)] for t in plan.ckpt.tensors]).encode()
    model = {"config": plan.ckpt.config.fingerprint(), "tensors": "sha256:" + hashlib.sha256(headers).hexdigest()[:16]}
    shares = [{"share": None if s.share is None else str(s.share), "count": s.count} for s in specs]
    return fingerprint_json(
        {
            "model": model,
            "data": data.digest(),
            "shares": shares,
            "options": options.fingerprint_fields(),
            "processes": processes,
        }
    )


def _save_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The floating dtype holding most of the input's bytes: the output is written in it."""
    sizes: dict[str, int] = {}
    for info in ckpt.tensors:
        if info.dtype in SAFETENSORS_DTYPES:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.end - info.start
    return SAFETENSORS_DTYPES[max(sizes, key=sizes.get)] if sizes else torch.float32


def _optimizer(model: Any, names: list[str], options: FinetuneOptions) -> torch.optim.Optimizer:
    """AdamW; no weight decay on 1-D tensors (norms, biases), as usual."""
    params = dict(model.named_parameters())
    decay = [params[n] for n in names if params[n].ndim >= 2]
    plain = [params[n] for n in names if params[n].ndim < 2]
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=options.lr)


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


@contextmanager
def _held(out: Path, accelerator: Any) -> Iterator[None]:
    """The main process locks `out`; every other process waits for that decision (a broadcast, which is
    also a barrier) and, when the main process was refused, stops with the same line instead of training
    alone into collectives that never complete."""
    with ExitStack() as stack:
        refused: MoePruneError | None = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(work_lock(out))
            except MoePruneError as exc:
                refused = exc
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            decision = [str(refused) if refused is not None else None]
            broadcast_object_list(decision, from_process=0)
            if refused is None and decision[0] is not None:
                raise MoePruneError(decision[0])  # the main process's line; it names the run holding `out`
        if refused is not None:
            raise refused
        yield


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

    main = accelerator.is_main_process
    ckpt, config = plan.ckpt, plan.ckpt.config
    work = WorkFolder(work_folder(out))
    if work.exists() and not options.resume and not options.force:
        raise MoePruneError(
            f"{work.path}: an interrupted run of {out.name} is saved there; pass --resume to continue it "
            "or --force to discard it"
        )

    tokenizer = load_tokenizer(ckpt, options.trust_remote_code)
    trained = plan.steps * plan.tokens_per_step
    loaded = _rows(specs, options.format, options.tokens, tokenizer, options, plan.seq_len, trained)
    rows, warnings = loaded.sequences, list(loaded.warnings)
    eval_source = options.eval_data or str(DEMO_HELDOUT)
    eval_format = options.format if options.eval_data else "text"  # the default held-out set is plain text
    eval_rows = None
    if options.eval_tokens:
        held = _rows(eval_source, eval_format, options.eval_tokens, tokenizer, options, plan.seq_len)
        eval_rows = held.sequences
        warnings += held.warnings
    fingerprint = _fingerprint(plan, rows, specs, options, accelerator.num_processes)
    start_step = work.check_resumable(fingerprint) if options.resume else 0
    if main and work.exists() and not options.resume:
        work.remove()  # --force: the old interrupted run is discarded
    accelerator.wait_for_everyone()

    set_seed(options.seed)
    inner = load_model(ckpt, "float32", trust_remote_code=options.trust_remote_code).to(accelerator.device)
    batches = BatchPlan(len(rows), options.batch_size, options.grad_accum, accelerator.num_processes, options.seed)
    epochs = batches.epochs(plan.steps)
    if epochs > 1:
        held = f"{len(rows)} examples" if options.format != "text" else f"{len(rows) * plan.seq_len} tokens"
        warnings.append(f"the data holds {held}; the budget repeats it {epochs:.1f} times")
    if options.router_warmup_steps >= plan.steps:
        warnings.append(
            f"--router-warmup-steps {options.router_warmup_steps} covers the whole run of {plan.steps} steps"
        )
    if (quant := Quantization.from_config(config.raw)) is not None:
        warnings.append(
            f"the input is {quant.method.upper()}-quantized; it is trained dequantized and written dequantized "
            f"({str(_save_dtype(ckpt)).removeprefix('torch.')}, no quantization_config): re-quantize it to ship it"
        )

    before = None
    if eval_rows is not None:
        report(Progress("before", 0, 1))
        before = measure(inner, inner, config, eval_rows, options.batch_size, config.top_k, accelerator.device, model)

    groups = options.train + (("router",) if options.router_warmup_steps and "router" not in options.train else ())
    names = select_trainable(inner, config, groups)
    routers = set(group_members(inner, config, "router"))
    selected = members_of(inner, config, options.train)
    optimizer = _optimizer(inner, names, options)
    wrapped, optimizer = accelerator.prepare(inner, optimizer)
    inner = accelerator.unwrap_model(wrapped)
    if start_step:
        accelerator.load_state(str(work.state_dir(start_step)))

    loop = TrainingLoop(
        accelerator=accelerator,
        wrapped=wrapped,
        inner=inner,
        config=config,
        optimizer=optimizer,
        data=rows,
        batches=batches,
        options=options,
        steps=plan.steps,
        top_k=(plan.top_k_start, plan.top_k_end),
        trainable=names,
        routers=routers,
        selected=selected,
    )
    params = dict(inner.named_parameters())

    def on_step(done: int, loss: float, elapsed: float) -> None:
        report(Progress("train", done, plan.steps, loss, (done - start_step) * plan.tokens_per_step, elapsed))
        if options.save_every and done % options.save_every == 0 and done < plan.steps:
            _save_state(accelerator, work, done, fingerprint)

    report(Progress("train", start_step, plan.steps))
    losses, current_k, loss_tokens = loop.run(start_step, on_step)

    after = None
    if eval_rows is not None:
        report(Progress("after", 0, 1))
        after = measure(wrapped, inner, config, eval_rows, options.batch_size, current_k, accelerator.device, model)
    report(Progress("saving", 0, 1))
    provenance = {"data": given, "sources": loaded.sources}
    _write(accelerator, wrapped, inner, ckpt, model, provenance, out, options, plan, current_k)
    if main:
        work.remove()
    accelerator.wait_for_everyone()
    total_params = sum(p.numel() for p in inner.parameters())
    return FinetuneResult(
        out=out,
        model=str(model),
        data=given,
        sources=loaded.sources,
        eval_data=eval_source,
        format=options.format,
        eval_format=eval_format,
        steps=plan.steps,
        resumed_from=start_step,
        seq_len=plan.seq_len,
        tokens_per_step=plan.tokens_per_step,
        tokens_trained=plan.steps * plan.tokens_per_step,
        loss_tokens=loss_tokens,
        epochs=epochs,
        processes=accelerator.num_processes,
        trainable_params=sum(params[n].numel() for n in names),
        total_params=total_params,
        train_loss_first=losses[0] if losses else None,
        train_loss_last=losses[-1] if losses else None,
        before=before,
        after=after,
        warnings=warnings,
        main_process=main,
    )


def _save_state(accelerator: Any, work: WorkFolder, step: int, fingerprint: dict[str, Any]) -> None:
    """Resumable state after `step` steps: written by all processes, then committed by the main one."""
    if accelerator.is_main_process:
        work.path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(work.state_dir(step)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        work.commit(step, fingerprint)
    accelerator.wait_for_everyone()


def _write(
    accelerator: Any,
    wrapped: Any,
    inner: Any,
    ckpt: Checkpoint,
    model: str | Path,
    provenance: dict[str, Any],
    out: Path,
    options: FinetuneOptions,
    plan: _Plan,
    top_k: int,
) -> None:
    """The output checkpoint, written by the main process into a temp folder that then replaces `out`;
    `provenance`: --data as given and every source with its share and tokens (for the history entry)."""
    state = accelerator.get_state_dict(wrapped)  # gathers shards under FSDP / DeepSpeed: every process calls it
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    dtype = _save_dtype(ckpt)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    config = ckpt.config
    previous = ckpt.manifest.history if ckpt.manifest else []
    entry = {
        "stage": "finetune",
        "source": str(model),
        **provenance,
        "steps": plan.steps,
        "tokens": plan.steps * plan.tokens_per_step,
        "top_k": top_k,
        "options": options.fingerprint_fields(),
    }
    manifest = Manifest(slots=dict(ckpt.identity.original_ids), history=[*previous, entry])
    new_config = config.with_expert_count(config.num_experts, top_k)
    max_bytes = parse_size(options.max_shard_size, "--max-shard-size")
    with atomic_folder(out, options.force, protect=(ckpt.folder,)) as tmp:
        try:
            with quiet_transformers():
                inner.save_pretrained(tmp, state_dict=state, max_shard_size=max_bytes)
        except SafetensorError as exc:  # the Rust writer's I/O errors (a full disk) are not OSErrors
            raise MoePruneError(f"{out}: cannot write ({str(exc).splitlines()[0]})") from exc
        restore_source_layout(tmp, ckpt, max_bytes)  # a wrapper's vision tower and key names, as in the input
        copy_side_files(ckpt.folder, tmp)
        raw = {k: v for k, v in new_config.raw.items() if k != "quantization_config"}  # written dequantized
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        manifest.write(tmp)
    accelerator.wait_for_everyone()


__all__ = ["FinetuneOptions", "FinetuneResult", "Progress", "ProgressFn", "run"]
