"""`profile`: streaming statistics against a brute-force numpy computation, combine, shards and the CLI."""

from __future__ import annotations

import json
import random
import string

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.stats import STAT_FIELDS, Stats
from moe_prune.cli import app
from moe_prune.runtime.loading import load_model
from moe_prune.runtime.statistics import StatisticsRecorder
from moe_prune.stages import profile as stage

SEQ = 16
DOCS = 20  # one window per document: 320 tokens
CHARS = string.ascii_letters + string.digits + ".,;:!?-"
# How each family's experts compute and how its router scores (written out here, not read from the adapter).
FAMILIES = {
    "mixtral": ("fused", "softmax"),
    "qwen2_moe": ("fused", "softmax"),
    "deepseek_v3": ("fused", "sigmoid"),
    "gpt_oss": ("gpt_oss", "softmax"),
    "granitemoe": ("fused", "softmax"),
    "llama4_text": ("llama4", "sigmoid"),
    "dbrx": ("dbrx", "softmax"),
}


def write_docs(path, count: int, seed: int) -> None:
    """`count` documents of SEQ - 1 characters: with EOS each is exactly one window of SEQ tokens."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": "".join(rng.choice(CHARS) for _ in range(SEQ - 1))}) for _ in range(count)]
    path.write_text("\n".join(lines) + "\n")


def settings(**overrides) -> stage.Settings:
    return stage.Settings(**{"samples": 1000, "seq_len": SEQ, "batch_size": 3, **overrides})


# -- brute force ----------------------------------------------------------------------------------


def silu(x):
    return x / (1 + np.exp(-x))


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def expert_output(kind: str, weights: dict, config, e: int, x: np.ndarray) -> np.ndarray:
    """Expert e on inputs x [n, H], recomputed from the weights in float64."""
    w = weights
    if kind == "fused":  # gate_up [E, 2I, H], down [E, H, I]
        gate, up = np.split(x @ w["gate_up_proj"][e].T, 2, axis=1)
        return (silu(gate) * up) @ w["down_proj"][e].T
    if kind == "llama4":  # transposed: gate_up [E, H, 2I], down [E, I, H]
        gate, up = np.split(x @ w["gate_up_proj"][e], 2, axis=1)
        return (silu(gate) * up) @ w["down_proj"][e]
    if kind == "gpt_oss":  # transposed, interleaved gate/up, biases, clamped gated activation
        gate_up = x @ w["gate_up_proj"][e] + w["gate_up_proj_bias"][e]
        gate = np.minimum(gate_up[:, ::2], config.swiglu_limit)
        up = np.clip(gate_up[:, 1::2], -config.swiglu_limit, config.swiglu_limit)
        return ((up + 1) * gate * sigmoid(gate * config.swiglu_alpha)) @ w["down_proj"][e] + w["down_proj_bias"][e]
    if kind == "dbrx":  # [E*I, H] rows, expert-major
        n_experts = config.ffn_config.moe_num_experts
        w1, v1, w2 = (w[f"mlp.{k}"].reshape(n_experts, -1, x.shape[1])[e] for k in ("w1", "v1", "w2"))
        return (silu(x @ w1.T) * (x @ v1.T)) @ w2
    raise AssertionError(kind)


def capture_routing(model, config: ModelConfig, input_ids: torch.Tensor):
    """Per MoE layer: router logits, chosen experts, their weights and the expert inputs, from plain hooks."""
    adapter = config.adapter
    records = {layer: {} for layer in config.moe_layers}
    handles = []
    for layer in config.moe_layers:
        block = model.get_submodule(f"{adapter.runtime_layers}.{layer}")
        router, experts = block.get_submodule(adapter.runtime_router), block.get_submodule(adapter.runtime_experts)
        rec = records[layer]

        def on_router(module, args, output, rec=rec):
            logits = output if adapter.router_logits_output is None else output[adapter.router_logits_output]
            rec["z"] = logits.detach().double().reshape(-1, logits.shape[-1]).numpy()
            rec["x"] = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()

        def on_experts(module, args, rec=rec):
            rec["x"] = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
            rec["idx"] = args[1].reshape(rec["x"].shape[0], -1).numpy()
            rec["w"] = args[2].detach().double().reshape(rec["idx"].shape).numpy()

        handles.append(router.register_forward_hook(on_router))
        if adapter.selection_from == "experts_args":
            handles.append(experts.register_forward_pre_hook(on_experts))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return records


def brute_force(model, config: ModelConfig, kind: str, score: str, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Every forward statistic from stored activations, with numpy (each layer with its own expert count)."""
    top_k = config.top_k
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = input_ids.reshape(-1).numpy()
    opt_in = ("grad", "out_all", "refit")  # gradients, and the expert-pass statistics (tests/test_merge_refit.py)
    out = {name: [] for name in STAT_FIELDS if not name.startswith(opt_in)}
    for layer, rec in capture_routing(model, config, input_ids).items():
        prefix = f"{config.adapter.runtime_layers}.{layer}.{config.adapter.runtime_experts}."
        weights = {
            k[len(prefix) :]: v.detach().double().numpy() for k, v in model.named_parameters() if k.startswith(prefix)
        }
        z = rec["z"]
        n_experts = config.experts_per_layer[layer]
        if "idx" not in rec:  # llama4: top-k of the logits, weight sigmoid, input scaled by it
            rec["idx"] = np.argsort(-z, axis=1, kind="stable")[:, :top_k]
            rec["w"] = sigmoid(np.take_along_axis(z, rec["idx"], axis=1))
        idx, w, x = rec["idx"], rec["w"], rec["x"]
        tokens, hidden = x.shape
        probs = sigmoid(z) if score == "sigmoid" else np.exp(z) / np.exp(z).sum(1, keepdims=True)
        chosen = np.zeros((tokens, n_experts), dtype=bool)
        chosen[np.arange(tokens)[:, None], idx] = True
        seen = np.zeros((n_experts, vocab), dtype=bool)
        act = {k: np.zeros((n_experts, hidden)) for k in ("act_sum", "act_sumsq", "act_unit_sum")}
        act |= {
            k: np.zeros(n_experts) for k in ("act_norm_sum", "act_weighted_norm_sum", "act_gate_norm_sum", "act_max")
        }
        outliers = np.zeros(n_experts, dtype=np.int64)
        for t in range(tokens):
            for j in range(idx.shape[1]):
                e = idx[t, j]
                seen[e, ids[t]] = True
                inp = x[t : t + 1] * (w[t, j] if kind == "llama4" else 1.0)
                a = expert_output(kind, weights, model.config, e, inp)[0]
                norm = np.linalg.norm(a)
                act["act_sum"][e] += a
                act["act_sumsq"][e] += a * a
                act["act_unit_sum"][e] += a / norm
                act["act_norm_sum"][e] += norm
                act["act_weighted_norm_sum"][e] += w[t, j] * norm
                act["act_gate_norm_sum"][e] += w[t, j] / w[t].sum() * norm  # REAP: gate renormalised over top-k
                act["act_max"][e] = max(act["act_max"][e], np.abs(a).max())
                outliers[e] += np.sum(np.abs(a - a.mean()) > 3 * a.std())
        out["tokens"].append(tokens)
        out["hard_counts"].append(np.bincount(idx.reshape(-1), minlength=n_experts))
        out["soft_counts"].append(probs.sum(0))
        out["coselection"].append(chosen.T.astype(np.int64) @ chosen.astype(np.int64))
        out["vocab_bits"].append(np.packbits(seen, axis=1))
        out["logit_gram"].append(z.T @ z)
        out["logit_sum"].append(z.sum(0))
        for key, value in act.items():
            out[key].append(value)
        out["act_outliers"].append(outliers)
    return {k: np.stack([pad_experts(a, config.num_experts, k) for a in v]) for k, v in out.items()}


