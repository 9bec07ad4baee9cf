"""HC-SMoE clustering, --weights output and --refit: constructed cases, hand computations, brute force, copies."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_merge import _copies_of_one_expert, planted_similarity, synthetic_stats
from test_profile import FAMILIES, capture_routing, settings, silu, windows_of, write_docs
from tiny_models import save_char_tokenizer
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.merging.planning import cluster_layer
from moe_prune.merging.refit import least_squares_down
from moe_prune.merging.registry import LayerStats, get_method
from moe_prune.runtime.loading import load_model
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge
from moe_prune.stages import profile as profile_stage

runner = CliRunner()


def planted_features(sizes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Expert feature rows scattered tightly around one centre per planted cluster, order shuffled."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    centres = rng.normal(size=(len(sizes), 16)) * 10
    return centres[labels] + rng.normal(size=(len(labels), 16)) * 0.1, labels


def groups(labels) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(np.asarray(labels) == x).tolist()) for x in set(labels)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hcsmoe_recovers_planted_clusters_deterministically(seed):
    """HC-SMoE clusters the output features, ignores the router similarity and needs no seed."""
    features, labels = planted_features([3, 2, 2, 1], seed)
    frequency = np.random.default_rng(seed).integers(1, 100, size=len(labels)).astype(float)
    misleading, _ = planted_similarity([4, 4], seed)  # router similarity that disagrees: must be ignored
    clusters = get_method("hcsmoe")(misleading, frequency, 4, seed, LayerStats({"out_all_sum": features}))
    assert {frozenset(c.members) for c in clusters} == groups(labels)
    assert all(c.anchor == max(c.members, key=lambda m: (frequency[m], -m)) for c in clusters)
    again = get_method("hcsmoe")(misleading, frequency, 4, seed + 7, LayerStats({"out_all_sum": features}))
    assert again == clusters


def test_hcsmoe_sees_only_its_routing_group():
    """Grouped routing: each group is clustered on its own rows of the context (experts 0-3 and 4-7)."""
    features = np.repeat(np.arange(4.0), 2)[:, None] * np.ones((1, 3))  # pairs (0,1) (2,3) (4,5) (6,7)
    clusters = cluster_layer(
        get_method("hcsmoe"), np.eye(8), np.arange(8.0), 4, 0, 2, LayerStats({"out_all_sum": features})
    )
    assert [c.members for c in clusters] == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_least_squares_down_solves_the_normal_equations():
    rng = np.random.default_rng(0)
    h, y, p = rng.normal(size=(200, 6)), rng.normal(size=(200, 3)), rng.uniform(size=200)
    want = np.linalg.lstsq(h * np.sqrt(p)[:, None], y * np.sqrt(p)[:, None], rcond=None)[0]
    got = least_squares_down((h * p[:, None]).T @ h, (h * p[:, None]).T @ y)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


# --- output-weighted averaging ---------------------------------------------------------------------------------


@torch.no_grad()
def scaled_copies(model, scales: list[float]) -> None:
    """Expert e of every MoE layer := scales[e] x expert 0 (so neuron matching is the identity)."""
    for block in model.model.layers:
        experts = block.mlp.experts
        for param in (experts.gate_up_proj, experts.down_proj):
            for e, scale in enumerate(scales):
                param.data[e] = scale * param.data[0]


def test_output_weighted_average_equals_a_hand_computation(tiny_factory, tmp_path):
    _, tiny = tiny_factory("mixtral")
    model = copy.deepcopy(tiny)
    scales = [1.0, 0.5, 2.0, 1.5, 0.8, 1.2, 0.3, 3.0]
    scaled_copies(model, scales)
    model.save_pretrained(tmp_path / "scaled")
    ckpt = Checkpoint.open(tmp_path / "scaled")
    stats = synthetic_stats(ckpt)
    share = np.random.default_rng(5).uniform(1, 10, size=stats.arrays["hard_counts"].shape)
    stats = Stats(ckpt.identity, {**stats.arrays, "act_weighted_norm_sum": share})
    result = merge.run(tmp_path / "scaled", stats, tmp_path / "out", 3, MergeSpec(method="frequency", weights="output"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for row, report in enumerate(result.layers):
        experts = merged.model.layers[report.layer].mlp.experts
        for slot, cluster in enumerate(report.clusters):
            w = share[row, cluster.members] / share[row, cluster.members].sum()
            assert np.allclose(cluster.weights, w)
            factor = float(sum(wi * scales[m] for wi, m in zip(w, cluster.members, strict=True)))
            for name in ("gate_up_proj", "down_proj"):
                want = factor * getattr(model.model.layers[report.layer].mlp.experts, name)[0]
                assert torch.allclose(getattr(experts, name)[slot], want, atol=1e-6), (report.layer, slot, name)
    assert result.weights == "output" and Manifest.read(tmp_path / "out").slots


# --- refit -----------------------------------------------------------------------------------------------------


def refit_targets(model, config, input_ids, layer: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """float64 numpy on captured activations: each expert's intermediate activation h_e, the refit target y (the
    gate-weighted mean of the chosen experts' outputs) and the router probabilities p [tokens, E]."""
    rec = capture_routing(model, config, input_ids)[layer]
    experts = model.get_submodule(f"model.layers.{layer}.mlp.experts")
    gate_up = experts.gate_up_proj.detach().double().numpy()
    down = experts.down_proj.detach().double().numpy()
    x, z, idx, w = rec["x"], rec["z"], rec["idx"], rec["w"]
    hidden = [silu(g) * u for g, u in (np.split(x @ gate_up[e].T, 2, axis=1) for e in range(len(gate_up)))]
    y = sum(w[:, j : j + 1] * np.stack([hidden[e][t] @ down[e].T for t, e in enumerate(idx[:, j])]) for j in range(2))
    y = y / w.sum(axis=1, keepdims=True)
    p = np.exp(z - z.max(1, keepdims=True))
    return hidden, y, p / p.sum(1, keepdims=True)


