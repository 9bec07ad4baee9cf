"""`eval`: perplexity, size, FLOPs per token and expert load balance of a model, optionally vs a baseline.

Perplexity is exp of the token-weighted mean next-token NLL over fixed-length chunks of one token
stream (documents joined by EOS; a .txt file is one document unless `split_on` says otherwise; chat
records rendered with each model's own chat template; see `runtime.data`): every chunk of `seq_len` tokens scores
`seq_len - 1` predictions, each from the tokens before it in its chunk. Chunks depend only on the data
and the tokenizer, so a pruned model and its baseline are compared on identical inputs.

Parameter counts come from the safetensors headers (what is on disk), split by the adapter into
routed experts and the rest. Per token, only top_k of E routed experts run:
    active = non-expert + Σ_layers top_k / E × routed-expert parameters (each MoE layer its own E)
    FLOPs/token ≈ 2 × (active − input embedding + tied output head)
i.e. 2 FLOPs per multiply-accumulate of every weight a token passes through; the input embedding is
a lookup, not a matmul; attention-score FLOPs (which grow with context) are left out. Quantized
checkpoints count stored elements (e.g. packed bytes), not logical weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import ExpertKey, KeyMatcher
from moe_prune.errors import MoePruneError
from moe_prune.runtime import vllm_engine
from moe_prune.runtime.chat import render
from moe_prune.runtime.data import Document, clip_seq_len, fixed_chunks, load_documents, token_stream
from moe_prune.runtime.loading import (
    input_device,
    load_model,
    load_tokenizer,
    memory_bytes,
    model_skeleton,
    parse_dtype,
)
from moe_prune.runtime.routing import RoutingRecorder, load_balance
from moe_prune.runtime.sequential import LayerwiseModel, open_layerwise
from moe_prune.runtime.sources import parse_source
from moe_prune.runtime.vllm_engine import check_engine as check_engine
from moe_prune.specs.eval import EvalSpec
from moe_prune.specs.profile import check_sequential_only
from moe_prune.stages import eval_sequential
from moe_prune.stages.eval_results import EvalResult, LayerLoad, ModelEval, ParamCounts
from moe_prune.training.nll import nll_sum as one_nll_sum
from moe_prune.training.nll import non_finite

# progress(label, batches_done, batches_total): called before the first batch and after each one.
ProgressFn = Callable[[str, int, int], None]
CHARS_PER_TOKEN_BOUND = 16  # characters read per requested token: more than any tokenizer needs
_WHOLE = "evaluate the whole model (--device auto for large ones)"  # what to do where --sequential is refused


def _is_expert_weight(key: ExpertKey, name: str, matcher: KeyMatcher) -> bool:
    """Expert-axis tensors that belong to the experts, not the router (weight, bias) or selection bias."""
    if key.kind == "per_expert":
        return True
    router_bias = matcher.adapter.router_bias
    is_router = matcher.is_router(name) is not None or (router_bias is not None and name.endswith(router_bias))
    return key.kind == "rows" and not is_router


def count_params(ckpt: Checkpoint, model: Any) -> ParamCounts:
    """Split the checkpoint's tensors into routed experts and the rest; embeddings from the loaded model."""
    config = ckpt.config
    adapter = config.adapter
    matcher = KeyMatcher(adapter)
    per_layer = dict.fromkeys(config.moe_layers, 0)
    total = 0
    for info in ckpt.tensors:
        total += info.numel
        key = matcher.classify(info.name)
        if key is not None and key.layer in per_layer and _is_expert_weight(key, info.name, matcher):
            per_layer[key.layer] += info.numel
    routed = sum(per_layer.values())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    # identity: a model built on the meta device (--engine vllm counts on one) has no data pointers to compare
    tied = head_weight is not None and (
        head_weight is embedding or (embedding.device.type != "meta" and head_weight.data_ptr() == embedding.data_ptr())
    )
    used = sum(
        Fraction(n * config.top_k_in_layer(layer), config.experts_in_layer(layer)) for layer, n in per_layer.items()
    )  # per layer: ragged checkpoints differ in experts (and top-k) per layer
    active = total - routed + round(used)
    head_numel = head_weight.numel() if head_weight is not None else 0
    matmul = active - embedding.numel() + (head_numel if tied else 0)
    return ParamCounts(total, routed, total - routed, embedding.numel(), head_numel, tied, active, 2 * matmul)


@torch.inference_mode()
def nll_sum(
    model: Any, chunks: torch.Tensor, batch_size: int, on_batch: Callable[[int], None], source: str | Path = "model"
) -> tuple[float, int]:
    """(summed next-token NLL, number of predictions) over `chunks`, through the one loop (`training.nll`).

    A batch whose loss is not finite (NaN/Inf logits) is refused, naming `source` (the model folder)."""
    batches = ((batch, batch, batch[:, 1:].numel()) for batch in chunks.split(batch_size))
    return one_nll_sum(model, batches, input_device(model), source, on_batch)


