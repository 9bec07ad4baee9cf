"""longcat_flash's identity 'zero experts' (`Adapter.tail_experts`): zero_expert_num router rows, selection-bias
entries and gate/up weights (per-expert keys E.., or fused gate_up_proj rows past E) after the routed experts.

prune and merge keep them, unchanged, after the kept or merged experts; validation refuses a partial set; profile
credits no routed expert with a zero expert's pick (checked against the router's own choice).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import checkpoint_tensors
from test_derived import DERIVED_TINY, _build
from test_merge import load_stock, synthetic_stats

from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.runtime.statistics import StatisticsRecorder
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge, prune

FAMILY = "longcat_flash"
PREFIX = "model.layers.{L}.mlp."


@pytest.fixture(scope="module")
def longcat(tmp_path_factory):
    folder = tmp_path_factory.mktemp(FAMILY) / "model"
    return folder, _build(FAMILY, folder, DERIVED_TINY[FAMILY])


def _tails_kept(before: dict, after: dict, layer: int, n: int, kept: int, zero: int) -> None:
    """After the `kept` experts: the zero experts' router rows, selection bias and gate/up weights, unchanged."""
    p = PREFIX.format(L=layer)
    router, bias = f"{p}router.classifier.weight", f"{p}router.e_score_correction_bias"
    assert after[router].shape[0] == kept + zero and torch.equal(after[router][kept:], before[router][n:])
    assert torch.equal(after[bias][kept:], before[bias][n:])
    for z in range(zero):
        for part in ("gate_proj", "up_proj"):
            assert torch.equal(
                after[f"{p}experts.{kept + z}.{part}.weight"], before[f"{p}experts.{n + z}.{part}.weight"]
            )
    assert f"{p}experts.{kept}.down_proj.weight" not in after  # zero experts have no down projection


def test_prune_keeps_the_zero_experts_after_the_kept_ones(longcat, tmp_path):
    folder, _ = longcat
    ckpt = Checkpoint.open(folder)
    n, zero = ckpt.config.num_experts, ckpt.config.router_tail
    assert zero > 0
    keep = {layer: [1, 4, 6] for layer in ckpt.config.moe_layers}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    before, after = checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "out")
    for layer in ckpt.config.moe_layers:
        _tails_kept(before, after, layer, n, 3, zero)
    load_stock(tmp_path / "out")


def test_prune_keeps_fused_zero_expert_rows(longcat, tmp_path):
    """The in-memory layout: gate_up_proj [E + zero, 2I, H] keeps its last rows, down_proj [E, H, I] has none."""
    _, model = longcat
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    ckpt = Checkpoint.open(tmp_path / "fused")
    n, zero = ckpt.config.num_experts, ckpt.config.router_tail
    keep = {layer: [0, 5] for layer in ckpt.config.moe_layers}
    prune.run(tmp_path / "fused", DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    before, after = checkpoint_tensors(tmp_path / "fused"), checkpoint_tensors(tmp_path / "out")
    gate_up = PREFIX.format(L=0) + "experts.gate_up_proj"
    assert after[gate_up].shape[0] == 2 + zero and torch.equal(after[gate_up][2:], before[gate_up][n:])
    assert torch.equal(after[gate_up][:2], before[gate_up][[0, 5]])
    assert after[PREFIX.format(L=0) + "experts.down_proj"].shape[0] == 2
    load_stock(tmp_path / "out")


@pytest.mark.parametrize("router", ["anchor", "average"])
def test_merge_keeps_the_zero_experts_after_the_merged_ones(longcat, router, tmp_path):
    folder, _ = longcat
    ckpt = Checkpoint.open(folder)
    n, zero = ckpt.config.num_experts, ckpt.config.router_tail
    merge.run(folder, synthetic_stats(ckpt), tmp_path / "half", n // 2, MergeSpec(router=router, seed=1))
    before, after = checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "half")
    for layer in ckpt.config.moe_layers:
        p = PREFIX.format(L=layer)
        assert torch.equal(after[f"{p}router.classifier.weight"][n // 2 :], before[f"{p}router.classifier.weight"][n:])
        for z in range(zero):
            assert torch.equal(
                after[f"{p}experts.{n // 2 + z}.gate_proj.weight"], before[f"{p}experts.{n + z}.gate_proj.weight"]
            )
    with torch.no_grad():
        assert torch.isfinite(load_stock(tmp_path / "half")(torch.randint(0, 100, (1, 9))).logits).all()


def test_a_missing_zero_expert_is_refused(longcat, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(longcat[0], folder)
    tensors = checkpoint_tensors(folder)
    ckpt = Checkpoint.open(folder)
    n = ckpt.config.num_experts
    del tensors[PREFIX.format(L=1) + f"experts.{n + 2}.gate_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, str(ckpt.shard_files[0]), metadata={"format": "pt"})
    with pytest.raises(MoePruneError) as info:
        Checkpoint.open(folder)
    assert f"expert {n + 2}" in str(info.value) and "\n" not in str(info.value)


def test_zero_expert_picks_are_no_experts_in_the_statistics(longcat):
    """Independent path: the router's own choice (softmax + e_score_correction_bias, top-k over E + zero), zero
    expert picks left out; the recorder's per-expert forward leaves the logits as they were."""
    folder, model = longcat
    config = Checkpoint.open(folder).config
    n, picks = config.num_experts, []

    def choose(module, args, output):
        picks.append(output[2].reshape(-1, config.top_k))

    routers = [model.get_submodule(PREFIX.format(L=layer) + "router") for layer in config.moe_layers]
    hooks = [router.register_forward_hook(choose) for router in routers]
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = model(ids).logits
    picks.clear()
    recorder = StatisticsRecorder(model, config)
    recorder.set_input_ids(ids)
    with torch.no_grad(), recorder:
        got_logits = model(ids).logits
    for hook in hooks:
        hook.remove()
    assert torch.allclose(got_logits, want_logits, atol=1e-5)
    want = torch.stack([torch.bincount(p[p < n], minlength=n) for p in picks])
    zero_picks = sum(int((p >= n).sum()) for p in picks)
    assert 0 < zero_picks < sum(p.numel() for p in picks)
    assert torch.equal(recorder.hard_counts, want)
    assert (recorder.arrays()["coselection"].diagonal(axis1=1, axis2=2) == want.numpy()).all()


def test_its_dense_mtp_layer_is_copied_whole_or_dropped(longcat, tmp_path):
    """Released checkpoints hold one dense MTP layer under model.mtp (vLLM's longcat_flash_mtp names; transformers
    skips model\\.mtp.*): prune copies it unchanged, --drop-mtp removes it."""
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(longcat[0], folder)
    tensors = checkpoint_tensors(folder)
    mtp = {
        "model.mtp.layers.0.eh_proj.weight": torch.randn(32, 64),
        "model.mtp.layers.0.transformer_layer.mlp.gate_proj.weight": torch.randn(48, 32),
        "model.mtp.norm.weight": torch.randn(32),
    }
    save_file({**tensors, **mtp}, str(Checkpoint.open(folder).shard_files[0]), metadata={"format": "pt"})
    ckpt = Checkpoint.open(folder)
    keep = {layer: [0, 2, 3, 7] for layer in ckpt.config.moe_layers}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "kept")
    after = checkpoint_tensors(tmp_path / "kept")
    assert all(torch.equal(after[name], value) for name, value in mtp.items())
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "dropped", drop_mtp=True)
    assert not set(mtp) & set(checkpoint_tensors(tmp_path / "dropped"))
