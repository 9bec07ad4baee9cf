"""What every way of building a model shares: the code-trust decision and the meta-device skeleton.

This is the one place that decides whether a checkpoint's own Python may run (`code_decision`):
- with the user's --trust-remote-code, transformers is told to trust the folder (the user's consent);
- a ragged checkpoint (different expert counts per layer) runs moe-prune's OWN copy of
  `modeling_moe_prune.py`, imported from this package, never the file in the folder, and only when the
  folder's file is byte-identical to it and `auto_map` names exactly that file and class: anything else
  there is refused with a line naming the file;
- every other checkpoint loads with transformers' own code (`trust_remote_code=False`): an `auto_map`
  is ignored with a warning, and a checkpoint that needs its own code to load is refused;
- an attention implementation in config.json that names a Hub kernel repository (`org/repo`) is code
  transformers would fetch and run: refused without --trust-remote-code.
Every file the loaders read is first checked by `Checkpoint.open` (shards and side files inside the
folder, complete headers, a sane config).

Below both `runtime/loading.py` (whole models) and `runtime/sequential.py` (one decoder layer at a time), so
neither imports the other's module for it.
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
from moe_prune.architectures.config_values import ATTENTION_FIELDS, hub_kernel
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
TRUST_HINT = "pass --trust-remote-code to run it"


@dataclass(frozen=True)
class CodeDecision:
    """What transformers is told about a folder's Python, and the model class moe-prune supplies itself."""

    trust_remote_code: bool
    model_class: type | None = None  # moe-prune's own Ragged<Base> class, for ragged checkpoints


def auto_map_targets(auto_map: Any, source: Path) -> dict[str, str]:
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
    _refuse_hub_kernels(ckpt, config_path)
    targets = auto_map_targets(raw.get("auto_map"), config_path)
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


def _refuse_hub_kernels(ckpt: Checkpoint, config_path: Path) -> None:
    """An attention implementation naming a Hub kernel repository is code: one line naming the field."""
    prefix = f"{ckpt.config.text_key}." if ckpt.config.text_key else ""
    for fields, where in ((ckpt.config.raw, ""), (ckpt.config.text, prefix)):
        for key in ATTENTION_FIELDS:
            value = fields.get(key)
            if isinstance(value, str) and hub_kernel(value):
                raise MoePruneError(
                    f"{config_path}: {where}{key} {value!r} names attention kernels on the Hugging Face Hub, "
                    f"code that transformers would fetch and run; {TRUST_HINT}"
                )


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


def short_error(exc: BaseException) -> str:
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
        raise MoePruneError(f"{ckpt.folder / 'config.json'}: could not build the model ({short_error(exc)})") from exc
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


FINITE_CHUNK = 1 << 18  # elements checked at a time: `isfinite` makes a bool tensor as large as its input


def finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf (tensors that are not floats, on the meta device or 1-byte floats count as finite).

    Checked a bounded chunk of rows at a time: on a whole tensor the bool temporary was a quarter of a
    float32 expert stack, the one thing `load_model` held beyond `from_pretrained` (issue #24)."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.element_size() < 2:
        return True
    if tensor.is_contiguous():
        parts = tensor.view(-1).split(FINITE_CHUNK)
    else:  # a view: whole rows at a time, no copy
        parts = tensor.split(max(1, FINITE_CHUNK // max(1, tensor[0].numel())))
    return all(bool(torch.isfinite(part).all()) for part in parts)


def check_finite(model: Any, folder: Path) -> None:
    """Refuse weights holding NaN or Inf: every result computed from them would be meaningless."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not finite(tensor):
            raise MoePruneError(f"{folder}: weight {name} holds NaN or Inf values")
