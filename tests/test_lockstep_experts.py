"""jetmoe: num_local_experts sizes its MLP experts and its attention experts (MoA) alike (`Adapter.lockstep`).

prune keeps the attention experts (and their router rows) of the kept MLP experts' slots and merge those of the
anchors, so the result loads in stock transformers; profile reads the expert outputs where jetmoe computes them,
grouped by expert (`selection_from == "grouped"`), checked against the experts computed here from the weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import checkpoint_tensors
from test_derived import _build
from test_merge import load_stock, synthetic_stats

from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.runtime.statistics import StatisticsRecorder
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge, prune

ATTENTION = ("input_linear.weight", "output_linear.weight", "router.layer.weight")


@pytest.fixture(scope="module")
def jetmoe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jetmoe") / "model"
    return folder, _build("jetmoe", folder, {})


def _attention_follows(before: dict, after: dict, slots: dict[int, list[int]]) -> None:
    for layer, kept in slots.items():
        for name in ATTENTION:
            key = f"model.layers.{layer}.self_attention.experts.{name}"
            assert torch.equal(after[key], before[key][list(kept)]), key


def test_prune_keeps_the_kept_slots_attention_experts(jetmoe, tmp_path):
    folder, _ = jetmoe
    ckpt = Checkpoint.open(folder)
    keep = {layer: [1, 2, 5, 7] if layer % 2 else [0, 3, 4, 6] for layer in ckpt.config.moe_layers}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    _attention_follows(checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "out"), keep)
    assert load_stock(tmp_path / "out").config.num_local_experts == 4


def test_merge_keeps_the_anchors_attention_experts_unaveraged(jetmoe, tmp_path):
    folder, _ = jetmoe
    ckpt = Checkpoint.open(folder)
    merge.run(folder, synthetic_stats(ckpt), tmp_path / "half", 4, MergeSpec(router="average", seed=1))
    anchors = {layer: list(slots) for layer, slots in Manifest.read(tmp_path / "half").slots.items()}
    _attention_follows(checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "half"), anchors)
    load_stock(tmp_path / "half")


def test_grouped_expert_outputs_match_the_weights(jetmoe):
    """act_norm_sum / act_weighted_norm_sum per expert against the experts computed from input_linear/output_linear
    on the tokens the router's top-k of logits sends them, weighted by the softmax over that top-k."""
    folder, model = jetmoe
    config = Checkpoint.open(folder).config
    inputs = {}
    mlps = {layer: model.get_submodule(f"model.layers.{layer}.mlp") for layer in config.moe_layers}
    hooks = [
        mlp.register_forward_pre_hook(lambda m, args, layer=layer: inputs.__setitem__(layer, args[0].detach()))
        for layer, mlp in mlps.items()
    ]
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    recorder = StatisticsRecorder(model, config)
    recorder.set_input_ids(ids)
    with torch.no_grad(), recorder:
        model(ids)
    for hook in hooks:
        hook.remove()
    arrays = recorder.arrays()
    for slot, (layer, mlp) in enumerate(mlps.items()):
        x = inputs[layer].reshape(-1, inputs[layer].shape[-1])
        top = (x @ mlp.router.layer.weight.T).topk(config.top_k, dim=-1)
        weights = torch.softmax(top.values, dim=-1)
        norms = torch.zeros(config.num_experts, dtype=torch.float64)
        weighted = torch.zeros_like(norms)
        for e in range(config.num_experts):
            token, column = (top.indices == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[token], mlp.input_linear.weight[e]).chunk(2, dim=-1)
            out = F.linear(mlp.activation(gate) * up, mlp.output_linear.weight[e]).norm(dim=-1).double()
            norms[e], weighted[e] = out.sum(), (out * weights[token, column].double()).sum()
        assert norms.gt(0).sum() >= 2
        assert torch.allclose(torch.as_tensor(arrays["act_norm_sum"][slot]), norms, rtol=1e-5)
        assert torch.allclose(torch.as_tensor(arrays["act_weighted_norm_sum"][slot]), weighted, rtol=1e-5)


def test_expert_output_statistics_are_refused_in_one_line(jetmoe):
    """--expert-outputs / --refit-stats run each expert on every token through an experts module jetmoe lacks."""
    folder, model = jetmoe
    config = Checkpoint.open(folder).config
    with pytest.raises(MoePruneError) as info, StatisticsRecorder(model, config, True, False):
        pass
    assert "jetmoe" in str(info.value) and "grouped by expert" in str(info.value) and "\n" not in str(info.value)
