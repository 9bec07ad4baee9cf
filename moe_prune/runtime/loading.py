"""Load a checkpoint as a runnable transformers model, its config and its tokenizer, with one-line errors.

Stock `AutoModelForCausalLM` on purpose: a pruned checkpoint must run in plain transformers, so
evaluating it the same way is part of the check.

Whether a checkpoint's own Python may run, and the meta-device skeleton, are decided in `runtime/skeleton.py`
(below `runtime/sequential.py`, which builds on it too).

Quantized checkpoints (FP8 block-quantized, MXFP4) load dequantized, one tensor at a time: through
transformers' own `Mxfp4Config(dequantize=True)` / `FineGrainedFP8Config(dequantize=True)` where
that is exact on CPU, otherwise (FP8 tensors whose shape is not a multiple of the block, which
transformers' loader dequantizes wrongly) into a meta-device skeleton layer by layer through
`checkpoint.quantized.read_float` (see `quantization_kwargs`). Either way every weight ends in the
dtype a float checkpoint of the same config would load in (the FP8 releases store what they do not
quantize as bfloat16; transformers' loaders leave it so beside float32 dequantized linears).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from moe_prune.artifacts.common import read_json
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.runtime.skeleton import (
    TRUST_HINT,
    CodeDecision,
    auto_map_targets,
    check_finite,
    code_decision,
    model_skeleton,
    parse_dtype,
    quiet_transformers,
    short_error,
)
from moe_prune.runtime.tokenizer_files import check_templates, check_tokenizer_sizes, tokenizer_error

TOKENIZER_FILES = ("tokenizer*", "vocab.*", "*.model", "*.tiktoken", "spiece*")


def opened(model: str | Path | Checkpoint) -> Checkpoint:
    """The checkpoint a stage already opened (its headers read and validated once), or open it now."""
    return model if isinstance(model, Checkpoint) else Checkpoint.open(model)


def load_model(
    model_path: str | Path | Checkpoint, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> Any:
    """The model in eval mode on `device` ('auto' spreads it over the available GPUs via accelerate)."""
    from transformers import AutoModelForCausalLM

    ckpt = opened(model_path)
    decision = code_decision(ckpt, trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": decision.trust_remote_code}
    if device == "auto":
        kwargs["device_map"] = "auto"
    model_class = decision.model_class or AutoModelForCausalLM
    quantization = quantization_kwargs(ckpt)
    if quantization is None:
        return _load_dequantized_layerwise(ckpt, dtype, device, trust_remote_code)
    kwargs.update(quantization)
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(ckpt.folder, output_loading_info=True, **kwargs)
        if device != "auto":
            model = model.to(device)
    except MoePruneError:
        raise
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, RuntimeError... for bad folders
        raise MoePruneError(f"{ckpt.folder}: could not load the model ({short_error(exc)})") from exc
    _check_complete(ckpt.folder, info)
    check_finite(model, ckpt.folder)
    if quantization:
        _forget_quantization(model)
        _cast_like_skeleton(model, ckpt, dtype, trust_remote_code)
    return model.eval()


def _cast_like_skeleton(model: Any, ckpt: Checkpoint, dtype: str, trust_remote_code: bool) -> None:
    """Every weight in the dtype a float checkpoint of this config would load in.

    transformers' dequantizing loaders leave the tensors a checkpoint does not quantize (embeddings,
    norms, router, head: bfloat16 in the FP8 releases) in their stored dtype beside the float32 they
    dequantize into, so with --dtype float32 every matmul between them fails on CPU.
    """
    with warnings.catch_warnings():  # load_model already said what it ignores (auto_map)
        warnings.simplefilter("ignore", MoePruneWarning)
        skeleton, _ = model_skeleton(ckpt, dtype, trust_remote_code)
    wanted = {name: t.dtype for name, t in (*skeleton.named_parameters(), *skeleton.named_buffers())}
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        target = wanted.get(name)
        if target is not None and tensor.is_floating_point() and tensor.dtype != target:
            tensor.data = tensor.data.to(target)


def _forget_quantization(model: Any) -> None:
    """A model loaded dequantized is a float model: save_pretrained must write floats, not re-quantize.

    transformers keeps the quantizer and its (quantizer-augmented) weight conversions on the model, and
    its FP8 save path then fails on fused experts; dropping both makes saving use the plain mapping.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "_weight_conversions"):
        del model._weight_conversions


