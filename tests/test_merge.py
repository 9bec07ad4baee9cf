"""`merge`: alignment, clustering, every adapter, the manifest, bad input, and the demo perplexity table."""

from __future__ import annotations

import copy
import json
import random
import re

import numpy as np
import pytest
import torch
from helpers import checkpoint_tensors
from tiny_models import TINY
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moe_prune.architectures.spec import ExpertTensor
from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.cli import app
from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.merging.alignment import align, match_neurons
from moe_prune.merging.averaging import weighted_average
from moe_prune.merging.planning import cluster_layer, layer_counts
from moe_prune.merging.registry import METHODS, get_method
from moe_prune.merging.similarity import router_similarity
from moe_prune.merging.tensors import find_layout
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge, prune

runner = CliRunner()
FAMILIES = sorted(TINY)
MIXTRAL = {"w1.weight": ExpertTensor("w1.weight", 0), "w3.weight": ExpertTensor("w3.weight", 0)}
MIXTRAL["w2.weight"] = ExpertTensor("w2.weight", 1)
GPT_OSS = {
    "gate_up_proj": ExpertTensor("gate_up_proj", 1, parts=2, interleaved=True),
    "gate_up_proj_bias": ExpertTensor("gate_up_proj_bias", 0, parts=2, interleaved=True),
    "down_proj": ExpertTensor("down_proj", 0),
    "down_proj_bias": ExpertTensor("down_proj_bias", None),
}


def synthetic_stats(ckpt: Checkpoint, seed: int = 0, tokens: int = 400) -> Stats:
    """Statistics as `profile` would write them, from random router logits (Gram matrix and top-k counts)."""
    rng = np.random.default_rng(seed)
    layers, experts, k = len(ckpt.identity.moe_layers), ckpt.config.num_experts, ckpt.config.top_k
    logits = rng.normal(size=(layers, tokens, experts))
    counts = np.stack([np.bincount(np.argsort(-z, axis=1)[:, :k].ravel(), minlength=experts) for z in logits])
    arrays = {
        "tokens": np.full(layers, tokens),
        "hard_counts": counts,
        "logit_gram": np.einsum("lti,ltj->lij", logits, logits),
    }
    return Stats(ckpt.identity, arrays)


def permute_neurons(tensor: torch.Tensor, layout: ExpertTensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder one expert's intermediate neurons (written independently of moe_prune.merging.alignment)."""
    if layout.axis is None:
        return tensor.clone()
    size = tensor.shape[layout.axis] // layout.parts
    if layout.parts == 1:
        index = perm
    elif layout.interleaved:
        index = torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)
    else:
        index = torch.cat([perm, perm + size])
    return tensor.index_select(layout.axis, index)


# --- alignment ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layouts,shapes", [(MIXTRAL, None), (GPT_OSS, None)])
def test_permuted_expert_is_aligned_back_exactly(layouts, shapes):
    torch.manual_seed(0)
    hidden, inter = 16, 24
    shapes = {
        "w1.weight": (inter, hidden),
        "w3.weight": (inter, hidden),
        "w2.weight": (hidden, inter),
        "gate_up_proj": (hidden, 2 * inter),
        "gate_up_proj_bias": (2 * inter,),
        "down_proj": (inter, hidden),
        "down_proj_bias": (hidden,),
    }
    anchor = {key: torch.randn(shapes[key]) for key in layouts}
    perm = torch.randperm(inter)
    member = {key: permute_neurons(t, layouts[key], perm) for key, t in anchor.items()}
    assert any(not torch.equal(member[k], anchor[k]) for k in anchor)
    found = match_neurons(member, anchor, layouts)
    assert torch.equal(perm[torch.as_tensor(found)], torch.arange(inter))
    aligned = align(member, anchor, layouts)
    assert all(torch.equal(aligned[k], anchor[k]) for k in anchor)
    merged = weighted_average([anchor, aligned], [0.3, 0.7])
    assert all(torch.allclose(merged[k], anchor[k], atol=1e-6) for k in anchor)


def test_weighted_average_is_the_weighted_mean():
    a, b = {"x": torch.ones(3)}, {"x": torch.full((3,), 4.0)}
    assert torch.allclose(weighted_average([a, b], [1.0, 3.0])["x"], torch.full((3,), 3.25))


