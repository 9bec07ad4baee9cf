"""Non-uniform ("ragged") masks: different expert counts per layer, loaded through modeling_moe_prune.py.

Each pruned checkpoint is reloaded with `AutoModelForCausalLM(..., trust_remote_code=True)` and compared
with the ORIGINAL model whose dropped experts are masked out of routing (tests/reference.py).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from reference import masked_logits
from tiny_models import TINY, save_char_tokenizer, tiny_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint import ragged
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import prune

# Experts kept per routing group, cycling over the MoE layers: never the same count in every layer.
RAGGED = {1: [6, 3, 5], 2: [3, 2]}
FUSED = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe", "dbrx"]


def keep_per_group(ckpt: Checkpoint, per_group: list[int], seed: int) -> dict[int, list[int]]:
    """Random original ids to keep: `per_group[i % len]` in each routing group of the i-th MoE layer."""
    rng = random.Random(seed)
    groups = ckpt.config.n_group
    keep = {}
    for i, layer in enumerate(ckpt.identity.moe_layers):
        ids = list(ckpt.identity.original_ids[layer])
        size = len(ids) // groups
        n = per_group[i % len(per_group)]
        keep[layer] = sorted(x for g in range(groups) for x in rng.sample(ids[g * size : (g + 1) * size], n))
    return keep


def ragged_mask(ckpt: Checkpoint, seed: int = 0) -> tuple[DropMask, dict[int, list[int]]]:
    keep = keep_per_group(ckpt, RAGGED[ckpt.config.n_group], seed)
    assert len({len(k) for k in keep.values()}) > 1, "the mask must be non-uniform"
    return DropMask.create(ckpt.identity, keep, "test"), keep


def reference(original, ckpt: Checkpoint, keep: dict[int, list[int]], ids: torch.Tensor) -> torch.Tensor:
    """The original model with every expert outside `keep` (original ids) masked out of routing."""
    n = ckpt.config.num_experts
    dropped = {layer: sorted(set(range(n)) - set(kept)) for layer, kept in keep.items()}
    return masked_logits(copy.deepcopy(original), ckpt.config.adapter, n, dropped, ids)


def token_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


def assert_matches(folder, original, ckpt, keep, trust_remote_code=True) -> None:
    ids = token_ids()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        got = model(ids).logits
        full = original(ids).logits
    want = reference(original, ckpt, keep, ids)
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
    assert (got - full).abs().max() > 1e-4, "dropping experts changed nothing: the check would be vacuous"


def check_ragged_files(out, keep) -> dict:
    config = json.loads((out / "config.json").read_text())
    counts = {str(layer): len(kept) for layer, kept in keep.items()}
    text = config.get("text_config", config)  # a wrapper's block sits beside the counts, in its text config
    assert text[RAGGED_KEY]["experts_per_layer"] == counts and (text is config or RAGGED_KEY not in config)
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_moe_prune.Ragged")
    assert (out / ragged.MODEL_FILE).read_text() == ragged.model_code()
    assert Checkpoint.open(out).identity.original_ids == {k: tuple(v) for k, v in keep.items()}
    return config


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_ragged_prune_matches_masked_original(model_type, tiny_factory, tmp_path):
    folder, original = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    mask, keep = ragged_mask(ckpt)
    out = tmp_path / "out"
    result = prune.run(folder, mask, out)
    assert result.ragged and result.experts_after_per_layer == {k: len(v) for k, v in keep.items()}
    config = check_ragged_files(out, keep)
    for key in config[RAGGED_KEY]["count_keys"]:
        assert Checkpoint.open(out).config.get(key) == max(len(k) for k in keep.values())
    assert_matches(out, original, ckpt, keep)


@pytest.mark.parametrize("model_type", FUSED)
def test_ragged_prune_of_fused_layout(model_type, tiny_factory, tmp_path):
    _, original = tiny_factory(model_type)
    fused = tmp_path / "fused"
    original.save_pretrained(fused, save_original_format=False)
    ckpt = Checkpoint.open(fused)
    mask, keep = ragged_mask(ckpt, seed=5)
    prune.run(fused, mask, tmp_path / "out")
    assert_matches(tmp_path / "out", original, ckpt, keep)


def test_layer_with_fewer_experts_than_top_k(tiny_factory, tmp_path):
    folder, original = tiny_factory("mixtral")  # top-k 2
    ckpt = Checkpoint.open(folder)
    keep = {0: [5], 1: [0, 2, 4, 6], 2: [1, 2, 3, 5, 7]}
    result = prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    assert result.top_k == 2 and result.warnings == [
        "layer 0: top-k 2 is more than the 1 experts kept; that layer uses 1 per token"
    ]
    config = check_ragged_files(tmp_path / "out", keep)
    assert config[RAGGED_KEY]["top_k_per_layer"] == {"0": 1, "1": 2, "2": 2}
    assert_matches(tmp_path / "out", original, ckpt, keep)


def test_loads_without_moe_prune_in_a_fresh_process(tiny_factory, tmp_path):
    folder, original = tiny_factory("qwen2_moe")
    ckpt = Checkpoint.open(folder)
    mask, keep = ragged_mask(ckpt)
    out = tmp_path / "out"
    prune.run(folder, mask, out)
    torch.save(token_ids(), tmp_path / "ids.pt")
    script = (
        "import sys\n"
        "sys.modules['moe_prune'] = None  # any import of moe_prune now raises ImportError\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
        "print(type(model).__module__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "PYTHONHOME"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, str(out), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "modeling_moe_prune" in done.stdout
    got = torch.load(tmp_path / "logits.pt")
    want = reference(original, ckpt, keep, token_ids())
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-4)


def test_uniform_mask_writes_no_model_code(tiny_factory, tmp_path):
    folder, _ = tiny_factory("olmoe")
    ckpt = Checkpoint.open(folder)
    keep = keep_per_group(ckpt, [5], seed=0)
    result = prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not result.ragged and result.model_code == []
    assert "auto_map" not in config and RAGGED_KEY not in config
    assert not list((tmp_path / "out").glob("*.py"))


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_second_prune_of_ragged_checkpoint(model_type, tiny_factory, tmp_path):
    folder, original = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    mask, _ = ragged_mask(ckpt, seed=1)
    prune.run(folder, mask, tmp_path / "once")
    once = Checkpoint.open(tmp_path / "once")
    groups = ckpt.config.n_group
    second = keep_per_group(once, [2, 1, 3] if groups == 1 else [2], seed=2)
    second_mask = DropMask.create(once.identity, second, "test")
    result = prune.run(tmp_path / "once", second_mask, tmp_path / "twice")
    assert result.experts_before_per_layer == {k: len(v) for k, v in mask.keep.items()}
    if groups == 1:
        check_ragged_files(tmp_path / "twice", second)
        assert_matches(tmp_path / "twice", original, ckpt, second)
    else:  # two per group in every layer: uniform again, so stock transformers loads it
        config = json.loads((tmp_path / "twice" / "config.json").read_text())
        assert RAGGED_KEY not in config and "auto_map" not in config
        assert not (tmp_path / "twice" / ragged.MODEL_FILE).exists()
        assert_matches(tmp_path / "twice", original, ckpt, second, trust_remote_code=False)


def test_grouped_ragged_mask_must_keep_groups_even(tiny_factory, tmp_path):
    folder, _ = tiny_factory("deepseek_v3")  # n_group 2: experts 0-3 and 4-7; MoE layers 1, 2
    ckpt = Checkpoint.open(folder)
    keep = {1: [0, 1, 2, 4, 5, 6], 2: [0, 1, 2, 4, 5]}  # layer 2 keeps 3 + 2
    mask_file = tmp_path / "mask.json"
    mask_file.write_text(DropMask.create(ckpt.identity, keep, "test").dumps())
    result = CliRunner().invoke(app, ["prune", str(folder), "--mask", str(mask_file), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "layer 2 keeps [3, 2] experts in its 2 routing groups" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_tampered_model_code_is_not_trusted_silently(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    prune.run(folder, ragged_mask(ckpt)[0], tmp_path / "out")
    model_file = tmp_path / "out" / ragged.MODEL_FILE
    model_file.write_text(model_file.read_text() + "\n# edited\n")
    with pytest.raises(MoePruneError, match="--trust-remote-code"):
        load_model(tmp_path / "out")
    assert load_model(tmp_path / "out", trust_remote_code=True) is not None


def test_inconsistent_ragged_config_is_refused(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    prune.run(folder, ragged_mask(ckpt)[0], tmp_path / "out")
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    config[RAGGED_KEY]["experts_per_layer"].pop("2")
    path.write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match=r"experts_per_layer lists layers \[0, 1\]"):
        _ = Checkpoint.open(tmp_path / "out").identity


def test_cli_eval_of_ragged_checkpoint_equals_masked_reference(tiny_factory, tmp_path):
    folder, original = tiny_factory("mixtral")
    source = tmp_path / "model"
    shutil.copytree(folder, source)
    save_char_tokenizer(source)
    ckpt = Checkpoint.open(source)
    mask, keep = ragged_mask(ckpt, seed=3)
    mask_file = tmp_path / "mask.json"
    mask_file.write_text(mask.dumps())
    runner = CliRunner()
    pruned = runner.invoke(app, ["prune", str(source), "--mask", str(mask_file), "--out", str(tmp_path / "o")])
    assert pruned.exit_code == 0, pruned.output
    assert "trust_remote_code" in pruned.output
    rng = random.Random(0)
    docs = ["".join(rng.choice("abcdefgh ") for _ in range(40)) for _ in range(4)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    seq = 16
    result = runner.invoke(app, ["eval", str(tmp_path / "o"), "--data", str(data), "--seq-len", str(seq), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["model"]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    stream = [i for d in docs for i in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    chunks = torch.tensor([stream[s : s + seq] for s in range(0, len(stream) - seq + 1, seq)])
    logits = reference(original, ckpt, keep, chunks)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), chunks[:, 1:].reshape(-1))
    assert report["tokens_scored"] == chunks[:, 1:].numel()
    assert report["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)
    for load in report["load"]:
        kept = keep[load["layer"]]
        assert load["experts"] == len(kept) and load["original_ids"] == kept
        assert sum(load["counts"]) == load["tokens"] * min(2, len(kept))


def test_config_entry_point_without_a_model():
    """The API `merge` shares: stock config for equal counts, ragged block + model file otherwise."""
    from moe_prune.architectures import get_adapter

    adapter = get_adapter("mixtral")
    raw = {"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2}
    raw["auto_map"] = {"AutoConfig": "x.Cfg", "AutoModelForCausalLM": "x.Model", "AutoTokenizer": ["t.Tok", None]}
    uniform, files = ragged.expert_count_config(raw, adapter, {0: 1, 1: 1}, 2)
    assert files == {} and uniform["num_local_experts"] == 1 and uniform["num_experts_per_tok"] == 1
    assert uniform["auto_map"] == raw["auto_map"], "someone else's auto_map is not ours to remove"
    config, files = ragged.expert_count_config(raw, adapter, {0: 3, 1: 5}, 4)
    assert files == {ragged.MODEL_FILE: ragged.model_code()}
    assert config["num_local_experts"] == 5 and config["num_experts_per_tok"] == 4
    assert config[RAGGED_KEY]["top_k_per_layer"] == {"0": 3, "1": 4}
    # Exactly moe-prune's class: loading without --trust-remote-code requires it (runtime/loading.py).
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_moe_prune.RaggedMixtralForCausalLM"}
    assert raw["num_local_experts"] == 8 and RAGGED_KEY not in raw, "the input dict is not modified"
    back, files = ragged.expert_count_config(config, adapter, {0: 2, 1: 2}, 4)
    assert files == {} and RAGGED_KEY not in back and "auto_map" not in back
    text = {k: v for k, v in raw.items() if k != "auto_map"}
    wrapped = {
        "model_type": "qwen3_5_moe",
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "text_config": {**text, "model_type": "qwen3_5_moe_text", "num_experts": 8},
    }
    config, files = ragged.expert_count_config(wrapped, get_adapter("qwen3_5_moe_text"), {0: 3, 1: 5}, 2)
    block = config["text_config"][RAGGED_KEY]  # beside the counts it overrides, in the text config
    assert RAGGED_KEY not in config and block["experts_per_layer"] == {"0": 3, "1": 5}
    # the class AutoModelForCausalLM builds for the wrapper's config.json, named at the top where it looks
    assert block["base_class"] == "Qwen3_5MoeForCausalLM"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_moe_prune.RaggedQwen3_5MoeForCausalLM"}
    assert config["architectures"] == ["MoePruneRaggedQwen3_5MoeForCausalLM"]
    back, files = ragged.expert_count_config(config, get_adapter("qwen3_5_moe_text"), {0: 2, 1: 2}, 2)
    assert files == {} and RAGGED_KEY not in back["text_config"] and "auto_map" not in back
    assert back["architectures"] == ["Qwen3_5MoeForConditionalGeneration"], "the wrapper's own class comes back"


def test_ragged_model_saved_by_transformers_prunes_again(tiny_factory, tmp_path):
    """A ragged model re-saved by transformers itself (fused layout, no moe_prune.json) is still sized per layer."""
    folder, original = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    mask, _ = ragged_mask(ckpt, seed=7)
    prune.run(folder, mask, tmp_path / "once")
    slots = Checkpoint.open(tmp_path / "once").identity.original_ids
    load_model(tmp_path / "once").save_pretrained(tmp_path / "resaved", save_original_format=False)
    resaved = Checkpoint.open(tmp_path / "resaved")
    assert (resaved.folder / ragged.MODEL_FILE).read_text() == ragged.model_code()
    assert resaved.identity.original_ids == {layer: tuple(range(len(ids))) for layer, ids in slots.items()}
    second = keep_per_group(resaved, [1, 2, 4], seed=8)  # slot numbers of the re-saved model
    prune.run(resaved.folder, DropMask.create(resaved.identity, second, "test"), tmp_path / "twice")
    in_original_ids = {layer: sorted(slots[layer][s] for s in kept) for layer, kept in second.items()}
    assert_matches(tmp_path / "twice", original, ckpt, in_original_ids)


def test_second_round_on_a_ragged_model_profiles_scores_and_prunes(tiny_factory, tmp_path):
    """profile -> score -> prune on a checkpoint with different expert counts per layer (issue: a second round)."""

    from moe_prune.artifacts.stats import Stats
    from moe_prune.stages import profile, score
    from moe_prune.stages.score import Budget

    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    mask, _ = ragged_mask(ckpt, seed=3)
    prune.run(folder, mask, tmp_path / "once")
    save_char_tokenizer(tmp_path / "once")
    once = Checkpoint.open(tmp_path / "once")
    counts = [once.identity.experts_in(layer) for layer in once.identity.moe_layers]
    data = tmp_path / "cal.txt"
    data.write_text("".join(chr(32 + (i * 7919) % 90) for i in range(4000)))
    stats = profile.run(once.folder, str(data), profile.Settings(samples=8, seq_len=32, seed=0, batch_size=4)).stats
    stats.save(tmp_path / "s.npz")
    stats = Stats.load(tmp_path / "s.npz")
    hard = stats.arrays["hard_counts"]
    for row, n in zip(hard, counts, strict=True):
        assert row[n:].sum() == 0 and row[:n].sum() > 0, "padding slots are empty, real ones used"
    second, _ = score.score(stats, None, "usage-frequency", budget=Budget(drop=1))
    for i, layer in enumerate(once.identity.moe_layers):
        n = counts[i]
        ids = once.identity.original_ids[layer]
        least = min(range(n), key=lambda s: (hard[i][s], s))  # independent: the least used real slot
        assert second.drop(layer) == (ids[least],)
    glob, _ = score.score(stats, None, "usage-frequency", budget=Budget(drop=3), global_=True, min_keep=2)
    flat = sorted((hard[i][s], i, s) for i, n in enumerate(counts) for s in range(n))
    want = {}
    for _, i, s in flat:
        if sum(len(v) for v in want.values()) == 3:
            break
        if counts[i] - len(want.get(i, [])) > 2:
            want.setdefault(i, []).append(s)
    for i, layer in enumerate(once.identity.moe_layers):
        ids = once.identity.original_ids[layer]
        assert sorted(glob.drop(layer)) == sorted(ids[s] for s in want.get(i, []))
    prune.run(once.folder, second, tmp_path / "twice")
    reloaded = Checkpoint.open(tmp_path / "twice")
    assert [reloaded.identity.experts_in(layer) for layer in reloaded.identity.moe_layers] == [n - 1 for n in counts]
    with torch.no_grad():
        assert torch.isfinite(load_model(tmp_path / "twice")(torch.tensor([[3, 4, 5]])).logits).all()


# Families whose model computes a load-balancing loss (their config has output_router_logits).
AUX_LOSS_FAMILIES = sorted(t for t in TINY if hasattr(tiny_config(t), "output_router_logits"))


@pytest.mark.parametrize("model_type", AUX_LOSS_FAMILIES)
def test_ragged_forward_with_labels_and_router_logits(model_type, tiny_factory, tmp_path):
    """Training with the family's load-balancing loss works on a ragged checkpoint (it concatenated widths before)."""
    import sys

    from moe_prune.checkpoint import modeling_moe_prune

    folder, _ = tiny_factory(model_type)
    ckpt = Checkpoint.open(folder)
    mask, _ = ragged_mask(ckpt, seed=5)
    prune.run(folder, mask, tmp_path / "out")
    model = load_model(tmp_path / "out")
    ids = torch.randint(2, 100, (2, 12))
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert torch.isfinite(out.loss)
    family = sys.modules[type(model).__mro__[2].__module__]
    if not hasattr(family, "load_balancing_loss_func") or out.aux_loss is None:
        return
    original = family.load_balancing_loss_func.__wrapped__
    logits = out.router_logits
    widths = {g.shape[-1] for g in logits}
    assert len(widths) > 1
    top_k = model.config.get_text_config().num_experts_per_tok if hasattr(model.config, "num_experts_per_tok") else 2
    want = sum(
        len(group) * original(tuple(group), w, min(top_k, w), None)
        for w in widths
        for group in [[g for g in logits if g.shape[-1] == w]]
    ) / len(logits)
    assert torch.allclose(modeling_moe_prune.per_width(original)(logits, 99, top_k, None), want)
    same = tuple(g[:, :2] for g in logits)  # equal widths: exactly the stock call
    assert torch.equal(modeling_moe_prune.per_width(original)(same, 2, 1, None), original(same, 2, 1, None))


