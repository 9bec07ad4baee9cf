"""Load a checkpoint as a runnable transformers model and its tokenizer, with one-line errors.

Stock `AutoModelForCausalLM` on purpose: a pruned checkpoint must run in plain transformers, so
evaluating it the same way is part of the check. Checkpoints with different expert counts per layer
carry moe-prune's `modeling_moe_prune.py`; remote code is trusted for them only when that file is
byte-identical to the one this moe-prune ships (anything else needs the user's --trust-remote-code).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moe_prune.checkpoint.ragged import MODEL_FILE, is_ragged_folder, trusted_model_code
from moe_prune.checkpoint.source import resolve_model
from moe_prune.errors import MoePruneError

TOKENIZER_FILES = ("tokenizer*", "vocab.*", "*.model", "*.tiktoken", "spiece*")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def parse_dtype(dtype: str) -> torch.dtype | str:
    """A dtype name as the user types it ('auto' keeps the checkpoint's own dtype)."""
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise MoePruneError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def _short(exc: BaseException) -> str:
    """First line of an exception, so transformers' multi-paragraph messages stay one line."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


@contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """No transformers progress bars (loading, writing shards): moe-prune draws its own; restored afterwards."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def load_model(
    model_path: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False
) -> Any:
    """The model in eval mode on `device` ('auto' spreads it over the available GPUs via accelerate)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(model_path)
    if not (folder / "config.json").exists():
        raise MoePruneError(f"{model_path}: no config.json; not a transformers model folder")
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": _trust_code(folder, trust_remote_code)}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        with quiet_transformers_progress():
            model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
        if device != "auto":
            model = model.to(device)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, RuntimeError... for bad folders
        raise MoePruneError(f"{model_path}: could not load the model ({_short(exc)})") from None
    _check_complete(model_path, info)
    return model.eval()


def _trust_code(folder: Path, trust_remote_code: bool) -> bool:
    """The user's choice, or True for a ragged checkpoint carrying exactly the modelling file moe-prune ships."""
    if trust_remote_code or trusted_model_code(folder):
        return True
    if is_ragged_folder(folder):
        raise MoePruneError(
            f"{folder}: has different expert counts per layer but its {MODEL_FILE} is not the one this moe-prune "
            "ships; pass --trust-remote-code to run it anyway"
        )
    return False


def _check_complete(model_path: str | Path, info: dict[str, Any]) -> None:
    """transformers fills missing or wrongly shaped weights with random values and only warns; we refuse."""
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            more = f" and {len(keys) - 1} more" if len(keys) > 1 else ""
            what = kind.replace("_keys", "")
            raise MoePruneError(f"{model_path}: checkpoint does not match its config ({what} weight {keys[0]}{more})")


def load_tokenizer(model_path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside the model (pruning copies it unchanged)."""
    from transformers import AutoTokenizer

    folder = resolve_model(model_path)
    if not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        raise MoePruneError(f"{model_path}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # same variety as for the model
        raise MoePruneError(f"{model_path}: could not load a tokenizer ({_short(exc)})") from None


def input_device(model: Any) -> torch.device:
    """Where input ids must go: the device of the input embeddings (first shard under device_map)."""
    return model.get_input_embeddings().weight.device


def memory_bytes(model: Any) -> int:
    """Bytes of all parameters and buffers as loaded (tied weights counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
