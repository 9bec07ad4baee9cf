"""Load a checkpoint as a runnable transformers model, its config and its tokenizer, with one-line errors.

Stock `AutoModelForCausalLM` on purpose: a pruned checkpoint must run in plain transformers, so
evaluating it the same way is part of the check.

This is the one place that decides whether a checkpoint's own Python may run (`code_decision`):
- with the user's --trust-remote-code, transformers is told to trust the folder (the user's consent);
- a ragged checkpoint (different expert counts per layer) runs moe-prune's OWN copy of
  `modeling_moe_prune.py`, imported from this package, never the file in the folder, and only when the
  folder's file is byte-identical to it and `auto_map` names exactly that file and class: anything else
  there is refused with a line naming the file;
- every other checkpoint loads with transformers' own code (`trust_remote_code=False`): an `auto_map`
  is ignored with a warning, and a checkpoint that needs its own code to load is refused.
Every file the loaders read is first checked by `Checkpoint.open` (shards and side files inside the
folder, complete headers, a sane config).

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.common import read_json
from moe_prune.checkpoint.ragged import (
    AUTO_CLASS,
    CLASS_PREFIX,
    MODEL_FILE,
    MODEL_MODULE,
    base_class,
    is_shipped_model_code,
)
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.runtime.tokenizer_files import check_templates, tokenizer_error

TOKENIZER_FILES = ("tokenizer*", "vocab.*", "*.model", "*.tiktoken", "spiece*")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
TRUST_HINT = "pass --trust-remote-code to run it"


@dataclass(frozen=True)
class CodeDecision:
    """What transformers is told about a folder's Python, and the model class moe-prune supplies itself."""

    trust_remote_code: bool
    model_class: type | None = None  # moe-prune's own Ragged<Base> class, for ragged checkpoints


def _auto_map_targets(auto_map: Any, source: Path) -> dict[str, str]:
    """auto_map as {auto class: 'module.Class'} (tokenizer entries are [slow, fast] pairs)."""
    if auto_map is None:
        return {}
    if not isinstance(auto_map, dict):
        raise MoePruneError(f"{source}: auto_map must be an object")
    targets: dict[str, str] = {}
    for key, value in auto_map.items():
        for i, target in enumerate(value if isinstance(value, list | tuple) else [value]):
            if target is not None:
                targets[f"{key}[{i}]" if isinstance(value, list | tuple) else key] = str(target)
    return targets


def _code_file(target: str) -> str:
    """'evil.Class' -> 'evil.py' (and 'org/repo--evil.Class' -> 'evil.py')."""
    module = target.split("--")[-1].rpartition(".")[0]
    return f"{module.replace('.', '/')}.py"


def code_decision(ckpt: Checkpoint, trust_remote_code: bool) -> CodeDecision:
    """Decide, once for every command and loading path, whether the checkpoint's own Python may run."""
    if trust_remote_code:
        return CodeDecision(True)
    config_path = ckpt.folder / "config.json"
    raw = ckpt.config.raw
    targets = _auto_map_targets(raw.get("auto_map"), config_path)
    if ckpt.config.ragged is not None:  # in a wrapper's text config
        return CodeDecision(False, _shipped_ragged_class(ckpt, targets))
    if targets:
        key, target = next(iter(targets.items()))
        warnings.warn(
            f"{config_path}: auto_map ({key} -> {target}) ignored: transformers' own "
            f"{ckpt.config.model_type} code is used; the checkpoint's Python runs only with --trust-remote-code",
            MoePruneWarning,
            stacklevel=2,
        )
    return CodeDecision(False)