def test_merging_a_ragged_checkpoint_equals_pruning_it_to_the_anchors(tiny_factory, tmp_path):
    """merge --method prune on a ragged model (each layer its own count) keeps exactly the anchors' experts."""
    from test_merge import synthetic_stats

    from moe_prune.artifacts.manifest import Manifest
    from moe_prune.stages import merge

    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    mask, _ = ragged_mask(ckpt, seed=4)
    prune.run(folder, mask, tmp_path / "ragged")
    ragged_ckpt = Checkpoint.open(tmp_path / "ragged")
    stats = synthetic_stats(ragged_ckpt)
    merge.run(ragged_ckpt.folder, stats, tmp_path / "merged", 2, MergeSpec(method="prune"))
    anchors = Manifest.read(tmp_path / "merged").slots
    keep = {layer: list(ids) for layer, ids in anchors.items()}
    prune.run(ragged_ckpt.folder, DropMask.create(ragged_ckpt.identity, keep, "anchors"), tmp_path / "pruned")
    ids = token_ids(3)
    with torch.no_grad():
        got = load_model(tmp_path / "merged")(ids).logits
        want = load_model(tmp_path / "pruned")(ids).logits
    assert torch.equal(got, want)
    merge.run(ragged_ckpt.folder, stats, tmp_path / "uncurl", 2)  # real merges of a ragged layer load and run
    with torch.no_grad():
        assert torch.isfinite(load_model(tmp_path / "uncurl")(ids).logits).all()


@pytest.mark.parametrize("criterion", ["weight-norm", "weight-similarity", "router-weight-norm", "stable-rank"])
def test_weight_criteria_on_a_ragged_checkpoint_score_each_expert_as_before(criterion, tiny_factory, tmp_path):
    """Pruning copies weights, so a kept expert's weight norm, stable rank and router norm are unchanged."""
    from moe_prune.stages.score import Budget, score

    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    mask, keep = ragged_mask(ckpt, seed=6)
    prune.run(folder, mask, tmp_path / "ragged")
    _, before = score(None, folder, criterion, budget=Budget(drop=1))
    mask_after, after = score(None, tmp_path / "ragged", criterion, budget=Budget(drop=1))
    for layer, kept in keep.items():
        scores = after.scores[layer]
        assert len(scores) == len(kept) and len(mask_after.drop(layer)) == 1
        if criterion != "weight-similarity":  # similarity depends on which other experts remain
            assert scores == pytest.approx([before.scores[layer][e] for e in kept], rel=1e-6)