@torch.no_grad()
def _copies_of_one_expert(model, adapter, n_experts: int, seed: int) -> None:
    """Make every routed expert of every MoE layer a random neuron permutation of that layer's expert 0."""
    generator = torch.Generator().manual_seed(seed)
    layers = model.get_submodule(adapter.runtime_layers)
    for block in layers:
        try:
            experts = block.get_submodule(adapter.runtime_experts)
        except AttributeError:
            continue
        params = [
            (find_layout(name, adapter.expert_tensors), param)
            for name, param in experts.named_parameters()
            if adapter.selection_from != "grouped" or name.endswith(tuple(t.suffix for t in adapter.expert_tensors))
        ]  # jetmoe's experts module is its MoE block: its router and output bias are no expert tensors
        if adapter.tail_experts:  # longcat's gate_up_proj rows past the experts' (zero experts) are no copies
            params = [(lay, p.data[:n_experts]) for lay, p in params]
        views = [
            (lay, p.data if p.shape[0] == n_experts else p.data.view(n_experts, -1, *p.shape[1:])) for lay, p in params
        ]
        size = next(v[0].shape[lay.axis] // lay.parts for lay, v in views if lay.axis is not None)
        for e in range(1, n_experts):
            perm = torch.randperm(size, generator=generator)  # one permutation per expert, shared by its tensors
            for layout, blocks in views:
                blocks[e] = permute_neurons(blocks[0], layout, perm)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "granitemoe", "dbrx", "hunyuan_v1_moe"])
def test_merging_permuted_copies_keeps_the_logits(model_type, tiny_factory, tmp_path):
    """Experts that are permuted copies of one expert: any merge gives back that expert, so logits are unchanged.

    Families whose top-k routing weights sum to 1 make the MoE output equal that expert whatever the routing.
    """
    _, tiny = tiny_factory(model_type)
    model = copy.deepcopy(tiny)
    config = Checkpoint.open(tiny_factory(model_type)[0]).config
    adapter, n = config.adapter, config.num_experts
    _copies_of_one_expert(model, adapter, n, seed=1)
    folder = tmp_path / "copies"
    model.save_pretrained(folder)
    ckpt = Checkpoint.open(folder)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    for keep, router in ((2, "anchor"), (4, "average")):
        out = tmp_path / f"merged{keep}"
        merge.run(folder, synthetic_stats(ckpt), out, keep, MergeSpec(router=router))
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        assert Checkpoint.open(out).config.num_experts == keep
        with torch.no_grad():
            got = merged(ids).logits
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def _assert_functional_copies(model, config) -> None:
    """Every expert computes what expert 0 computes, run by the model's own experts module.

    This checks the table's layout facts independently: copies made with a wrong intermediate axis or a
    wrong gate/up split are not the same function.
    """
    adapter, n = config.adapter, config.num_experts
    layer = config.moe_layers[0]
    experts = model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_experts}")
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else None
    x = torch.randn(
        5, hidden or model.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        if adapter.selection_from == "experts_args":
            ones = torch.ones(x.shape[0], 1)
            if adapter.tail_experts:  # longcat's experts fail on top-1: the same expert again, weight 0
                ones = torch.cat([ones, torch.zeros_like(ones)], dim=1)
            outs = [experts(x, torch.full(tuple(ones.shape), e), ones) for e in range(n)]
        elif adapter.selection_from == "grouped":  # jetmoe: its ParallelExperts run rows grouped per expert
            outs = []
            for e in range(n):
                sizes = [x.shape[0] if i == e else 0 for i in range(n)]
                gate, up = experts.input_linear(x, sizes).chunk(2, dim=-1)
                outs.append(experts.output_linear(experts.activation(gate) * up, sizes))
        else:  # llama4: every expert runs on its own copy of the tokens, [E * T, H] in and out
            outs = list(experts(x.repeat(n, 1)).reshape(n, x.shape[0], -1))
    for e, out in enumerate(outs[1:], start=1):
        assert torch.allclose(out, outs[0], atol=1e-5), f"expert {e} is not a copy of expert 0"


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_merging_permuted_copies_equals_pruning_to_the_anchors(model_type, tiny_factory, tmp_path):
    """Every family: merged permuted copies (anchor router rows) are the model pruned to the cluster anchors.

    Each merged expert is the average of copies aligned back onto its anchor, i.e. the anchor itself, so the
    logits equal those of a plain prune keeping the anchors, whatever the family's routing rule. A wrong
    layout fact (an intermediate axis, gate/up interleaving, llama4's transposed fusing) breaks the alignment.
    """
    _, tiny = tiny_factory(model_type)
    model = copy.deepcopy(tiny)
    config = Checkpoint.open(tiny_factory(model_type)[0]).config
    _copies_of_one_expert(model, config.adapter, config.num_experts, seed=2)
    _assert_functional_copies(model, config)
    folder = tmp_path / "copies"
    model.save_pretrained(folder)
    ckpt = Checkpoint.open(folder)
    keep = 2 * config.n_group
    merge.run(folder, synthetic_stats(ckpt), tmp_path / "merged", keep, MergeSpec(router="anchor"))
    anchors = Manifest.read(tmp_path / "merged").slots
    prune.run(
        folder, DropMask.create(ckpt.identity, {k: list(v) for k, v in anchors.items()}, "anchors"), tmp_path / "p"
    )
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "p").eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