def pad_experts(array: np.ndarray, experts: int, name: str) -> np.ndarray:
    """Zero-pad a layer's statistic to `experts` slots (ragged models; both axes of [E, E] statistics)."""
    if np.ndim(array) == 0:
        return array
    missing = experts - array.shape[0]
    widths = [(0, missing)] + [(0, missing if name in ("coselection", "logit_gram") else 0)] * (array.ndim - 1)
    return np.pad(array, widths)


def assert_same_stats(got: dict, want: dict, rtol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if np.issubdtype(value.dtype, np.floating):
            # float32 model vs float64 reference: sums with cancellation need a scale-relative floor
            scale = float(np.abs(value).max()) if value.size else 0.0
            np.testing.assert_allclose(got[key], value, rtol=rtol, atol=rtol * scale, err_msg=key)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def windows_of(path, folder) -> torch.Tensor:
    """The stage's windows for a file of one-window documents, built independently (ids + EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return torch.tensor([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs])


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_statistics_match_brute_force(model_type, tiny, tmp_path):
    folder = tiny(model_type)
    data = tmp_path / "cal.jsonl"
    write_docs(data, DOCS, seed=1)
    result = stage.run(folder, str(data), settings())
    model = load_model(folder)
    config = ModelConfig.load(folder / "config.json")
    want = brute_force(model, config, *FAMILIES[model_type], windows_of(data, folder))
    assert result.tokens == DOCS * SEQ
    assert want["hard_counts"].sum() == DOCS * SEQ * config.top_k * len(config.moe_layers)
    assert_same_stats(result.stats.arrays, want)


def gradient_reference(model, config: ModelConfig, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Full gradient of the mean next-token NLL kept per expert parameter; reductions in numpy."""
    adapter = config.adapter
    hidden = model.get_input_embeddings().weight.shape[1]
    n_experts = config.num_experts
    logits = model(input_ids=input_ids, use_cache=False).logits
    targets = input_ids[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(targets.numel(), -1), targets)
    modules = [
        model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_experts}")
        for layer in config.moe_layers
    ]
    params = [list(m.parameters()) for m in modules]
    grads = torch.autograd.grad(loss, [p for layer in params for p in layer])
    out = {"grad_gram": [], "grad_entropy": [], "grad_outliers": []}
    position = 0
    for layer in params:
        per_param = [g.double().numpy() for g in grads[position : position + len(layer)]]
        position += len(layer)
        per_param = [
            g.reshape(n_experts, g.shape[0] // n_experts, *g.shape[1:]) if g.shape[0] != n_experts else g
            for g in per_param
        ]
        flat = np.concatenate([g.reshape(n_experts, -1) for g in per_param], axis=1)
        entropy = np.zeros(n_experts)
        for g in per_param:
            if g.ndim == 3:
                axis = 2 if g.shape[2] == hidden else 1
                with np.errstate(divide="ignore"):  # an expert that got no token: log 0 = -inf
                    entropy += np.log(g.std(axis=3 - axis)).sum(axis=1)
        mean, std = flat.mean(1, keepdims=True), flat.std(1, keepdims=True)
        out["grad_gram"].append(flat @ flat.T)
        out["grad_entropy"].append(entropy)
        out["grad_outliers"].append((np.abs(flat - mean) > 3 * std).sum(1))
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "dbrx"])
def test_gradients_match_brute_force(model_type, tiny, tmp_path):
    folder = tiny(model_type)
    data = tmp_path / "cal.jsonl"
    write_docs(data, 8, seed=2)
    result = stage.run(folder, str(data), settings(gradients=True))
    model = load_model(folder)
    config = ModelConfig.load(folder / "config.json")
    want = gradient_reference(model, config, windows_of(data, folder))
    got = result.stats.arrays
    scale = np.abs(want["grad_gram"]).max()  # float32 model batched differently: a scale-relative floor
    np.testing.assert_allclose(got["grad_gram"], want["grad_gram"], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(got["grad_entropy"], want["grad_entropy"], rtol=1e-6)
    np.testing.assert_array_equal(got["grad_outliers"], want["grad_outliers"])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss", "granitemoe", "llama4_text", "dbrx"])
def test_recorder_keeps_logits(model_type, tiny):
    folder = tiny(model_type)
    model = load_model(folder)
    config = ModelConfig.load(folder / "config.json")
    ids = torch.randint(2, 100, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with StatisticsRecorder(model, config) as recorder:
            recorder.set_input_ids(ids)
            watched = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert recorder.arrays()["act_norm_sum"].sum() > 0
    torch.testing.assert_close(watched, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert "forward" not in vars(
        model.get_submodule(f"{config.adapter.runtime_layers}.{config.moe_layers[0]}.{config.adapter.runtime_experts}")
    )


# -- combine and shards ---------------------------------------------------------------------------


def test_combine_of_parts_equals_union(tiny, tmp_path):
    folder = tiny("qwen2_moe")
    a, b, both = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "ab.jsonl"
    write_docs(a, 7, seed=3)
    write_docs(b, 5, seed=4)
    both.write_text(a.read_text() + b.read_text())
    runner = CliRunner()
    for name, path in (("a", a), ("b", b), ("ab", both)):
        args = ["profile", str(folder), "--data", str(path), "--out", str(tmp_path / f"{name}.npz")]
        result = runner.invoke(app, [*args, "--seq-len", str(SEQ), "--samples", "100", "--batch-size", "1"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["profile", "--combine", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "c.npz")],
    )
    assert result.exit_code == 0, result.output
    combined, union = Stats.load(tmp_path / "c.npz"), Stats.load(tmp_path / "ab.npz")
    assert_same_stats(combined.arrays, union.arrays, rtol=1e-9)
    assert [p["data"] for p in combined.provenance["combined"]] == [str(a), str(b)]


def test_shards_combine_to_whole(tiny, tmp_path):
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 9, seed=5)
    # One sequence per batch: each sequence's forward pass is bit-identical in every run, so only
    # the float64 order of the sums differs.
    whole = stage.run(folder, str(data), settings(batch_size=1))
    paths = []
    for index in range(2):
        part = stage.run(folder, str(data), settings(shard=(index, 2), batch_size=1))
        assert part.sequences == (4, 5)[index]
        paths.append(tmp_path / f"part{index}.npz")
        part.stats.save(paths[-1])
    assert_same_stats(stage.combine(paths).arrays, whole.stats.arrays, rtol=1e-9)


def test_window_choice_is_seeded(tmp_path):
    ids = torch.arange(40 * SEQ)
    first = stage.choose_windows(ids, SEQ, 10, seed=7)
    assert torch.equal(first, stage.choose_windows(ids, SEQ, 10, seed=7))
    assert not torch.equal(first, stage.choose_windows(ids, SEQ, 10, seed=8))
    starts = first[:, 0]
    assert len(set(starts.tolist())) == 10 and all(s % SEQ == 0 for s in starts.tolist())
    assert torch.equal(first, torch.stack([torch.arange(s, s + SEQ) for s in starts.tolist()]))


def test_gradient_statistics_refuse_combine(tiny, tmp_path):
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 4, seed=6)
    for index, name in enumerate(("a", "b")):  # disjoint halves, so only the gradient rule can refuse
        stage.run(folder, str(data), settings(gradients=True, shard=(index, 2))).stats.save(tmp_path / f"{name}.npz")
    result = CliRunner().invoke(
        app,
        ["profile", "--combine", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "c.npz")],
    )
    assert result.exit_code == 1 and "do not add" in result.output
    assert not (tmp_path / "c.npz").exists()


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_json_and_provenance(tiny, tmp_path):
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 6, seed=7)
    out = tmp_path / "s.npz"
    args = ["profile", str(folder), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ)]
    result = CliRunner().invoke(app, [*args, "--samples", "4", "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stats = Stats.load(out)
    assert report["tokens"] == 4 * SEQ == int(stats.arrays["tokens"][0])
    assert stats.provenance["seed"] == 3 and stats.provenance["samples"] == 4 and stats.provenance["data"] == str(data)
    assert [row["tokens"] for row in report["layers"]] == stats.arrays["tokens"].tolist()


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "contains no text"),
        ("short", "fewer than one sequence"),
        ("no_model", "model folder not found"),
        ("exists", "already exists"),
    ],
)
def test_cli_bad_input(case, message, tiny, tmp_path):
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 3, seed=8)
    if case == "empty":
        data.write_text("")
    if case == "short":
        data.write_text(json.dumps({"text": "abc"}) + "\n")
    model = str(tmp_path / "missing") if case == "no_model" else str(folder)
    out = tmp_path / "s.npz"
    if case == "exists":
        out.write_bytes(b"keep")
    result = CliRunner().invoke(app, ["profile", model, "--data", str(data), "--out", str(out), "--seq-len", str(SEQ)])
    assert result.exit_code == 1
    assert message in result.output and result.output.startswith("error:")
    assert len(result.output.strip().splitlines()) == 1
    assert (out.read_bytes() == b"keep") if case == "exists" else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cal.jsonl", *(["s.npz"] if case == "exists" else [])])