def _shipped_ragged_class(ckpt: Checkpoint, targets: dict[str, str]) -> type:
    """moe-prune's own Ragged<Base> class, when the folder carries exactly the file and auto_map it writes."""
    from moe_prune.checkpoint import modeling_moe_prune

    spec = ckpt.config.ragged
    base = spec.get("base_class")
    expected = {AUTO_CLASS: f"{MODEL_MODULE}.{CLASS_PREFIX}{base}"}
    code = ckpt.folder / MODEL_FILE
    if not code.is_file() or not is_shipped_model_code(code.read_bytes()):
        raise MoePruneError(f"{code}: is not the {MODEL_FILE} this moe-prune ships; {TRUST_HINT}")
    if targets != expected:
        other = next(((k, v) for k, v in targets.items() if expected.get(k) != v), (AUTO_CLASS, "nothing"))
        raise MoePruneError(
            f"{ckpt.folder / 'config.json'}: auto_map {other[0]} -> {other[1]} ({_code_file(other[1])}) is not "
            f"moe-prune's ragged model class; {TRUST_HINT}"
        )
    if base != base_class(ckpt.config):
        raise MoePruneError(
            f"{ckpt.folder / 'config.json'}: {RAGGED_KEY}.base_class {base!r} is not the causal-LM class of "
            f"{ckpt.config.raw.get('model_type')}"
        )
    model_class = getattr(modeling_moe_prune, f"{CLASS_PREFIX}{base}")
    model_class._auto_class = AUTO_CLASS  # save_pretrained writes the file and auto_map again, as transformers would
    return model_class


def parse_dtype(dtype: str) -> torch.dtype | str:
    """A dtype name as the user types it ('auto' keeps the checkpoint's own dtype)."""
    try:
        return DTYPES[dtype.lower()]
    except KeyError as exc:
        raise MoePruneError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from exc


def _short(exc: BaseException) -> str:
    """First line of an exception, so transformers' multi-paragraph messages stay one line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or load reports: moe-prune draws its own and says problems in one line."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if enabled:
            logging.enable_progress_bar()


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
        raise MoePruneError(f"{ckpt.folder}: could not load the model ({_short(exc)})") from exc
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


def model_skeleton(ckpt: Checkpoint, dtype: str, trust_remote_code: bool) -> tuple[Any, torch.dtype]:
    """(model built from its config with no weights on the meta device, its dtype), under `load_model`'s code rule."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    decision = code_decision(ckpt, trust_remote_code)
    try:
        with quiet_transformers():
            if decision.model_class is not None:
                config = decision.model_class.config_class.from_pretrained(ckpt.folder)
            else:
                config = AutoConfig.from_pretrained(ckpt.folder, trust_remote_code=decision.trust_remote_code)
            wanted = parse_dtype(dtype)
            torch_dtype = (getattr(config, "dtype", None) or torch.float32) if wanted == "auto" else wanted
            if isinstance(torch_dtype, str):
                torch_dtype = getattr(torch, torch_dtype)
            with init_empty_weights(include_buffers=False):
                if decision.model_class is not None:
                    model = decision.model_class._from_config(config, dtype=torch_dtype)
                else:
                    model = AutoModelForCausalLM.from_config(
                        config, dtype=torch_dtype, trust_remote_code=decision.trust_remote_code
                    )
    except MoePruneError:
        raise
    except Exception as exc:  # same variety as load_model
        raise MoePruneError(f"{ckpt.folder / 'config.json'}: could not build the model ({_short(exc)})") from exc
    _keep_in_float32(model, torch_dtype)
    return model.eval(), torch_dtype


def _keep_in_float32(model: Any, dtype: torch.dtype) -> None:
    """What from_pretrained keeps float32 at `dtype` (`_keep_in_fp32_modules`, e.g. DeepSeek's router bias)."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    pattern, groups, _ = build_glob_alternation(list(plan))
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        match = pattern.search(name)
        if match is not None and tensor.is_floating_point():
            tensor.data = tensor.data.to(plan[groups[match.lastgroup]])


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf (tensors that are not floats, on the meta device or 1-byte floats count as finite)."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.element_size() < 2:
        return True
    return bool(torch.isfinite(tensor).all())


def check_finite(model: Any, folder: Path) -> None:
    """Refuse weights holding NaN or Inf: every result computed from them would be meaningless."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not finite(tensor):
            raise MoePruneError(f"{folder}: weight {name} holds NaN or Inf values")


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
    targets = _auto_map_targets(raw.get("auto_map"), path)
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