def _layer_loads(recorder: RoutingRecorder, original_ids: dict[int, tuple[int, ...]]) -> list[LayerLoad]:
    loads = []
    rows = zip(recorder.layers, recorder.tokens.tolist(), recorder.hard_counts.tolist(), strict=True)
    for layer, tokens, counts in rows:
        counts = counts[: len(original_ids[layer])]  # ragged: the recorder counts up to the largest layer's experts
        max_over_mean, entropy = load_balance(counts)
        loads.append(LayerLoad(layer, len(counts), list(original_ids[layer]), tokens, counts, max_over_mean, entropy))
    return loads


def _shared_experts(ckpt: Checkpoint) -> dict[str, Any] | None:
    key = next((k for k in ckpt.config.adapter.shared_expert_keys if ckpt.config.get(k) is not None), None)
    return None if key is None else {"key": key, "value": ckpt.config.get(key)}


@dataclass(frozen=True)
class Settings:
    """How every model of one `eval` run is loaded and scored."""

    seq_len: int
    batch_size: int
    max_tokens: int | None
    dtype: str
    device: str
    trust_remote_code: bool
    engine: str = "transformers"
    sequential: bool = False  # one decoder layer at a time (stages.eval_sequential)
    buffer_memory: int | None = None  # --sequential: bytes of hidden states in memory; more spill to disk
    expert_memory: int | None = None  # --sequential: bytes of a layer's experts loaded at once (runtime.expert_chunks)


def evaluate_model(
    name: str,
    ckpt: Checkpoint,
    label: str,
    texts: list[Document],
    settings: Settings,
    progress: ProgressFn,
    source: str = "data",
) -> tuple[ModelEval, torch.Tensor, list[str]]:
    """Load one model, score `texts`, count its routing; returns the evaluation, the chunks scored, warnings.

    Under --engine vllm the transformers model is built on the meta device only (context, parameter and
    memory counts) and vLLM scores the same windows."""
    config = ckpt.config
    tokenizer = load_tokenizer(ckpt, settings.trust_remote_code)
    model, runtime = _model(ckpt, settings)
    used_len = clip_seq_len(settings.seq_len, model.config)
    warnings = []
    if used_len < settings.seq_len:
        warnings.append(f"{label}: sequence length {settings.seq_len} exceeds the model's context; using {used_len}")
    stream = token_stream(render(texts, tokenizer, source), tokenizer, settings.max_tokens)
    chunks = fixed_chunks(stream, used_len, settings.max_tokens, source=source)
    batches = math.ceil(len(chunks) / settings.batch_size)
    batches *= len(runtime.layers) + 2 if runtime is not None else 1  # --sequential: every layer is a pass
    progress(label, 0, batches)
    nll, scored, load = _score(model, ckpt, chunks, settings, lambda done: progress(label, done, batches), runtime)
    mean = nll / scored
    result = ModelEval(
        model=name,
        engine=settings.engine,
        model_type=config.model_type,
        experts_per_layer=config.num_experts,
        top_k=config.top_k,
        moe_layers=config.moe_layers,
        shared_experts=_shared_experts(ckpt),
        seq_len=used_len,
        sequences=len(chunks),
        tokens_scored=scored,
        nll=mean,
        perplexity=math.exp(mean) if mean < 700 else math.inf,
        params=count_params(ckpt, model),
        bytes_on_disk=ckpt.total_bytes(),
        bytes_in_memory=memory_bytes(model),
        load=load,
    )
    return result, chunks, warnings


def _model(ckpt: Checkpoint, settings: Settings) -> tuple[Any, LayerwiseModel | None]:
    """(the model eval counts and, unless --sequential, runs; its layer-at-a-time loader under --sequential)."""
    if settings.engine == "vllm":
        return meta_model(ckpt, settings.dtype, settings.trust_remote_code), None
    if settings.sequential:
        runtime = open_layerwise(ckpt, settings.dtype, settings.device, settings.trust_remote_code, _WHOLE)
        runtime.expert_memory = settings.expert_memory
        return runtime.model, runtime
    return load_model(ckpt, settings.dtype, settings.device, settings.trust_remote_code), None


def meta_model(ckpt: Checkpoint, dtype: str, trust_remote_code: bool) -> Any:
    """The model on the meta device, its head tied as from_pretrained ties it: what --engine vllm counts
    parameters, memory and context on (vLLM holds the weights)."""
    model = model_skeleton(ckpt, dtype, trust_remote_code)[0]
    model.tie_weights()
    return model


