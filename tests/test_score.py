"""`score`: every criterion on a constructed case with a known answer (min and max), selection, CLI, pipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error
from safetensors import safe_open
from typer.testing import CliRunner

from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.scoring import all_criteria
from moe_prune.scoring.selection import Budget
from moe_prune.stages.score import score

runner = CliRunner()
L, E, H = 2, 6, 16
IDENT = ModelIdentity("mixtral", L, {0: tuple(range(E)), 1: tuple(range(E))}, "sha256:synthetic")


def make_stats(arrays: dict[str, np.ndarray], ident: ModelIdentity = IDENT) -> Stats:
    return Stats(ident, arrays, {"top_k": 2})


def drops(stats: Stats, criterion: str, direction: str, n: int = 1, **kw) -> dict[int, list[int]]:
    _, report = score(stats, None, criterion, direction=direction, budget=Budget(drop=n), **kw)
    return report.dropped


def outputs_to_stats(outputs: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Running sums as `profile` keeps them, from explicit per-token expert outputs [n_e, H]."""

    def stack(fn):
        return np.array([[fn(a) for a in layer] for layer in outputs])

    counts = stack(len).astype(float)
    return {
        "hard_counts": counts,
        "tokens": counts.sum(axis=1) / 2,
        "act_sum": stack(lambda a: a.sum(axis=0) if len(a) else np.zeros(H)),
        "act_sumsq": stack(lambda a: (a**2).sum(axis=0) if len(a) else np.zeros(H)),
        "act_unit_sum": stack(
            lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).sum(axis=0) if len(a) else np.zeros(H)
        ),
    }


def reference_activation_scores(outputs: list[list[np.ndarray]], name: str) -> np.ndarray:
    """The paper's formulas computed directly on the outputs (not through the running sums)."""
    scores = np.zeros((L, E))
    for li, layer in enumerate(outputs):
        if name == "activation-similarity":
            sim = np.zeros((E, E))
            for p in range(E):
                for q in range(E):
                    a, b = layer[p], layer[q]
                    if len(a) and len(b):
                        cos = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (
                            b / np.linalg.norm(b, axis=1)[:, None]
                        ).T
                        sim[p, q] = cos.mean()
            scores[li] = sim.sum(axis=1) - np.diag(sim)
        for e, a in enumerate(layer):
            if name == "activation-entropy":
                std = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(H)
                scores[li, e] = np.log(np.maximum(std, 1e-12)).sum()
            elif name == "activation-norm":
                scores[li, e] = np.linalg.norm(a, axis=0).sum() if len(a) else 0.0
    return scores


@pytest.fixture(scope="module")
def outputs():
    """Layer 0: expert 2 never routed, expert 4 has one huge output dim, expert 5
    points against the common direction, expert 1 near constant. Layer 1: random."""
    rng = np.random.default_rng(0)
    common = rng.normal(size=H)
    layer0 = [common + 0.4 * rng.normal(size=(int(n), H)) for n in rng.integers(20, 40, size=E)]
    layer0[1] = rng.normal(size=H) + 1e-4 * rng.normal(size=(30, H))
    layer0[2] = np.zeros((0, H))
    layer0[4][:, 7] *= 300.0
    layer0[5] = -common + 0.4 * rng.normal(size=(30, H))
    layer1 = [rng.normal(size=(int(n), H)) * rng.uniform(0.5, 2) for n in rng.integers(20, 40, size=E)]
    return [layer0, layer1]


@pytest.mark.parametrize(
    "name, planted_min, planted_max",
    [
        ("activation-similarity", 5, None),  # max: whichever the direct formula says
        ("activation-entropy", 2, 4),
        ("activation-norm", 2, 4),
    ],
)
def test_activation_criteria_match_the_paper_formula(outputs, name, planted_min, planted_max):
    stats = make_stats(outputs_to_stats(outputs))
    ref = reference_activation_scores(outputs, name)
    for direction, planted, pick in (("min", planted_min, np.argmin), ("max", planted_max, np.argmax)):
        got = drops(stats, name, direction)
        assert got == {0: [int(pick(ref[0]))], 1: [int(pick(ref[1]))]}
        assert pick(ref[0]) == (planted if planted is not None else got[0][0])