def refit_reference(model, config, input_ids, layer: int, anchor: int) -> np.ndarray:
    """D^T of `anchor` by weighted least squares on captured activations, recomputed in float64 numpy."""
    hidden, y, p = refit_targets(model, config, input_ids, layer)
    root = np.sqrt(p[:, anchor])[:, None]
    return np.linalg.lstsq(hidden[anchor] * root, y * root, rcond=None)[0]


@pytest.fixture(scope="module")
def refit_case(tiny, tmp_path_factory):
    """The tiny mixtral, its calibration windows and statistics with --refit-stats."""
    folder = tiny("mixtral")
    tmp = tmp_path_factory.mktemp("refit")
    data = tmp / "cal.jsonl"
    write_docs(data, 40, seed=4)
    stats = profile_stage.run(folder, str(data), settings(refit_stats=True, expert_outputs=True)).stats
    return folder, data, stats, tmp


def test_refit_down_projection_equals_brute_force_least_squares(refit_case, tmp_path):
    folder, data, stats, _ = refit_case
    result = merge.run(folder, stats, tmp_path / "out", 3, MergeSpec(method="uncurl", refit=True))
    model, config = load_model(folder), Checkpoint.open(folder).config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = windows_of(data, folder)
    for report in result.layers:
        new, old = merged.model.layers[report.layer].mlp, model.model.layers[report.layer].mlp
        for slot, cluster in enumerate(report.clusters):
            want = refit_reference(model, config, ids, report.layer, cluster.anchor).T
            got = new.experts.down_proj[slot].detach().double().numpy()
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
            assert torch.equal(new.experts.gate_up_proj[slot], old.experts.gate_up_proj[cluster.anchor])
            assert torch.equal(new.gate.weight[slot], old.gate.weight[cluster.anchor])