def _score(
    model: Any,
    ckpt: Checkpoint,
    chunks: torch.Tensor,
    settings: Settings,
    on_batch: Callable[[int], None],
    runtime: LayerwiseModel | None = None,
) -> tuple[float, int, list[LayerLoad]]:
    """(summed NLL, predictions, expert load) of `chunks` by the settings' engine (vLLM records no load), or
    layer by layer through `runtime` (--sequential)."""
    if runtime is not None:
        memory = settings.buffer_memory  # the rest of the hidden states spill to a temporary file
        nll, scored, recorder = eval_sequential.score(runtime, ckpt, chunks, settings.batch_size, on_batch, memory)
        return nll, scored, _layer_loads(recorder, ckpt.identity.original_ids)
    if settings.engine == "vllm":
        used_len = chunks.shape[1]
        past_context = clip_seq_len(used_len + 1, model.config) <= used_len
        with vllm_engine.served(ckpt.folder, settings.dtype, used_len, settings.trust_remote_code, past_context) as llm:
            nll, scored = vllm_engine.nll_sum(llm, chunks, settings.batch_size, on_batch)
        if not math.isfinite(nll):
            raise non_finite(ckpt.folder)
        return nll, scored, []
    with RoutingRecorder(model, ckpt.config) as recorder:
        nll, scored = nll_sum(model, chunks, settings.batch_size, on_batch, ckpt.folder)
    return nll, scored, _layer_loads(recorder, ckpt.identity.original_ids)


def run(model: str | Path, spec: EvalSpec = EvalSpec(), progress: ProgressFn | None = None) -> EvalResult:
    """Perplexity, sizes and load of `model` (and `spec.baseline`, one after the other so only one is in memory) on
    `spec.data` with `spec.engine`; `sequential`: one decoder layer at a time (models larger than memory),
    `buffer_memory` bytes of hidden states in memory (None: all; the rest in a temporary file). The spec's task
    fields are `stages.tasks`' (the `eval` command runs both)."""
    s = spec
    check_sequential_only(s.sequential, buffer_memory=s.buffer_memory, expert_memory=s.expert_memory)
    if s.sequential and s.engine != "transformers":
        raise MoePruneError(f"--sequential runs the model with transformers, not --engine {s.engine}")
    vllm_engine.check_engine(s.engine, s.device)
    if s.seq_len < 2:
        raise MoePruneError(f"sequence length must be at least 2 (got {s.seq_len})")
    if s.batch_size < 1:
        raise MoePruneError(f"batch size must be at least 1 (got {s.batch_size})")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise MoePruneError(f"max tokens must be at least 1 (got {s.max_tokens})")
    parse_dtype(s.dtype)
    # Open both checkpoints first (headers and config): a wrong folder is reported before any data is read.
    checkpoints = {"model": (str(model), _open(model))}
    if s.baseline is not None:
        checkpoints["baseline"] = (str(s.baseline), _open(s.baseline))
    texts = heldout_documents(s.data, s.text_field, s.split, s.max_tokens, s.split_on)
    settings = Settings(
        s.seq_len, s.batch_size, s.max_tokens, s.dtype, s.device, s.trust_remote_code, s.engine, s.sequential,
        s.buffer_memory, s.expert_memory,
    )  # fmt: skip
    report = progress or (lambda label, done, total: None)
    evals = {
        label: evaluate_model(name, ckpt, label, texts, settings, report, s.data)
        for label, (name, ckpt) in checkpoints.items()
    }
    result, chunks, warnings = evals["model"]
    base = None
    if "baseline" in evals:
        base, base_chunks, base_warnings = evals["baseline"]
        warnings += base_warnings
        if not torch.equal(chunks, base_chunks):
            warnings.append("model and baseline tokenize the data differently; their perplexities are not comparable")
    return EvalResult(str(s.data), result, base, warnings)


def _open(model: str | Path) -> Checkpoint:
    ckpt = Checkpoint.open(model)
    _ = ckpt.identity  # reads and checks config.json (and moe_prune.json) now, not after the data is loaded
    return ckpt


def heldout_documents(data: str, text_field: str, split: str, max_tokens: int | None, split_on: str) -> list[Any]:
    """The documents perplexity is measured on: one source without a share, read up to what `max_tokens` needs."""
    if parse_source(data).suffix:
        raise MoePruneError(f"--data {data}: eval scores one source, without a share (cap it with --max-tokens)")
    max_chars = None if max_tokens is None else max_tokens * CHARS_PER_TOKEN_BOUND
    return load_documents(data, text_field, split, max_chars, split_on)
