"""A decoder layer run with its experts read a chunk at a time (runtime/expert_chunks.py, `--expert-memory`)
equals the layer run with its experts loaded whole, to float rounding, in several families; refusals are one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_prune.errors import MoePruneError
from moe_prune.runtime import expert_chunks
from moe_prune.runtime.sequential import LayerwiseModel

FAMILIES = ["qwen3_moe", "deepseek_v3", "mixtral", "qwen2_moe"]


def _runtime(folder: Path, budget: int | None) -> LayerwiseModel:
    runtime = LayerwiseModel(folder, "model.layers", "float32", "cpu", False)
    runtime.expert_memory = budget
    return runtime


def _expert_bytes(model: torch.nn.Module, layer: int) -> int:
    """One expert's bytes in float32, from the transformers model (an independent count)."""
    experts = model.model.layers[layer].mlp.experts
    return sum(p[0].numel() * p.element_size() for p in experts.parameters(recurse=False))


def _moe_layers(model: torch.nn.Module) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _layer_outputs(runtime: LayerwiseModel, layer: int, batch: torch.Tensor) -> tuple[torch.Tensor, torch.nn.Module]:
    """Decoder layer `layer` on a fixed random hidden input with the arguments the model passes it."""
    runtime.load_outside(skip=())
    args, kwargs = runtime.layer_inputs(batch)[layer]
    hidden = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(layer))
    block = runtime.load_layer(layer)
    with torch.inference_mode():
        out = block(hidden, *args[1:], **kwargs)
    return (out[0] if isinstance(out, tuple) else out), block


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_layer_equals_whole(model_type, chunk, tiny_factory):
    folder, model = tiny_factory(model_type)
    batch = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    layers = _moe_layers(model)
    assert layers
    for layer in layers:
        per_expert = _expert_bytes(model, layer)
        whole, _ = _layer_outputs(_runtime(folder, None), layer, batch)
        chunked, block = _layer_outputs(_runtime(folder, per_expert * chunk + per_expert - 1), layer, batch)
        (streamed,) = expert_chunks.chunked(block)
        assert streamed.chunk == chunk and streamed.reads >= 2  # the path taken: several chunks read
        assert block.mlp.experts.gate_up_proj.is_meta  # the whole stack was never loaded
        torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
        assert not torch.equal(whole, torch.zeros_like(whole))


def test_budget_above_the_layer_loads_it_whole(tiny_factory):
    folder, model = tiny_factory("qwen3_moe")
    layer = _moe_layers(model)[0]
    runtime = _runtime(folder, _expert_bytes(model, layer) * 8)  # exactly the layer's experts: no chunks
    block = runtime.load_layer(layer)
    assert expert_chunks.chunked(block) == [] and not block.mlp.experts.gate_up_proj.is_meta


def test_free_layer_removes_the_chunked_forward(tiny_factory):
    folder, model = tiny_factory("qwen3_moe")
    layer = _moe_layers(model)[0]
    runtime = _runtime(folder, _expert_bytes(model, layer) * 2)
    block = runtime.load_layer(layer)
    assert expert_chunks.chunked(block)
    runtime.free_layer(layer)
    assert expert_chunks.chunked(block) == [] and "forward" not in block.mlp.experts.__dict__


def test_budget_below_one_expert_is_one_line(tiny_factory):
    folder, model = tiny_factory("deepseek_v3")
    layer = _moe_layers(model)[0]
    runtime = _runtime(folder, _expert_bytes(model, layer) - 1)
    with pytest.raises(MoePruneError, match=r"--expert-memory \d+ bytes holds no expert of model\.layers\.\d+"):
        runtime.load_layer(layer)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_profile_statistics_equal_with_expert_memory(model_type, tiny_factory, tmp_path):
    """`profile --sequential --expert-memory`: every statistic (act_* through the experts wrapper included)
    equals the run with whole layers, to float rounding; the chunked path is taken (chunks read per batch)."""
    from tiny_models import save_char_tokenizer

    from moe_prune.stages import profile as stage
    from tests.test_profile import DOCS, assert_same_stats, settings, write_docs

    folder, model = tiny_factory(model_type)
    if not (folder / "tokenizer.json").exists():
        save_char_tokenizer(folder)
    data = tmp_path / "cal.jsonl"
    write_docs(data, DOCS, seed=3)
    whole = stage.run(folder, str(data), settings(sequential=True)).stats.arrays
    reads: list[int] = []
    original = expert_chunks.remove
    record = lambda layer: (reads.extend(c.reads for c in expert_chunks.chunked(layer)), original(layer))  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(expert_chunks, "remove", record)
        budget = _expert_bytes(model, _moe_layers(model)[0]) * 3
        chunked = stage.run(folder, str(data), settings(sequential=True, expert_memory=budget)).stats.arrays
    assert len(reads) == len(_moe_layers(model)) and min(reads) > 3  # several chunks, every batch
    assert any(name.startswith("act_") for name in whole)
    assert_same_stats(chunked, whole, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"expert_memory": 10**9}, "--expert-memory applies to --sequential only"),
        ({"expert_memory": 10**9, "sequential": True, "refit_stats": True}, "cannot be combined with --expert-outputs"),
        ({"expert_memory": 10**9, "sequential": True, "for_names": ("refit",)}, "cannot be combined"),
    ],
)
def test_profile_refusals(flags, message, tiny_factory, tmp_path):
    from moe_prune.stages import profile as stage
    from tests.test_profile import settings

    folder, _ = tiny_factory("qwen3_moe")
    with pytest.raises(MoePruneError, match=message):
        stage.run(folder, str(tmp_path / "absent.jsonl"), settings(**flags))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_eval_perplexity_equal_with_expert_memory(model_type, tiny_factory, tmp_path):
    """`eval --sequential --expert-memory`: perplexity and expert load equal the whole-layer run's; chunks read."""
    from tiny_models import save_char_tokenizer

    from moe_prune.specs.eval import EvalSpec
    from moe_prune.stages import evaluate
    from tests.test_profile import write_docs

    folder, model = tiny_factory(model_type)
    if not (folder / "tokenizer.json").exists():
        save_char_tokenizer(folder)
    data = tmp_path / "held.jsonl"
    write_docs(data, 12, seed=4)
    options = {"data": str(data), "seq_len": 16, "batch_size": 4, "sequential": True}
    whole = evaluate.run(folder, EvalSpec(**options)).model
    reads: list[int] = []
    original = expert_chunks.remove
    record = lambda layer: (reads.extend(c.reads for c in expert_chunks.chunked(layer)), original(layer))  # noqa: E731
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(expert_chunks, "remove", record)
        budget = _expert_bytes(model, _moe_layers(model)[0]) * 2
        chunked = evaluate.run(folder, EvalSpec(expert_memory=budget, **options)).model
    assert len(reads) == len(_moe_layers(model)) and min(reads) > 3
    assert chunked.tokens_scored == whole.tokens_scored > 0
    assert chunked.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert [load.counts for load in chunked.load] == [load.counts for load in whole.load]