def quantization_kwargs(ckpt: Checkpoint) -> dict[str, Any] | None:
    """from_pretrained arguments that load a quantized checkpoint dequantized; None: transformers cannot do it exactly.

    Float checkpoints and quantization methods moe-prune does not read get no arguments (transformers
    decides, as before).
    """
    from moe_prune.checkpoint.quantized import FP8, MXFP4, Quantization, fp8_tiles_exactly, group

    quant = Quantization.from_config(ckpt.config.raw)
    if quant is None:
        return {}
    if quant.method == MXFP4:
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    assert quant.method == FP8
    if not fp8_tiles_exactly(group(ckpt.tensors, quant)):
        return None
    from transformers import FineGrainedFP8Config

    block = list(quant.block) if quant.block else None
    return {"quantization_config": FineGrainedFP8Config(dequantize=True, weight_block_size=block)}


def _load_dequantized_layerwise(ckpt: Checkpoint, dtype: str, device: str, trust_remote_code: bool) -> Any:
    """The whole model built on meta and filled one decoder layer at a time with dequantized tensors."""
    from moe_prune.runtime.sequential import LayerwiseModel

    runtime = LayerwiseModel(ckpt.folder, _layers_path(ckpt), dtype, device, trust_remote_code)
    runtime.load_outside(())
    for index in range(len(runtime.layers)):
        runtime.load_layer(index)
    model = runtime.model
    model.tie_weights()
    meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if meta:
        raise MoePruneError(f"{ckpt.folder}: checkpoint does not match its config (missing weight {meta[0]})")
    check_finite(model, ckpt.folder)
    _forget_quantization(model)
    return model.eval()


def _layers_path(ckpt: Checkpoint) -> str:
    """Module path of the decoder layers (`model.layers`), as `profile --sequential` finds it."""
    return ckpt.config.adapter.runtime_layers


def _check_complete(folder: Path, info: dict[str, Any]) -> None:
    """transformers fills missing or wrongly shaped weights with random values and only warns; we refuse."""
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            what = kind.replace("_keys", "")
            raise MoePruneError(f"{folder}: checkpoint does not match its config ({what} weight {keys[0]}{more})")


def load_tokenizer(model_path: str | Path | Checkpoint, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside the model (pruning copies it unchanged); its own code runs only with consent."""
    from transformers import AutoTokenizer

    ckpt = opened(model_path)
    decision = code_decision(ckpt, trust_remote_code)
    folder = ckpt.folder
    if not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise MoePruneError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    _check_tokenizer_code(folder, decision)
    check_tokenizer_sizes(folder)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=decision.trust_remote_code)
    except Exception as exc:  # same variety as for the model
        if "trust_remote_code" in str(exc):
            raise MoePruneError(
                f"{folder / 'tokenizer_config.json'}: the tokenizer needs its own Python; {TRUST_HINT}"
            ) from exc
        raise tokenizer_error(folder, exc) from exc  # names the file at fault, not the folder
    vocab = ckpt.config.get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:  # its ids past the embedding would crash the forward
        raise MoePruneError(
            f"{folder / 'tokenizer.json'}: the tokenizer has {len(tokenizer)} tokens, the model's embedding "
            f"{vocab} (config.json vocab_size)"
        )
    _check_tokenizer_fields(tokenizer, folder / "tokenizer_config.json")
    check_templates(folder)
    return tokenizer


def _check_tokenizer_fields(tokenizer: Any, path: Path) -> None:
    """Fields transformers takes as given and trips over later, as an unexpected error: model_max_length is
    compared with every text's length, a chat template is rendered as Jinja text."""
    length = getattr(tokenizer, "model_max_length", None)
    if not (isinstance(length, int | float) and not isinstance(length, bool) and length >= 1):
        raise MoePruneError(f"{path}: model_max_length is {length!r}; expected a number of tokens from 1")
    template = getattr(tokenizer, "chat_template", None)
    named = isinstance(template, dict) and all(isinstance(t, str) for t in template.values())
    if not (template is None or isinstance(template, str) or named):
        raise MoePruneError(f"{path}: chat_template is {str(template)[:80]!r}; expected Jinja text (or named texts)")


def _check_tokenizer_code(folder: Path, decision: CodeDecision) -> None:
    """A tokenizer that names its own Python: transformers' own class is used without consent (said in a warning)."""
    path = folder / "tokenizer_config.json"
    if decision.trust_remote_code or not path.is_file():
        return
    raw, _ = read_json(path, "tokenizer config")
    targets = auto_map_targets(raw.get("auto_map"), path)
    if targets:
        key, target = next(iter(targets.items()))
        warnings.warn(
            f"{path}: auto_map ({key} -> {target}) ignored: transformers' own tokenizer is used; "
            "the checkpoint's Python runs only with --trust-remote-code",
            MoePruneWarning,
            stacklevel=2,
        )


def input_device(model: Any) -> torch.device:
    """Where input ids must go: the device of the input embeddings (first shard under device_map)."""
    return model.get_input_embeddings().weight.device


def memory_bytes(model: Any) -> int:
    """Bytes of all parameters and buffers as loaded (tied weights counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
