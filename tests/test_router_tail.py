"""Router rows past the routed experts' (`Adapter.router_tail`): inkling_text's router has a row per shared expert
after the routed ones ([E + shared, H]), zaya's a skip expert. They are no experts, so every edit keeps them,
unchanged, after the kept or merged rows; validation checks the row count against the config; statistics count
only experts (a zaya skip pick reaches the experts as expert 0 with weight 0 and is nobody's).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import checkpoint_tensors
from test_derived import _build
from test_merge import load_stock, synthetic_stats

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.errors import MoePruneError
from moe_prune.runtime.statistics import StatisticsRecorder
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge

FAMILY = "inkling_text"


@pytest.fixture(scope="module")
def inkling(tmp_path_factory):
    folder = tmp_path_factory.mktemp(FAMILY) / "model"
    _build(FAMILY, folder, {})
    return folder


@pytest.mark.parametrize("router", ["anchor", "average", "reinit"])
def test_merge_keeps_the_tail_rows_after_the_merged_ones(inkling, router, tmp_path):
    ckpt = Checkpoint.open(inkling)
    n, tail = ckpt.config.num_experts, ckpt.config.router_tail
    assert tail == 1
    merge.run(inkling, synthetic_stats(ckpt), tmp_path / "half", n // 2, MergeSpec(router=router, seed=1))
    before, after = checkpoint_tensors(inkling), checkpoint_tensors(tmp_path / "half")
    matcher = KeyMatcher(ckpt.config.adapter)
    routers = [name for name in after if matcher.is_router(name) is not None]
    assert len(routers) == len(ckpt.config.moe_layers)
    for name in routers:
        assert after[name].shape == (n // 2 + tail, before[name].shape[1])
        assert torch.equal(after[name][n // 2 :], before[name][n:])
    with torch.no_grad():
        assert torch.isfinite(load_stock(tmp_path / "half")(torch.randint(0, 100, (1, 9))).logits).all()


def test_router_rows_must_be_experts_plus_tail(inkling, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(inkling, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_shared_experts"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError) as info:
        Checkpoint.open(folder)
    message = str(info.value)
    assert "n_shared_experts" in message and "router" in message and "\n" not in message


def test_skip_picks_are_no_experts_in_the_statistics(tmp_path):
    """Independent path: the router's own choice (softmax + balancing biases, top-k over E + 1 classes), skip
    picks left out. transformers resets the biases on load (skip last at -1: never picked), so they are set here."""
    model = _build("zaya", tmp_path / "zaya", {})
    config = Checkpoint.open(tmp_path / "zaya").config
    n, picks = config.num_experts, []

    def choose(module, args, output):
        probs = torch.softmax(output[0].float(), -1) + module.balancing_biases
        picks.append(probs.topk(config.top_k, -1).indices)

    gates = [model.get_submodule(f"model.layers.{layer}.mlp.gate") for layer in config.moe_layers]
    with torch.no_grad():
        for gate in gates:
            gate.balancing_biases[-1] = 0.35  # the skip expert wins some tokens
    hooks = [gate.register_forward_hook(choose) for gate in gates]
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    recorder = StatisticsRecorder(model, config)
    recorder.set_input_ids(ids)
    with torch.no_grad(), recorder:
        model(ids)
    for hook in hooks:
        hook.remove()
    want = torch.stack([torch.bincount(p[p < n], minlength=n) for p in picks])
    skipped = sum(int((p == n).sum()) for p in picks)
    assert 0 < skipped < sum(p.numel() for p in picks)
    assert torch.equal(recorder.hard_counts, want)
    assert (recorder.arrays()["coselection"].diagonal(axis1=1, axis2=2) == want.numpy()).all()