def test_provenance_carries_what_score_needs_without_the_model(tiny, tmp_path):
    """top-k, routing groups and vocabulary size travel in the file, so `score STATS` alone can check them."""
    from moe_prune.scoring.selection import Budget
    from moe_prune.stages.score import score

    folder = tiny("deepseek_v3")
    config = ModelConfig.load(folder / "config.json")
    write_docs(tmp_path / "a.jsonl", DOCS, seed=0)
    write_docs(tmp_path / "b.jsonl", DOCS, seed=1)
    a = stage.run(folder, str(tmp_path / "a.jsonl"), settings()).stats
    a.save(tmp_path / "a.npz")
    stage.run(folder, str(tmp_path / "b.jsonl"), settings()).stats.save(tmp_path / "b.npz")
    both = stage.combine([tmp_path / "a.npz", tmp_path / "b.npz"])
    for stats in (a, both):
        assert stats.provenance["top_k"] == config.top_k
        assert stats.provenance["n_group"] == config.n_group > 1
        assert stats.provenance["vocab_size"] == config.get("vocab_size")
    mask, report = score(both, None, "usage-frequency", budget=Budget(drop=config.n_group))
    assert report.warnings == [] or not any("top-k unknown" in w for w in report.warnings)
    assert all(len(kept) == config.num_experts - config.n_group for kept in mask.keep.values())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_ragged_checkpoint_statistics_match_brute_force(model_type, tiny, tmp_path):
    """A checkpoint with different expert counts per layer profiles (whole and --sequential) layer by its own count."""
    from moe_prune.artifacts.mask import DropMask
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.stages import prune

    ckpt = Checkpoint.open(tiny(model_type))
    groups = ckpt.config.n_group
    keep = {}
    for i, (layer, ids) in enumerate(ckpt.identity.original_ids.items()):
        size = len(ids) // groups
        keep[layer] = [x for g in range(groups) for x in ids[g * size : (g + 1) * size][: 2 + i % 2 * 2]]
    folder = tmp_path / "ragged"
    prune.run(ckpt.folder, DropMask.create(ckpt.identity, keep, "test"), folder)
    config = ModelConfig.load(folder / "config.json")
    assert len(set(config.experts_per_layer.values())) > 1
    data = tmp_path / "cal.jsonl"
    write_docs(data, DOCS, seed=2)
    whole = stage.run(folder, str(data), settings()).stats.arrays
    layered = stage.run(folder, str(data), settings(sequential=True)).stats.arrays
    want = brute_force(load_model(folder), config, *FAMILIES[model_type], windows_of(data, folder))
    assert_same_stats(whole, want)
    assert_same_stats(layered, whole, rtol=1e-9)