def _planted(values_min: int, values_max: int, low: float = 1.0, high: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(1)
    arr = rng.uniform(10, 20, size=(L, E))
    arr[:, values_min], arr[:, values_max] = low, high
    return arr


@pytest.mark.parametrize(
    "name, field",
    [
        ("activation-outliers", "act_outliers"),
        ("router-weighted-activation-norm", "act_weighted_norm_sum"),
        ("gradient-outliers", "grad_outliers"),
        ("gradient-entropy", "grad_entropy"),
    ],
)
def test_direct_statistics_criteria(name, field):
    low = -np.inf if name == "gradient-entropy" else 0.0  # a never-routed expert's zero gradient: log 0
    stats = make_stats({field: _planted(3, 1, low=low)})
    assert drops(stats, name, "min") == {0: [3], 1: [3]}
    assert drops(stats, name, "max") == {0: [1], 1: [1]}


def test_counts_are_normalised_per_layer_tokens():
    counts = _planted(2, 5, low=0.0, high=500.0)
    stats = make_stats({"hard_counts": counts, "tokens": counts.sum(axis=1) / 2, "soft_counts": counts * 0.3})
    for name in ("usage-frequency", "soft-counts"):
        assert drops(stats, name, "min") == {0: [2], 1: [2]}
        assert drops(stats, name, "max") == {0: [5], 1: [5]}
    _, report = score(stats, None, "usage-frequency", budget=Budget(drop=1))
    assert np.allclose(report.scores[1], counts[1] / (counts[1].sum() / 2))


def test_gradient_similarity_and_norm_from_the_gram_matrix():
    rng = np.random.default_rng(2)
    grads = rng.normal(size=(L, E, 50))
    grads[:, 3] = 0.0  # never routed: no gradient
    grads[:, 1] *= 10.0  # largest gradient
    grads[:, 4] = grads[:, 0] + grads[:, 2] + grads[:, 5]  # most similar to the others
    gram = grads @ np.swapaxes(grads, 1, 2)
    stats = make_stats({"grad_gram": gram})
    assert drops(stats, "gradient-norm", "min") == {0: [3], 1: [3]}
    assert drops(stats, "gradient-norm", "max") == {0: [1], 1: [1]}
    unit = grads / np.maximum(np.linalg.norm(grads, axis=2, keepdims=True), 1e-30)
    cos = unit @ np.swapaxes(unit, 1, 2)
    ref = cos.sum(axis=2) - np.einsum("lii->li", cos)
    assert drops(stats, "gradient-similarity", "max") == {0: [4], 1: [4]}
    assert drops(stats, "gradient-similarity", "min") == {i: [int(np.argmin(ref[i]))] for i in range(L)}


def _bits(sets: list[set[int]], vocab: int = 64) -> np.ndarray:
    dense = np.zeros((E, vocab), dtype=np.uint8)
    for e, ids in enumerate(sets):
        dense[e, list(ids)] = 1
    return np.packbits(dense, axis=-1)


def test_vocabulary_coverage_and_token_overlap():
    rng = np.random.default_rng(3)
    sets = [set(rng.choice(64, size=30, replace=False).tolist()) for _ in range(E)]
    sets[0], sets[5] = set(range(32)), set(range(32, 64))  # disjoint pair: overlap 0
    sets[1] = sets[3] = set(range(64))  # identical full-coverage pair: largest overlap
    sets[2] = {7, 40}  # covers two tokens
    bits = np.stack([_bits(sets)] * L)
    hard = np.tile(np.array([50.0, 10, 30, 40, 30, 20]), (L, 1))
    stats = make_stats({"vocab_bits": bits, "hard_counts": hard, "tokens": hard.sum(axis=1) / 2})
    assert drops(stats, "vocabulary-coverage", "min") == {0: [2], 1: [2]}
    assert drops(stats, "vocabulary-coverage", "max") == {0: [1], 1: [1]}  # tie 1/3 -> lower slot
    assert drops(stats, "token-overlap", "max") == {0: [1], 1: [1]}  # pair (1, 3): 1 is less used
    assert drops(stats, "token-overlap", "min") == {0: [5], 1: [5]}  # pair (0, 5): 5 is less used
    _, report = score(stats, None, "vocabulary-coverage", budget=Budget(drop=0))
    assert report.scores[0][2] == pytest.approx(2 / 64)


def test_co_selection_greedy_pairs():
    rng = np.random.default_rng(4)
    co = rng.uniform(5, 10, size=(E, E))
    co = (co + co.T) / 2
    co[1, 3] = co[3, 1] = 1000  # most co-selected pair; 1 less used
    co[2, 4] = co[4, 2] = 900  # second; 4 less used
    co[0, 5] = co[5, 0] = 0  # least co-selected; 5 less used
    hard = np.array([90.0, 20, 70, 80, 30, 10])
    stats = make_stats({"coselection": np.stack([co] * L), "hard_counts": np.stack([hard] * L)})
    assert drops(stats, "co-selection", "max", n=2) == {0: [1, 4], 1: [1, 4]}
    assert drops(stats, "co-selection", "min") == {0: [5], 1: [5]}


# ---- selection ---------------------------------------------------------------------------------------------


def _counts_stats() -> tuple[Stats, np.ndarray]:
    rng = np.random.default_rng(5)
    counts = rng.integers(500, 1000, size=(3, 8))
    counts[0, :6] = rng.integers(0, 10, size=6)  # layer 0 has six nearly unused experts
    ident = ModelIdentity("mixtral", 3, {i: tuple(range(8)) for i in range(3)}, "sha256:synthetic")
    tokens = np.maximum(counts.sum(axis=1) // 2, counts.max(axis=1))  # top-2, and no expert above the tokens
    return make_stats({"hard_counts": counts, "tokens": tokens}, ident), counts / tokens[:, None]


@pytest.mark.parametrize("min_keep", [None, 2, 4])
def test_global_selection_respects_min_keep(min_keep):
    stats, normalised = _counts_stats()
    mask, report = score(stats, None, "usage-frequency", budget=Budget(drop=8), global_=True, min_keep=min_keep)
    floor = min_keep or 2  # default: top-k
    kept = {layer: len(ids) for layer, ids in mask.keep.items()}
    assert sum(8 - k for k in kept.values()) == 8 and min(kept.values()) >= floor
    assert kept[0] == floor  # the cheap layer is pruned down to its floor, not below
    assert not mask.is_uniform
    for layer, dropped in report.dropped.items():  # within the non-floored layers, dropped <= kept
        if kept[layer] > floor:
            kept_scores = [normalised[layer][i] for i in mask.keep[layer]]
            assert all(normalised[layer][d] <= min(kept_scores) for d in dropped)
    highest_dropped = max(normalised[layer][d] for layer, ds in report.dropped.items() for d in ds)
    free = [normalised[layer][i] for layer in mask.keep if kept[layer] > floor for i in mask.keep[layer]]
    assert highest_dropped <= min(free)


def test_global_refusals():
    stats, _ = _counts_stats()
    with pytest.raises(MoePruneError, match="below top-k 2"):
        score(stats, None, "usage-frequency", budget=Budget(drop=2), global_=True, min_keep=1)
    with pytest.raises(MoePruneError, match="at most 18 can go"):
        score(stats, None, "usage-frequency", budget=Budget(drop=19), global_=True)
    with pytest.raises(MoePruneError, match="not comparable across layers"):
        score(
            make_stats({"act_sumsq": np.ones((L, E, H))}), None, "activation-norm", budget=Budget(drop=1), global_=True
        )


@pytest.mark.parametrize(
    "budget, per_layer",
    [
        (Budget(drop=3), 3),
        (Budget(keep=5), 3),
        (Budget(ratio=0.25), 2),
        (Budget(ratio=0.3), 2),
        (Budget(ratio=0.3125), 3),
    ],
)
def test_drop_keep_ratio_arithmetic(budget, per_layer):
    stats, _ = _counts_stats()
    mask, _ = score(stats, None, "usage-frequency", budget=budget)
    assert all(len(k) == 8 - per_layer for k in mask.keep.values())


def test_global_budget_counts_all_layers():
    stats, _ = _counts_stats()
    mask, _ = score(stats, None, "usage-frequency", budget=Budget(ratio=0.25), global_=True)
    assert sum(len(k) for k in mask.keep.values()) == 24 - 6


def test_random_is_seeded():
    stats, _ = _counts_stats()

    def keep(seed):
        return score(stats, None, "random", budget=Budget(drop=4), seed=seed)[0].keep

    assert keep(0) == keep(0)
    assert keep(0) != keep(1)
    assert score(stats, None, "random", budget=Budget(drop=4), seed=3)[0].provenance["params"]["seed"] == 3


def test_random_needs_only_the_model(tiny_factory):
    folder, _ = tiny_factory("mixtral")
    first, _ = score(None, folder, "random", budget=Budget(drop=3), seed=7)
    assert first.keep == score(None, folder, "random", budget=Budget(drop=3), seed=7)[0].keep


def test_every_criterion_is_registered_with_a_description():
    names = {c.name for c in all_criteria()}
    assert len(names) == 20  # 16 MC-Suite + soft counts + router-weighted activation norm + REAP + random
    assert all(c.description and c.fn.__doc__ for c in all_criteria())


# ---- weight criteria on a real tiny checkpoint, both on-disk layouts ------------------------------------------


@pytest.fixture(scope="module")
def edited_mixtral(tiny_factory, tmp_path_factory):
    """Tiny Mixtral with planted experts in every layer, saved per-expert and fused.

    expert 1 duplicates expert 4; expert 6 = -(sum of the others); then expert 3 scaled x5, expert 5 x0.1;
    expert 2's matrices are constant (stable rank 1), expert 7's have orthonormal rows/columns (maximal);
    router row 0 x0.1, row 6 x5.
    """
    _, model = tiny_factory("mixtral")
    model = type(model)(model.config)
    model.load_state_dict(tiny_factory("mixtral")[1].state_dict())
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            experts, router = layer.mlp.experts, layer.mlp.gate.weight
            for w in (experts.gate_up_proj, experts.down_proj):
                w[1] = w[4]
                w[2] = 0.05
                w[7] = _orthonormal(w.shape[1:]) * 2.0
                w[6] = -(w.sum(dim=0) - w[6])
                w[3] *= 5.0
                w[5] *= 0.1
            router[0] *= 0.1
            router[6] *= 5.0
    root = tmp_path_factory.mktemp("edited")
    model.save_pretrained(root / "split")
    model.save_pretrained(root / "fused", save_original_format=False)
    return root, model


def _orthonormal(shape) -> torch.Tensor:
    rows, cols = shape
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols)))
    return q if rows >= cols else q.T