# --- clustering ---------------------------------------------------------------------------------------------------


def planted_similarity(sizes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy block similarity matrix with shuffled expert order; returns (S, true labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    same = labels[:, None] == labels[None, :]
    noise = rng.uniform(-0.05, 0.05, size=same.shape)
    sim = np.where(same, 0.9, 0.3) + (noise + noise.T) / 2
    np.fill_diagonal(sim, 1.0)
    return sim, labels


def partition(labels) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(np.asarray(labels) == x).tolist()) for x in set(labels)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uncurl_recovers_planted_clusters_and_is_seeded(seed):
    sim, labels = planted_similarity([4, 3, 3, 2], seed)
    frequency = np.random.default_rng(seed).integers(1, 100, size=len(labels)).astype(float)
    clusters = get_method("uncurl")(sim, frequency, 4, seed)
    assert {frozenset(c.members) for c in clusters} == partition(labels)
    for c in clusters:
        assert c.anchor == max(c.members, key=lambda m: (frequency[m], -m))
    assert get_method("uncurl")(sim, frequency, 4, seed) == clusters


def test_similarity_from_gram_is_the_mapped_cosine_of_logit_columns():
    logits = np.random.default_rng(0).normal(size=(50, 5))
    cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in logits.T] for a in logits.T])
    assert np.allclose(router_similarity(logits.T @ logits), (1 + cos) / 2)


def test_frequency_and_prune_baselines():
    sim, _ = planted_similarity([3, 3], seed=0)
    frequency = np.array([5, 50, 1, 2, 40, 3], dtype=float)
    pruned = get_method("prune")(sim, frequency, 2, 0)
    assert [(c.anchor, c.members) for c in pruned] == [(1, (1,)), (4, (4,))]
    grouped = get_method("frequency")(sim, frequency, 2, 0)
    assert [c.anchor for c in grouped] == [1, 4]
    for expert in range(6):
        if expert not in (1, 4):
            home = next(c for c in grouped if expert in c.members)
            assert sim[expert, home.anchor] == max(sim[expert, 1], sim[expert, 4])
    assert set(METHODS) >= {"uncurl", "frequency", "prune"}
    with pytest.raises(MoePruneError, match="did you mean 'uncurl'"):
        get_method("uncrl")


