"""`eval --sequential` (stages/eval_sequential.py): one decoder layer at a time gives whole-model eval's results."""

from __future__ import annotations

import math

import pytest
import torch
from test_profile import write_docs

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.runtime import layer_pass
from moe_prune.runtime.sequential import open_layerwise
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import eval_sequential, evaluate


def _both(model, data: str, **options) -> tuple[evaluate.ModelEval, evaluate.ModelEval]:
    whole = evaluate.run(model, EvalSpec(data=data, **options)).model
    layered = evaluate.run(model, EvalSpec(data=data, sequential=True, **options)).model
    return whole, layered


def _same(whole: evaluate.ModelEval, layered: evaluate.ModelEval) -> None:
    assert layered.tokens_scored == whole.tokens_scored > 0
    assert math.isclose(layered.perplexity, whole.perplexity, rel_tol=1e-5), (layered.perplexity, whole.perplexity)
    assert [load.counts for load in layered.load] == [load.counts for load in whole.load]
    assert sum(sum(load.counts) for load in whole.load) > 0
    assert layered.params == whole.params and layered.bytes_in_memory == whole.bytes_in_memory


def test_demo_perplexity_equals_whole_model():
    """The brief's check: the demo's perplexity within 1e-5 of plain eval, and the same expert load."""
    whole, layered = _both(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), seq_len=64, batch_size=3, max_tokens=1500)
    _same(whole, layered)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_moe"])
def test_families_equal_whole_model(model_type, tiny, tmp_path):
    """deepseek_v3: a dense first layer; gpt_oss: sliding-window layers and sinks; qwen3_moe: a dense middle layer."""
    data = tmp_path / "held.jsonl"
    write_docs(data, 7, seed=3)
    whole, layered = _both(tiny(model_type), str(data), seq_len=16, batch_size=3)
    _same(whole, layered)


def test_hidden_states_spilled_to_disk_give_the_same_nll(tiny):
    """Past `buffer_memory` the hidden states of all chunks live in a memory-mapped file: same sums."""
    folder = tiny("mixtral")
    ckpt = Checkpoint.open(folder)
    chunks = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    sums = []
    for budget in (None, 64):
        runtime = open_layerwise(ckpt, "float32", "cpu", False, "")
        steps: list[int] = []
        total, count, _ = eval_sequential.score(runtime, ckpt, chunks, 2, steps.append, buffer_memory=budget)
        assert steps == list(range(1, 3 * (len(runtime.layers) + 2) + 1))  # every pass reports each of 3 batches
        sums.append((total, count))
    assert sums[0] == sums[1] and sums[0][1] == 5 * 11


def test_sequential_needs_transformers_engine():
    with pytest.raises(MoePruneError, match=r"^--sequential runs the model with transformers, not --engine vllm$"):
        evaluate.run(DEMO_MODEL_DIR, EvalSpec(data=str(DEMO_CALIBRATION), engine="vllm", sequential=True))


def test_buffer_memory_spills_through_eval_with_the_same_perplexity(monkeypatch):
    """`eval --sequential --buffer-memory`: past the bound the hidden states go to disk, the result is unchanged."""
    spilled: list[bool] = []

    class Recorded(layer_pass.HiddenBuffer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spilled.append(self.spilled)

    monkeypatch.setattr(layer_pass, "HiddenBuffer", Recorded)
    options = {"seq_len": 32, "batch_size": 3, "max_tokens": 400, "sequential": True}
    held = evaluate.run(DEMO_MODEL_DIR, EvalSpec(data=str(DEMO_CALIBRATION), **options)).model
    bounded = evaluate.run(DEMO_MODEL_DIR, EvalSpec(data=str(DEMO_CALIBRATION), buffer_memory=1024, **options)).model
    assert spilled == [False, True]
    assert bounded.perplexity == held.perplexity and bounded.tokens_scored == held.tokens_scored > 0
    assert [load.counts for load in bounded.load] == [load.counts for load in held.load]


def test_buffer_memory_reaches_the_stage_and_needs_sequential(monkeypatch):
    """The CLI passes the parsed size on; without --sequential the stage refuses it in one line."""
    from typer.testing import CliRunner

    from moe_prune.cli import app

    result = CliRunner().invoke(app, ["eval", "--buffer-memory", "2KB"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "--buffer-memory applies to --sequential only; add --sequential or leave it out" in result.output
    seen: list[tuple] = []

    def run(model, spec, progress=None):
        seen.append((spec.sequential, spec.buffer_memory))
        raise MoePruneError("stopped before evaluating")

    monkeypatch.setattr(evaluate, "run", run)
    result = CliRunner().invoke(app, ["eval", "--sequential", "--buffer-memory", "2KB", "--max-tokens", "64"])
    assert result.exit_code == 1 and seen == [(True, 2000)], result.output


def test_families_whose_layers_share_state_are_refused_in_one_line():
    """The one refusal of profile, eval (and merge --refit's pass): the config named, the reason from the table."""
    from types import SimpleNamespace

    from moe_prune.architectures.table import NO_SEQUENTIAL

    family, reason = next(iter(NO_SEQUENTIAL.items()))
    ckpt = SimpleNamespace(config=SimpleNamespace(model_type=family), folder=DEMO_MODEL_DIR)
    with pytest.raises(MoePruneError) as refused:
        open_layerwise(ckpt, "float32", "cpu", False, "evaluate the whole model")
    assert str(refused.value) == (
        f"{DEMO_MODEL_DIR / 'config.json'}: --sequential is not supported for {family} ({reason}); "
        "evaluate the whole model"
    )