def _reference_norms(model) -> np.ndarray:
    out = []
    for layer in model.model.layers:
        ex = layer.mlp.experts
        flat = torch.cat([ex.gate_up_proj.reshape(8, -1), ex.down_proj.reshape(8, -1)], dim=1)
        out.append(flat.detach().norm(dim=1).numpy())
    return np.stack(out)


@pytest.mark.parametrize("layout", ["split", "fused"])
@pytest.mark.parametrize(
    "name, planted_min, planted_max",
    [("weight-norm", 5, 3), ("weight-similarity", 6, 1), ("stable-rank", 2, 7), ("router-weight-norm", 0, 6)],
)
def test_weight_criteria_find_the_planted_expert(edited_mixtral, layout, name, planted_min, planted_max):
    root, model = edited_mixtral
    folder = root / layout
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        per_expert = any(".experts.0." in k for k in handle.keys())
    assert per_expert == (layout == "split")
    for direction, planted in (("min", planted_min), ("max", planted_max)):
        _, report = score(None, folder, name, direction=direction, budget=Budget(drop=1))
        assert report.dropped == {0: [planted], 1: [planted], 2: [planted]}, (direction, report.scores)
    if name == "weight-norm":
        assert np.allclose([report.scores[i] for i in range(3)], _reference_norms(model), rtol=1e-5)


