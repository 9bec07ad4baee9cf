"""Prompt log-probs of checkpoints served by vLLM, for comparing with transformers on the same token ids.

Runs under a Python with vLLM (and moe-prune, for its plugin) installed, e.g. the venv of
tests/test_vllm_serving.py:  python scripts/vllm_logprobs.py jobs.json out.json
jobs.json: [{"name": ..., "folder": ..., "token_ids": [[...], ...], "trust_remote_code": false, "dtype": "float32",
             "expect_error": false, "generate": 0, "speculative_config": null}, ...]
out.json:  {name: {"logprobs": [[per position from the second token], ...], "model_class": ...,
                   "architectures": [...], "experts": {fused-MoE module: experts}, "top_k": {module: top-k},
                   with "generate": n, "generated": [[n greedy tokens after each prompt], ...],
                   with "speculative_config": "drafter": {"model_class", "experts", "top_k"}, "drafts": drafts made}}
           (a job with expect_error: {name: {"error": the exception and its causes, "<-"-joined}})
Every checkpoint is served (in float32 unless its job names a dtype) by one LLM at a time, in this one process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model lives in this process: apply_model reads it


def describe(model: Any) -> dict[str, Any]:
    """vLLM's model class and the number of experts each fused-MoE layer was built with."""
    moe = [(name, m) for name, m in model.named_modules() if hasattr(m, "w13_weight")]
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "experts": {name: int(m.w13_weight.shape[0]) for name, m in moe},
        "top_k": {name: int(m.top_k) for name, m in moe if hasattr(m, "top_k")},
    }


def describe_drafter(worker: Any) -> dict[str, Any]:
    """`describe` of the speculative-decoding draft model (an MTP model) of a worker."""
    return describe(worker.model_runner.drafter.model)


def drafts(llm: Any) -> int:
    """How many draft proposals speculative decoding made (vLLM's spec_decode_num_drafts counter)."""
    return int(sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == "vllm:spec_decode_num_drafts"))


def serve(job: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint's prompt log-probs (natural log) of each token after the first."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    generate = max(int(job.get("generate", 0)), 1)  # vLLM generates at least one token after the prompt
    llm = LLM(
        model=job["folder"],
        dtype=job.get("dtype", "float32"),
        skip_tokenizer_init=True,
        enforce_eager=True,
        max_model_len=max(len(ids) for ids in job["token_ids"]) + generate + 2 * bool(job.get("speculative_config")),
        seed=0,
        trust_remote_code=bool(job.get("trust_remote_code", False)),
        kv_cache_memory_bytes=64 << 20,  # tiny models, short prompts: no share of the machine's memory
        speculative_config=job.get("speculative_config"),
        disable_log_stats=not job.get("speculative_config"),  # the draft counter is a logged statistic
    )
    try:
        # ignore_eos: `generate` tokens after every prompt, to compare with another engine's greedy tokens
        params = SamplingParams(
            max_tokens=generate, temperature=0, prompt_logprobs=0, detokenize=False, ignore_eos=True
        )
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["token_ids"]], params)
        logprobs = []
        for ids, output in zip(job["token_ids"], outputs, strict=True):
            per_position = output.prompt_logprobs[1:]
            logprobs.append([entry[token].logprob for token, entry in zip(ids[1:], per_position, strict=True)])
        info = llm.apply_model(describe)[0]
        info["architectures"] = list(llm.llm_engine.model_config.hf_config.architectures or [])
        if job.get("generate"):
            info["generated"] = [list(output.outputs[0].token_ids) for output in outputs]
        if job.get("speculative_config"):
            info["drafter"] = llm.collective_rpc(describe_drafter)[0]
            info["drafts"] = drafts(llm)
        return {"logprobs": logprobs, **info}
    finally:
        del llm
        gc.collect()


def refused(job: dict[str, Any]) -> dict[str, Any]:
    """A job that must fail (a damaged checkpoint): the failure's message, or the results if it served."""
    try:
        return serve(job)
    except Exception as exc:  # what vLLM raised and the chain of causes, for the test to read
        chain: list[str] = []
        cause: BaseException | None = exc
        while cause is not None and len(chain) < 10:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        return {"error": " <- ".join(chain)}


def main(jobs_path: str, out_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    # jobs expected to fail run last: a failed start can leave vLLM's process state unusable for the next LLM
    jobs.sort(key=lambda job: bool(job.get("expect_error")))
    results = {job["name"]: (refused if job.get("expect_error") else serve)(job) for job in jobs}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