def test_eval_cli_passes_expert_memory_and_needs_sequential(monkeypatch):
    from typer.testing import CliRunner

    from moe_prune.cli import app
    from moe_prune.stages import evaluate

    result = CliRunner().invoke(app, ["eval", "--expert-memory", "2KB"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "--expert-memory applies to --sequential only; add --sequential or leave it out" in result.output
    seen: list[int | None] = []

    def run(model, spec, *args):
        seen.append(spec.expert_memory)
        raise MoePruneError("stopped before evaluating")

    monkeypatch.setattr(evaluate, "run", run)
    CliRunner().invoke(app, ["eval", "--sequential", "--expert-memory", "2KiB"])
    assert seen == [2048]


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text", "dbrx", "granitemoe"])
def test_experts_stored_fused_are_refused(model_type, tiny_factory):
    """Experts stored fused (one tensor for all) load whole through transformers: refused, not silently unbounded."""
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.runtime.sequential import open_layerwise

    folder, _ = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    runtime = open_layerwise(ckpt, "float32", "cpu", False, "")
    runtime.expert_memory = 1000
    with pytest.raises(MoePruneError, match=r"cannot split the experts of .*\(stored fused in the checkpoint"):
        runtime.load_layer(ckpt.config.moe_layers[0])


def test_open_layerwise_bounds_stacked_families(tiny_factory):
    """Through `open_layerwise` (the adapter's experts path given) a stacked family is chunked, not refused."""
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.runtime.sequential import open_layerwise

    folder, model = tiny_factory("deepseek_v3")
    ckpt = Checkpoint.open(folder)
    runtime = open_layerwise(ckpt, "float32", "cpu", False, "")
    runtime.expert_memory = _expert_bytes(model, ckpt.config.moe_layers[0]) * 2
    assert expert_chunks.chunked(runtime.load_layer(ckpt.config.moe_layers[0]))


def test_picks_past_the_experts_are_one_line(tiny_factory):
    """A family whose router picks slots past its experts (longcat's zero experts) cannot be split: refused."""
    folder, model = tiny_factory("qwen3_moe")
    layer = _moe_layers(model)[0]
    block = _runtime(folder, _expert_bytes(model, layer) * 2).load_layer(layer)
    hidden = torch.randn(3, 32)
    index = torch.tensor([[0, 1], [2, 8], [3, 4]])  # 8: one past the 8 experts
    with pytest.raises(MoePruneError, match=r"model\.layers\.\d+\.mlp\.experts picks experts past its 8"):
        block.mlp.experts(hidden, index, torch.full((3, 2), 0.5))
    assert block.mlp.experts(hidden, index[:, :1], torch.ones(3, 1)).shape == (3, 32)


def test_held_bytes_count_the_chunk_not_the_stack(tiny_factory):
    """`held_bytes` (merge --refit's automatic bound): a chunked layer holds its other weights plus one chunk."""
    folder, model = tiny_factory("qwen3_moe")
    layer = _moe_layers(model)[0]
    per_expert = _expert_bytes(model, layer)
    whole = sum(p.numel() * p.element_size() for p in model.model.layers[layer].parameters())
    experts = per_expert * model.model.layers[layer].mlp.experts.num_experts
    assert expert_chunks.held_bytes(_runtime(folder, None).load_layer(layer)) == whole
    block = _runtime(folder, 3 * per_expert).load_layer(layer)
    assert expert_chunks.chunked(block) and expert_chunks.held_bytes(block) == whole - experts + 3 * per_expert