def test_quantised_expert_weights_are_refused(tiny_factory, tmp_path):
    from safetensors.torch import save_file

    folder, _ = tiny_factory("mixtral")
    copy = tmp_path / "m"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=r"F8_E4M3 \(quantised\)"):
        score(None, copy, "weight-norm", budget=Budget(drop=1))


def test_grouped_routing_drops_equally_per_group(tiny_factory):
    folder, _ = tiny_factory("deepseek_v3")  # n_group 2: experts 0-3 and 4-7
    mask, _ = score(None, folder, "weight-norm", budget=Budget(drop=2))
    assert all(sum(i < 4 for i in k) == 3 for k in mask.keep.values())
    mask.validate_groups(2, "mask")
    with pytest.raises(MoePruneError, match="multiple of 2"):
        score(None, folder, "weight-norm", budget=Budget(drop=1))
    ident = Checkpoint.open(folder).identity
    stats = Stats(ident, {"hard_counts": np.ones((len(ident.moe_layers), 8))})
    with pytest.raises(MoePruneError, match="pass --model so the groups are known"):
        score(stats, None, "random", budget=Budget(drop=2))


# ---- CLI: errors, output, pipe into prune ----------------------------------------------------------------------


def _save(stats: Stats, path) -> str:
    stats.save(path)
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-c", "usage-frequncy", "--drop", "1"], "did you mean 'usage-frequency'"),
        (
            ["-c", "gradient-entropy", "--drop", "1"],
            "lacks statistics grad_entropy (run `moe-prune profile --gradients`)",
        ),
        (["-c", "usage-frequency", "--drop", "8"], "leaves none"),
        (["-c", "usage-frequency", "--keep", "1"], "fewer than top-k 2"),
        (["-c", "usage-frequency", "--drop", "1", "--keep", "2"], "exactly one of"),
        (["-c", "weight-norm", "--drop", "1"], "pass the checkpoint with --model"),
        (["-c", "activation-norm", "--drop", "1", "--global"], "not comparable across layers"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tiny_factory, tmp_path, args, message):
    stats, _ = _counts_stats()
    path = _save(stats, tmp_path / "stats.npz")
    out = tmp_path / "mask.json"
    result = runner.invoke(app, ["score", path, *args, "--out", str(out)])
    assert_one_line_error(result, message)
    assert not out.exists()


