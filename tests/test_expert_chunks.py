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