@pytest.mark.parametrize(
    "model_type,method,options",
    [
        ("mixtral", "hcsmoe", {}),
        ("mixtral", "frequency", {"weights": "output"}),
        ("mixtral", "prune", {"refit": True}),
        ("deepseek_v3", "uncurl", {"refit": True}),  # sigmoid router, top-k renormalised then scaled by 2.5
    ],
)
def test_merging_permuted_copies_keeps_the_logits_with_new_methods(model_type, method, options, tiny_factory, tmp_path):
    """Experts that are permuted copies of one expert: HC-SMoE, output weights and the refit give it back.

    A refit slot reproduces the gate-weighted MEAN of the chosen outputs: with scaled gates (DeepSeek-V3's
    routed_scaling_factor) the layer's output is still the original one.
    """
    _, tiny = tiny_factory(model_type)
    model = copy.deepcopy(tiny)
    config = Checkpoint.open(tiny_factory(model_type)[0]).config
    _copies_of_one_expert(model, config.adapter, config.num_experts, seed=3)
    assert getattr(model.config, "routed_scaling_factor", 1.0) == (2.5 if model_type == "deepseek_v3" else 1.0)
    folder = tmp_path / "copies"
    model.save_pretrained(folder)
    save_char_tokenizer(folder)
    write_docs(tmp_path / "cal.jsonl", 30, seed=1)
    flags = {"expert_outputs": method == "hcsmoe", "refit_stats": bool(options.get("refit"))}
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings(**flags)).stats
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    merge.run(folder, stats, tmp_path / "merged", 2 * config.n_group, MergeSpec(method=method, **options))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize(
    "options,drop,message",
    [
        (
            {"method": "hcsmoe"},
            "out_all_sum",
            r"lacks out_all_sum, which --method hcsmoe needs; re-run `moe-prune profile --expert-outputs`",
        ),
        ({"weights": "output"}, "act_weighted_norm_sum", r"lacks act_weighted_norm_sum, which --weights output"),
        ({"refit": True}, "refit_hy", r"lacks refit_hy, which --refit needs; re-run `moe-prune profile --refit-stats`"),
        ({"weights": "mean"}, None, r"unknown --weights 'mean'"),
    ],
)
def test_missing_statistics_are_refused_before_writing(refit_case, tmp_path, options, drop, message):
    folder, _, stats, _ = refit_case
    arrays = {k: v for k, v in stats.arrays.items() if k != drop}
    with pytest.raises(MoePruneError, match=message):
        merge.run(folder, Stats(stats.identity, arrays), tmp_path / "out", 4, MergeSpec(**options))
    assert not (tmp_path / "out").exists()


def test_refit_refuses_experts_with_biases(tiny, tmp_path):
    """gpt-oss experts have a down-projection bias the refit does not fit: refused in one line, nothing written."""
    folder = tiny("gpt_oss")
    ckpt = Checkpoint.open(folder)
    stats = synthetic_stats(ckpt)
    layers, experts = stats.arrays["hard_counts"].shape
    inner, hidden = 8, 4
    eye = np.broadcast_to(np.eye(inner), (layers, experts, inner, inner)).copy()
    arrays = {**stats.arrays, "refit_hh": eye, "refit_hy": np.zeros((layers, experts, inner, hidden))}
    with pytest.raises(MoePruneError, match="without a bias"):
        merge.run(folder, Stats(ckpt.identity, arrays), tmp_path / "out", 4, MergeSpec(refit=True))
    assert not (tmp_path / "out").exists()
    assert FAMILIES["gpt_oss"][0] == "gpt_oss"


def test_cli_profile_flags_and_merge_options(tiny, tmp_path):
    """`profile --expert-outputs --refit-stats` then `merge --method hcsmoe --weights output --refit --json`."""
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 12, seed=3)
    stats, out, data = tmp_path / "s.npz", tmp_path / "out", str(tmp_path / "cal.jsonl")
    args = ["profile", str(folder), "-d", data, "--seq-len", "16", "--samples", "12", "-o", str(stats)]
    result = runner.invoke(app, [*args, "--expert-outputs", "--refit-stats", "--json"])
    assert result.exit_code == 0, result.output
    assert {"out_all_sum", "refit_hh", "refit_hy"} <= set(json.loads(result.stdout)["statistics"])
    args = ["merge", str(folder), "-s", str(stats), "-k", "4", "-o", str(out), "--method", "hcsmoe"]
    result = runner.invoke(app, [*args, "--weights", "output", "--refit", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["method"], report["weights"], report["refit"]) == ("hcsmoe", "output", True)
    assert Manifest.read(out).history[-1]["refit"] is True


@pytest.fixture(scope="module")
def demo_refit_stats():
    """Demo statistics with the refit sums: 16 calibration windows of 256 tokens."""
    from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR

    options = profile_stage.Settings(samples=16, seq_len=256, refit_stats=True)
    return profile_stage.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), options).stats


def test_refit_beats_pruning_at_a_quarter_of_the_demo_experts(demo_refit_stats, demo_perplexity, tmp_path):
    """Every demo layer at 2 of 8 experts: the refit keeps perplexity near the original, pruning does not.

    (Measured with 64 calibration windows, full held-out split: 4.3 against 92; see the README table.)
    """
    from moe_prune.demo import DEMO_MODEL_DIR

    merge.run(DEMO_MODEL_DIR, demo_refit_stats, tmp_path / "prune", 2, MergeSpec(method="prune"))
    merge.run(DEMO_MODEL_DIR, demo_refit_stats, tmp_path / "refit", 2, MergeSpec(method="prune", refit=True))
    full, pruned, refit = (demo_perplexity(p) for p in (DEMO_MODEL_DIR, tmp_path / "prune", tmp_path / "refit"))
    assert full < refit < 2 * full < pruned / 4, (full, refit, pruned)