def test_cli_stats_of_another_model_are_refused(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    stats, _ = _counts_stats()  # same shape, other fingerprint
    path = _save(stats, tmp_path / "stats.npz")
    result = runner.invoke(app, ["score", path, "--model", str(folder), "-c", "usage-frequency", "--drop", "2"])
    assert result.exit_code == 1 and "fingerprint" in result.output


def test_cli_writes_mask_refuses_overwrite_and_reports_json(tiny_factory, tmp_path):
    stats, normalised = _counts_stats()
    path = _save(stats, tmp_path / "stats.npz")
    out = tmp_path / "mask.json"
    args = ["score", path, "-c", "usage-frequency", "--drop", "2", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    mask = DropMask.read(out)
    assert mask.provenance["criterion"] == "usage-frequency" and mask.provenance["params"]["direction"] == "min"
    assert {layer: set(mask.drop(layer)) for layer in mask.keep} == {
        i: set(np.argsort(normalised[i])[:2].tolist()) for i in range(3)
    }
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.output
    result = runner.invoke(app, [*args, "--force", "--json", "--report"])
    report = json.loads(result.stdout)
    assert report["out"] == str(out) and report["criterion"] == "usage-frequency"
    assert {int(k): set(v["dropped"]) for k, v in report["layers"].items()} == {
        layer: set(mask.drop(layer)) for layer in mask.keep
    }
    listing = runner.invoke(app, ["score", "--list", "--json"])
    assert {c["name"] for c in json.loads(listing.stdout)} == {c.name for c in all_criteria()}


def test_pipe_score_into_prune(edited_mixtral, tmp_path):
    root, model = edited_mixtral
    folder = root / "split"
    scored = runner.invoke(app, ["score", "--model", str(folder), "-c", "weight-norm", "--drop", "3", "--out", "-"])
    assert scored.exit_code == 0, scored.output
    mask = json.loads(scored.stdout)  # stdout holds only the mask
    expected = np.argsort(_reference_norms(model), axis=1, kind="stable")[:, 3:]
    assert {int(k): sorted(v["keep"]) for k, v in mask["layers"].items()} == {
        i: sorted(expected[i].tolist()) for i in range(3)
    }
    out = tmp_path / "pruned"
    pruned = runner.invoke(app, ["prune", str(folder), "--mask", "-", "--out", str(out)], input=scored.stdout)
    assert pruned.exit_code == 0, pruned.output
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 5
    (shard,) = Checkpoint.open(out).shard_files
    with safe_open(str(shard), "pt") as handle:
        for layer in range(3):
            for slot, orig in enumerate(sorted(expected[layer].tolist())):
                got = handle.get_tensor(f"model.layers.{layer}.block_sparse_moe.experts.{slot}.w2.weight")
                assert torch.equal(got, model.model.layers[layer].mlp.experts.down_proj[orig])


def test_cli_out_creates_missing_parents_and_refuses_a_file_as_parent(tmp_path):
    """Like prune and merge, a missing parent folder of --out is created; a file in its place is one line."""
    stats, _ = _counts_stats()
    path = _save(stats, tmp_path / "stats.npz")
    args = ["score", path, "-c", "usage-frequency", "--drop", "2", "--out"]
    deep = tmp_path / "masks" / "run-1" / "mask.json"
    result = runner.invoke(app, [*args, str(deep)])
    assert result.exit_code == 0, result.output
    assert DropMask.read(deep).keep
    (tmp_path / "plain").write_text("a file")
    blocked = tmp_path / "plain" / "mask.json"
    result = runner.invoke(app, [*args, str(blocked)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and str(blocked.parent) in lines[0], result.stderr
    assert (tmp_path / "plain").read_text() == "a file"