def test_grouped_routing_clusters_stay_in_their_group():
    sim, _ = planted_similarity([2, 2, 2, 2], seed=3)
    frequency = np.arange(1, 9, dtype=float)
    clusters = cluster_layer(get_method("uncurl"), sim, frequency, 4, 0, n_group=2)
    assert len(clusters) == 4
    assert [all(m // 4 == c.anchor // 4 for m in c.members) for c in clusters] == [True] * 4
    assert [c.anchor // 4 for c in clusters] == [0, 0, 1, 1]
    with pytest.raises(MoePruneError, match="at least 2 per group"):
        cluster_layer(get_method("uncurl"), sim, frequency, 2, 0, n_group=2)


def test_layer_counts_skip_and_overrides():
    current = {1: 8, 2: 8, 3: 8}
    assert layer_counts(current, 4, {}, [], 2) == {1: 4, 2: 4, 3: 4}
    assert layer_counts(current, 4, {3: 6}, [1], 2) == {1: 8, 2: 4, 3: 6}
    with pytest.raises(MoePruneError, match="not MoE layers"):
        layer_counts(current, 4, {}, [0], 2)
    with pytest.raises(MoePruneError, match="below top-k"):
        layer_counts(current, 4, {2: 1}, [], 2)
    with pytest.raises(MoePruneError, match="more than its 8"):
        layer_counts(current, 9, {}, [], 2)


# --- every adapter, layouts, router rules, manifest -------------------------------------------------------------


def load_stock(folder):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_to_half_reloads_in_stock_transformers(model_type, tiny_factory, tmp_path):
    folder, _ = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    n, adapter = ckpt.config.num_experts, ckpt.config.adapter
    result = merge.run(folder, synthetic_stats(ckpt), tmp_path / "half", n // 2)
    merged = Checkpoint.open(tmp_path / "half")
    assert merged.config.num_experts == n // 2 and merged.config.top_k == ckpt.config.top_k
    assert result.bytes_after < result.bytes_before
    model = load_stock(tmp_path / "half")
    with torch.no_grad():
        logits = model(torch.randint(0, 100, (1, 9))).logits
    assert torch.isfinite(logits).all()
    before, after = checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "half")
    matcher = KeyMatcher(adapter)
    routers = [name for name in after if matcher.is_router(name) is not None]
    assert len(routers) == len(ckpt.config.moe_layers)
    manifest = Manifest.read(tmp_path / "half")
    tail = list(range(n, n + ckpt.config.router_tail))  # router rows past the experts' stay after the kept ones
    for name in routers:
        layer = matcher.is_router(name)
        assert after[name].shape == (n // 2 + len(tail), before[name].shape[1])
        assert torch.equal(after[name], before[name][[*manifest.slots[layer], *tail]])  # --router anchor


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_fused_layout_on_disk_merges_like_the_legacy_layout(model_type, tiny_factory, tmp_path):
    folder, model = tiny_factory(model_type)
    fused = tmp_path / "fused"
    model.save_pretrained(fused, save_original_format=False)
    stats = synthetic_stats(Checkpoint.open(folder), seed=4)
    merge.run(folder, stats, tmp_path / "a", 4)
    merge.run(fused, Stats(Checkpoint.open(fused).identity, stats.arrays), tmp_path / "b", 4)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = load_stock(tmp_path / "a")(ids).logits, load_stock(tmp_path / "b")(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_method_prune_equals_the_prune_stage(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    stats = synthetic_stats(ckpt, seed=2)
    merge.run(folder, stats, tmp_path / "merge", 4, MergeSpec(method="prune"))
    counts = stats.arrays["hard_counts"]
    keep = {
        layer: sorted(np.argsort(-counts[i], kind="stable")[:4].tolist())
        for i, layer in enumerate(ckpt.identity.moe_layers)
    }
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "prune")
    a, b = checkpoint_tensors(tmp_path / "merge"), checkpoint_tensors(tmp_path / "prune")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Checkpoint.open(tmp_path / "merge").identity.original_ids == {k: tuple(v) for k, v in keep.items()}


@pytest.mark.parametrize("model_type", ["gpt_oss", "deepseek_v3"])
def test_router_average_and_reinit(model_type, tiny_factory, tmp_path):
    folder, _ = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    adapter = ckpt.config.adapter
    matcher = KeyMatcher(adapter)
    before = checkpoint_tensors(folder)
    merge.run(folder, synthetic_stats(ckpt), tmp_path / "avg", 4, MergeSpec(router="average"))
    merge.run(folder, synthetic_stats(ckpt), tmp_path / "new", 4, MergeSpec(router="reinit", seed=3))
    avg, new = checkpoint_tensors(tmp_path / "avg"), checkpoint_tensors(tmp_path / "new")
    manifest = Manifest.read(tmp_path / "avg")
    checked = 0
    for name in before:
        key = matcher.classify(name)
        is_router_row = matcher.is_router(name) is not None or (
            adapter.router_bias and name.endswith(adapter.router_bias)
        )
        if key is None or not (is_router_row or key.kind == "last_axis"):
            continue
        axis = 0 if key.kind == "rows" else -1
        original = before[name].movedim(axis, 0)
        want = torch.stack(
            [sum(w * original[orig] for orig, w in slot) for slot in manifest.members(key.layer)]
        ).movedim(0, axis)
        assert torch.allclose(avg[name], want, atol=1e-6)
        fresh = new[name]
        assert fresh.shape == want.shape
        if matcher.is_router(name) is not None:
            assert not torch.allclose(fresh, want) and fresh.std() > 0
        else:
            assert torch.count_nonzero(fresh) == 0
        checked += 1
    assert checked >= 2 * len(ckpt.config.moe_layers)


def test_manifest_records_members_and_a_second_merge_speaks_original_ids(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    stats = synthetic_stats(ckpt, seed=5)
    result = merge.run(folder, stats, tmp_path / "once", 4)
    manifest = Manifest.read(tmp_path / "once")
    history = manifest.history[-1]
    assert history["stage"] == "merge" and history["method"] == "uncurl"
    for i, layer in enumerate(ckpt.identity.moe_layers):
        counts = stats.arrays["hard_counts"][i]
        slots = manifest.members(layer)
        assert sorted(orig for slot in slots for orig, _ in slot) == list(range(8))
        for anchor, slot, report in zip(manifest.slots[layer], slots, result.layers[i].clusters, strict=True):
            ids = [orig for orig, _ in slot]
            assert anchor == max(ids, key=lambda e: (counts[e], -e))
            assert [w for _, w in slot] == pytest.approx([counts[e] / counts[ids].sum() for e in ids])
            assert report.members == ids
    once = Checkpoint.open(tmp_path / "once")
    assert once.identity.original_ids == manifest.slots
    merge.run(tmp_path / "once", synthetic_stats(once, seed=6), tmp_path / "twice", 2, MergeSpec(method="frequency"))
    twice = Manifest.read(tmp_path / "twice")
    for layer in ckpt.identity.moe_layers:
        ids = sorted(orig for slot in twice.members(layer) for orig, _ in slot)
        assert ids == list(range(8))
        assert all(sum(w for _, w in slot) == pytest.approx(1.0) for slot in twice.members(layer))
    load_stock(tmp_path / "twice")


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.fixture
def mixtral_stats(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    stats = synthetic_stats(Checkpoint.open(folder))
    path = tmp_path / "stats.npz"
    stats.save(path)
    return folder, stats, path


def _refused(args: list[str], out, pattern: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output
    assert re.search(pattern, result.output.replace("\n", " ")), result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize(
    "keep,pattern",
    [("9", r"more than its 8 experts"), ("1", r"below top-k 2"), ("4 --keep 7=2", r"not MoE layers"), ("x", "--keep")],
)
def test_bad_keep_is_refused(mixtral_stats, tmp_path, keep, pattern):
    folder, _, path = mixtral_stats
    out = tmp_path / "out"
    keep_args = [a for part in keep.split(" --keep ") for a in ("--keep", part)]
    _refused(["merge", str(folder), "--stats", str(path), *keep_args, "--out", str(out)], out, pattern)


def test_stats_of_another_model_are_refused(mixtral_stats, tiny_factory, tmp_path):
    folder, _, _ = mixtral_stats
    other_folder, _ = tiny_factory("qwen3_moe")
    other = tmp_path / "other.npz"
    synthetic_stats(Checkpoint.open(other_folder)).save(other)
    out = tmp_path / "out"
    _refused(["merge", str(folder), "--stats", str(other), "--keep", "4", "--out", str(out)], out, r"qwen3_moe")


def test_stats_without_router_logits_are_refused(mixtral_stats, tmp_path):
    folder, stats, _ = mixtral_stats
    path = tmp_path / "counts.npz"
    Stats(stats.identity, {k: v for k, v in stats.arrays.items() if k != "logit_gram"}).save(path)
    out = tmp_path / "out"
    _refused(["merge", str(folder), "--stats", str(path), "--keep", "4", "--out", str(out)], out, r"logit_gram")
    # the prune baseline needs only selection counts
    result = runner.invoke(app, ["merge", str(folder), "-s", str(path), "-k", "4", "-o", str(out), "--method", "prune"])
    assert result.exit_code == 0, result.output


def test_unknown_method_router_and_non_uniform_are_refused(mixtral_stats, tmp_path):
    folder, _, path = mixtral_stats
    out = tmp_path / "out"
    base = ["merge", str(folder), "--stats", str(path), "--keep", "4", "--out", str(out)]
    _refused([*base, "--method", "uncrul"], out, r"did you mean 'uncurl'")
    _refused([*base, "--router", "mean"], out, r"anchor, average, reinit")


def test_skip_layers_give_a_ragged_checkpoint_that_loads_with_its_model_code(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    n, first = ckpt.config.num_experts, ckpt.config.moe_layers[0]
    merge.run(folder, synthetic_stats(ckpt), tmp_path / "ragged", n // 2, MergeSpec(skip_layers=[first]))
    merged = Checkpoint.open(tmp_path / "ragged")
    counts = {layer: merged.config.experts_in_layer(layer) for layer in merged.config.moe_layers}
    assert counts == {layer: n if layer == first else n // 2 for layer in ckpt.config.moe_layers}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ragged", trust_remote_code=True).eval()
    original = load_stock(folder)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    routers = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
    assert [r.weight.shape[0] for r in routers] == [counts[layer] for layer in sorted(counts)]
    # the skipped layer is carried over unchanged: its experts equal the original's
    skipped, kept = original.model.layers[first].mlp.experts, model.model.layers[first].mlp.experts
    assert torch.equal(skipped.gate_up_proj, kept.gate_up_proj) and torch.equal(skipped.down_proj, kept.down_proj)


def test_quantised_experts_are_refused(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    half = tmp_path / "fp8"
    state = {k: v.to(torch.float8_e4m3fn) if ".experts." in k else v for k, v in checkpoint_tensors(folder).items()}
    half.mkdir()
    from safetensors.torch import save_file

    save_file(state, half / "model.safetensors", metadata={"format": "pt"})
    (half / "config.json").write_text((folder / "config.json").read_text())
    stats = synthetic_stats(Checkpoint.open(half))
    with pytest.raises(MoePruneError, match=r"F8_E4M3 .*needs float expert tensors"):
        merge.run(half, stats, tmp_path / "out", 4)
    assert not (tmp_path / "out").exists()


def test_cli_table_json_and_plot(mixtral_stats, tmp_path):
    folder, _, path = mixtral_stats
    out, png = tmp_path / "out", tmp_path / "s.png"
    result = runner.invoke(app, ["merge", str(folder), "-s", str(path), "-k", "4", "-o", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "mean S" in result.output and "8 → 4" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, ["merge", str(folder), "-s", str(path), "-k", "4", "-o", str(out), "--json"])
    assert result.exit_code == 1 and "already exists" in result.output
    result = runner.invoke(app, ["merge", str(folder), "-s", str(path), "-k", "4", "-o", str(out), "--json", "--force"])
    report = json.loads(result.stdout)
    assert report["experts_after"] == {"0": 4, "1": 4, "2": 4}
    members = [m for layer in report["layers"][:1] for c in layer["clusters"] for m in c["members"]]
    assert sorted(members) == list(range(8))


# --- the demo model: perplexity after shrinking, merge vs baselines ----------------------------------------------


def _demo_table(demo_stats, demo_perplexity, tmp_path, skip: list[int]) -> dict[str, dict[int, float]]:
    """Perplexity at 4 and 2 experts per layer for every method and the mean of five random masks."""
    ckpt = Checkpoint.open(DEMO_MODEL_DIR)
    runs = {"uncurl": ("uncurl", "anchor"), "uncurl, --router average": ("uncurl", "average")}
    runs |= {"frequency": ("frequency", "anchor"), "prune (most used)": ("prune", "anchor")}
    rows: dict[str, dict[int, float]] = {}
    for keep in (4, 2):
        for label, (method, router) in runs.items():
            out = tmp_path / f"{method}-{router}-{keep}-{skip}"
            result = merge.run(
                DEMO_MODEL_DIR, demo_stats, out, keep, MergeSpec(method=method, router=router, skip_layers=skip)
            )
            assert result.bytes_after < result.bytes_before
            rows.setdefault(label, {})[keep] = demo_perplexity(out)
        random_ppl = []
        for seed in range(5):
            rng = random.Random(seed)
            keeps = {
                layer: list(range(8)) if layer in skip else rng.sample(range(8), keep)
                for layer in ckpt.identity.moe_layers
            }
            out = tmp_path / f"random{keep}-{seed}-{skip}"
            prune.run(DEMO_MODEL_DIR, DropMask.create(ckpt.identity, keeps, "random"), out)
            random_ppl.append(demo_perplexity(out))
        rows.setdefault("random masks (mean of 5)", {})[keep] = sum(random_ppl) / len(random_ppl)
    return rows


def _print_table(title: str, full: float, rows: dict[str, dict[int, float]]) -> None:
    lines = [
        "| method | 8 experts (original) | 4 experts (1/2) | 2 experts (1/4) |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {full:.3f} | {ppl[4]:.3f} | {ppl[2]:.3f} |" for name, ppl in rows.items()),
    ]
    print(f"\n{title}\n" + "\n".join(lines))


def test_uncurl_beats_random_masks_at_half_on_the_demo(demo_stats, demo_perplexity, tmp_path):
    """The fast check of the table below (first MoE layer kept, 4 of 8 experts): uncurl beats random masks."""
    ckpt = Checkpoint.open(DEMO_MODEL_DIR)
    first = ckpt.identity.moe_layers[0]
    merge.run(DEMO_MODEL_DIR, demo_stats, tmp_path / "uncurl", 4, MergeSpec(skip_layers=[first]))
    random_ppl = []
    for seed in range(5):
        rng = random.Random(seed)
        keeps = {
            layer: list(range(8)) if layer == first else rng.sample(range(8), 4) for layer in ckpt.identity.moe_layers
        }
        prune.run(DEMO_MODEL_DIR, DropMask.create(ckpt.identity, keeps, "random"), tmp_path / f"random{seed}")
        random_ppl.append(demo_perplexity(tmp_path / f"random{seed}"))
    assert demo_perplexity(DEMO_MODEL_DIR) < demo_perplexity(tmp_path / "uncurl") < sum(random_ppl) / len(random_ppl)


@pytest.mark.slow
def test_demo_perplexity_table(demo_stats, demo_perplexity, tmp_path):
    """Perplexity after shrinking the demo to 1/2 and 1/4 of its experts: merge methods vs pruning baselines.

    Printed for the README, twice: with the first MoE layer kept as it is (UNCURL's recommendation; random
    masks keep it too), where uncurl and frequency must beat random, and with every layer shrunk, where the
    demo's evenly loaded, indispensable layer 0 dominates every method and only sanity is asserted.
    """
    full = demo_perplexity(DEMO_MODEL_DIR)
    first = Checkpoint.open(DEMO_MODEL_DIR).identity.moe_layers[0]
    skipped = _demo_table(demo_stats, demo_perplexity, tmp_path, [first])
    _print_table(f"first MoE layer ({first}) kept (--skip-layers {first}):", full, skipped)
    every = _demo_table(demo_stats, demo_perplexity, tmp_path, [])
    _print_table("every MoE layer shrunk:", full, every)
    for rows in (skipped, every):
        assert all(full < ppl[keep] < 1e4 for ppl in rows.values() for keep in (4, 2))
        assert all(ppl[4] < ppl[2] for ppl in rows.values())
    random_mean = skipped["random masks (mean of 5)"]
    for method in ("uncurl", "frequency"):
        for keep in (4, 2):
            assert skipped[method][keep] < random_mean[keep], (method, keep, skipped[method][keep], random_mean[keep])


def test_existing_plot_is_refused_before_the_merge(mixtral_stats, tmp_path):
    folder, _, path = mixtral_stats
    out, png = tmp_path / "out", tmp_path / "s.png"
    png.write_bytes(b"an earlier picture")
    result = runner.invoke(app, ["merge", str(folder), "-s", str(path), "-k", "4", "-o", str(out), "--plot", str(png)])
    assert result.exit_code == 1 and "s.png: already exists; pass --force" in result.output
    assert not out.exists() and png.read_bytes() == b"an earlier picture"
