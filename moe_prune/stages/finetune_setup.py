"""`finetune`'s decisions before and around training: the plan checked against the checkpoint, the
accelerator, the rows (training and held-out, loaded before the model), the resume folder and fingerprint,
the warnings, the save dtype, the optimizer, and the lock on the output shared by every process.
Split from `stages.finetune` (issue #22: files <= 300 lines)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_prune.artifacts.provenance import fingerprint_json
from moe_prune.checkpoint.quantized import Quantization
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_HELDOUT
from moe_prune.errors import MoePruneError
from moe_prune.io.output import check_writable, work_lock
from moe_prune.runtime.data_plan import refuse_prefixed
from moe_prune.runtime.loading import load_tokenizer
from moe_prune.runtime.shares import SourceSpec
from moe_prune.sizes import parse_size
from moe_prune.training.batches import Sequences
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.sft import check_records_source, load_rows
from moe_prune.training.state import WorkFolder, work_folder
from moe_prune.training.text import Rows
from moe_prune.training.topk import check_top_k

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


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


@dataclass
class _Data:
    """The training and held-out rows, loaded before the model, and the run's resume fingerprint."""

    loaded: Rows
    warnings: list[str]
    eval_source: str
    eval_format: str
    eval_rows: Sequences | None
    fingerprint: dict[str, Any]


def _work(out: Path, options: FinetuneOptions) -> WorkFolder:
    """The resume folder beside `out`; an interrupted run there needs --resume or --force."""
    work = WorkFolder(work_folder(out))
    if work.exists() and not options.resume and not options.force:
        raise MoePruneError(
            f"{work.path}: an interrupted run of {out.name} is saved there; pass --resume to continue it "
            "or --force to discard it"
        )
    return work


def _load(plan: _Plan, specs: list[SourceSpec], options: FinetuneOptions, processes: int) -> _Data:
    """Tokenizer, training rows, held-out rows and the fingerprint: all before the (costly) model."""
    tokenizer = load_tokenizer(plan.ckpt, options.trust_remote_code)
    trained = plan.steps * plan.tokens_per_step
    loaded = _rows(specs, options.format, options.tokens, tokenizer, options, plan.seq_len, trained)
    warnings = list(loaded.warnings)
    eval_source = options.eval_data or str(DEMO_HELDOUT)
    eval_format = options.format if options.eval_data else "text"  # the default held-out set is plain text
    eval_rows = None
    if options.eval_tokens:
        held = _rows(eval_source, eval_format, options.eval_tokens, tokenizer, options, plan.seq_len)
        eval_rows = held.sequences
        warnings += held.warnings
    fingerprint = _fingerprint(plan, loaded.sequences, specs, options, processes)
    return _Data(loaded, warnings, eval_source, eval_format, eval_rows, fingerprint)


def _warnings(plan: _Plan, options: FinetuneOptions, rows: int, epochs: float) -> list[str]:
    """What the user should know about the budget, the router warm-up and a quantized input."""
    warnings = []
    if epochs > 1:
        held = f"{rows} examples" if options.format != "text" else f"{rows * plan.seq_len} tokens"
        warnings.append(f"the data holds {held}; the budget repeats it {epochs:.1f} times")
    if options.router_warmup_steps >= plan.steps:
        warnings.append(
            f"--router-warmup-steps {options.router_warmup_steps} covers the whole run of {plan.steps} steps"
        )
    if (quant := Quantization.from_config(plan.ckpt.config.raw)) is not None:
        warnings.append(
            f"the input is {quant.method.upper()}-quantized; it is trained dequantized and written dequantized "
            f"({str(_save_dtype(plan.ckpt)).removeprefix('torch.')}, no quantization_config): re-quantize it to ship it"
        )
    return warnings
