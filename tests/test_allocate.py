"""`allocate`: the objective against a float64 hand computation, the search's budget and reproducibility,
constraints on grouped-router and ragged models, one-line errors, and (slow) the demo done check."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from moe_prune.allocation import plan
from moe_prune.allocation.objective import Reference, sums
from moe_prune.allocation.search import Space, search
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.stages import allocate as stage
from moe_prune.stages import profile, prune
from tests.reference import masked_logits

TEXT = "the quick brown fox jumps over the lazy dog; 0123456789 pack my box with five dozen liquor jugs.\n" * 40


def hand(logp: np.ndarray, logq: np.ndarray, top: int | None) -> tuple[float, float]:
    """Σ_t ESAP_t and Σ_t KL_t by loops in float64; `top`: the reference's most likely tokens plus a rest bucket."""
    esap = kl = 0.0
    for lp, lq in zip(logp, logq, strict=True):
        p, q = np.exp(lp), np.exp(lq)
        if top is not None:
            keep = np.argsort(-p, kind="stable")[:top]
            p = np.append(p[keep], np.delete(p, keep).sum())  # the rest bucket summed, not 1 - Σ kept
            q = np.append(q[keep], np.delete(q, keep).sum())
        for pv, qv in zip(p, q, strict=True):
            esap += min(pv, qv)
            kl += pv * math.log(pv / qv) if pv > 0 else 0.0
    return esap, kl


def log_softmax64(logits: torch.Tensor) -> np.ndarray:
    x = logits.detach().double().numpy()
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("top", [None, 5])
def test_objective_is_the_hand_computation_on_a_tiny_model(tiny_factory, top):
    """The stage's masking + objective = the test's own masked original (tests/reference.py) + loops."""
    from moe_prune.allocation.evaluator import Evaluator

    folder, model = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    drops = [[0, 5, 6], [1], [2, 3, 4, 7]]
    judge = Evaluator(model, ckpt.config, ids, batch_size=3, top=top or 10**6)  # one batch: the same float32 logits
    esap, kl = judge.measure(drops)
    original = model(input_ids=ids).logits[:, :-1].reshape(-1, 128)
    masked = masked_logits(model, ckpt.config.adapter, 8, dict(enumerate(drops)), ids)[:, :-1].reshape(-1, 128)
    want_esap, want_kl = hand(log_softmax64(original), log_softmax64(masked), top)
    positions = ids.shape[0] * (ids.shape[1] - 1)
    assert judge.positions == positions
    assert esap == pytest.approx(want_esap / positions, rel=1e-9, abs=1e-12)
    assert kl == pytest.approx(want_kl / positions, rel=1e-9, abs=1e-12)
    assert 0 < esap < 1 and kl > 0
    assert judge.measure([[], [], []]) == pytest.approx((1.0, 0.0), abs=1e-9)  # the original agrees with itself
    batched = Evaluator(model, ckpt.config, ids, batch_size=2, top=top or 10**6)
    assert batched.measure(drops) == pytest.approx((esap, kl), rel=1e-6)  # batching changes only float32 rounding


def test_objective_sums_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(7, 11, generator=gen) * 3, torch.randn(7, 11, generator=gen) * 3
    for top in (11, 4):
        got = sums(Reference.from_logits(p, top), q)
        assert got == pytest.approx(hand(log_softmax64(p), log_softmax64(q), None if top == 11 else top), rel=1e-12)


def test_objective_kl_stays_finite_when_a_candidate_is_more_confident():
    """Review #5: the original puts ~5e-12 outside its top tokens, the candidate ~1e-18 (1 − Σ stored rounds to
    0 in float64); KL is the float64 brute force's tiny positive value, not +inf, truncated or not."""
    vocab = 50
    p, q = torch.zeros(3, vocab), torch.zeros(3, vocab)
    p[:, 0], q[:, 0] = 30.0, 45.0
    p[1, 1:4], q[2, 7] = 12.0, 3.0  # rows that differ a little in shape
    for top in (vocab, 10, 1):
        esap, kl = sums(Reference.from_logits(p, top), q)
        want_esap, want_kl = hand(log_softmax64(p), log_softmax64(q), None if top == vocab else top)
        assert math.isfinite(kl) and kl > 0, (top, kl)
        assert kl == pytest.approx(want_kl, rel=1e-3) and esap == pytest.approx(want_esap, rel=1e-12)


def test_objective_works_through_the_positions_in_chunks(monkeypatch):
    """Review #3: no float64 copy of more than CHUNK_BYTES exists at once (a real batch's would be ~20 GB),
    and the chunked sums over row blocks (the evaluator's per-window views) equal the float64 brute force."""
    from moe_prune.allocation import objective

    seen: list[int] = []
    whole = objective.log_softmax64
    monkeypatch.setattr(objective, "CHUNK_BYTES", 3 * 8 * 11)  # 3 positions of 11 tokens
    monkeypatch.setattr(objective, "log_softmax64", lambda rows: seen.append(len(rows)) or whole(rows))
    gen = torch.Generator().manual_seed(5)
    p, q = torch.randn(10, 11, generator=gen) * 3, torch.randn(10, 11, generator=gen) * 3
    for top in (11, 4):
        reference = Reference.from_logits(list(p.split([4, 6])), top)
        got = sums(reference, list(q.split([7, 3])))
        assert got == pytest.approx(hand(log_softmax64(p), log_softmax64(q), None if top == 11 else top), rel=1e-12)
    assert seen and max(seen) <= 3
    with pytest.raises(ValueError, match="9 candidate positions against 10"):
        sums(reference, q[:9])


def random_space(rng: random.Random, grouped: bool) -> Space:
    step = 2 if grouped else 1
    experts = tuple(rng.choice([4, 8, 8, 16]) for _ in range(rng.randint(2, 6)))
    floors = tuple(min(n, 2 * step if grouped else rng.randint(1, 3)) for n in experts)
    costs = tuple(rng.choice([1, 1, 3, 7]) for _ in experts)
    low = sum(c * f for c, f in zip(costs, floors, strict=True))
    high = sum(c * n for c, n in zip(costs, experts, strict=True))
    return Space(experts, floors, (step,) * len(experts), costs, rng.randint(low, high))


@pytest.mark.parametrize("grouped", [False, True])
def test_search_never_exceeds_the_budget_and_repeats_for_a_seed(grouped):
    rng = random.Random(3)
    for case in range(40):
        space = random_space(rng, grouped)
        weights = [rng.random() for _ in space.experts]
        seen: list[tuple[int, ...]] = []

        def objective(counts, weights=weights, space=space, seen=seen):
            assert space.feasible(counts), (counts, space)  # every candidate evaluated, not only the result
            seen.append(counts)
            return sum(w * math.log(k) for w, k in zip(weights, counts, strict=True))

        start = plan.repair(space, list(space.floors))
        first = search(space, {"start": start}, objective, 30, seed=case)
        evaluated = list(seen)
        seen.clear()
        again = search(space, {"start": start}, objective, 30, seed=case)
        assert seen == evaluated and again.best == first.best and again.value == first.value
        assert space.cost(first.best) <= space.budget and first.evaluations <= 30
        assert len(set(evaluated)) == len(evaluated)  # each candidate evaluated once


def test_search_finds_the_optimum_of_a_small_space():
    """Every feasible count of 3 layers of 4 experts keeping 6: the search ends at the best of them."""
    space = Space((4, 4, 4), (1, 1, 1), (1, 1, 1), (1, 1, 1), 6)
    values = {k: random.Random(str(k)).random() for k in np.ndindex(5, 5, 5) if space.feasible(k)}
    trace = search(space, {"u": (2, 2, 2)}, lambda k: values.get(k, -1.0), 200, seed=0)
    assert trace.value == max(v for k, v in values.items() if sum(k) == 6)


def tiny_stats(folder: Path, tmp_path: Path) -> Path:
    data = tmp_path / "calibration.txt"
    data.write_text(TEXT)
    stats = profile.run(folder, str(data), profile.Settings(samples=4, seq_len=32, batch_size=4)).stats
    path = tmp_path / "stats.npz"
    stats.save(path)
    return path


def test_grouped_router_counts_stay_balanced_per_group(tiny, tmp_path):
    folder = tiny("deepseek_v3")  # n_group 2 (experts 0-3, 4-7), MoE layers 1 and 2, top-2
    stats = tiny_stats(folder, tmp_path)
    mask, report = stage.allocate(stats, folder, AllocateSpec("soft-counts", ratio=0.5, budget_evals=12))
    for name, counts in report.counts.items():
        assert all(k % 2 == 0 and 4 <= k <= 8 for k in counts), (name, counts)
        assert sum(counts) <= 8
    mask.validate_groups(2, "mask")
    for kept in mask.keep.values():
        assert sum(1 for e in kept if e < 4) == sum(1 for e in kept if e >= 4)


def test_ragged_input_keeps_each_layer_within_its_experts_and_top_k(tiny, tmp_path):
    folder = tiny("mixtral")  # 3 MoE layers of 8, top-2
    ckpt = Checkpoint.open(folder)
    keep = {0: [0, 1, 2, 3, 4, 5], 1: [0, 2, 4], 2: [1, 3, 5, 6, 7]}
    ragged = tmp_path / "ragged"
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), ragged)
    stats = tiny_stats(ragged, tmp_path)
    mask, report = stage.allocate(stats, ragged, AllocateSpec("activation-norm", keep=9, budget_evals=15, seed=2))
    experts = [6, 3, 5]
    for counts in report.counts.values():
        assert all(2 <= k <= n for k, n in zip(counts, experts, strict=True)) and sum(counts) <= 9
    assert sum(report.counts["searched"]) == 9
    for layer, kept in mask.keep.items():
        assert set(kept) <= set(keep[layer])  # original ids of the ragged checkpoint's experts
    out = tmp_path / "again"
    prune.run(ragged, mask, out)  # the mask is an ordinary one prune takes
    assert json.loads((out / "config.json").read_text())


def test_skip_layers_and_min_per_layer(tiny, tmp_path):
    folder = tiny("mixtral")
    stats = tiny_stats(folder, tmp_path)
    mask, report = stage.allocate(
        stats, folder, AllocateSpec("soft-counts", ratio=0.5, budget_evals=10, min_per_layer=3, skip_layers=[1])
    )
    assert all(c[1] == 8 and c[0] >= 3 and c[2] >= 3 and c[0] + c[2] <= 8 for c in report.counts.values())
    assert mask.provenance["params"]["allocation"]["evaluations"] == report.evaluations <= 10
    assert set(mask.provenance["params"]["allocation"]["values"]) == set(report.counts)


def run_cli(*args: str):
    return CliRunner().invoke(app, ["allocate", *args])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ratio", "1.0"], "--ratio 1.0 must be in [0, 1)"),
        (["--ratio", "0.5", "--keep", "3"], "give exactly one of --ratio R, --keep N or --bytes SIZE"),
        ([], "give exactly one of --ratio R, --keep N or --bytes SIZE"),
        (["--keep", "5"], "already needs 6"),
        (["--keep", "99"], "--keep 99 is more than the 24 experts"),
        (["--bytes", "1KB"], "--bytes 1,000 is not more than the"),
        (["--bytes", "-3"], "--bytes '-3'"),
        (["--ratio", "0.5", "--objective", "nll"], "--objective 'nll': expected one of esap, kl"),
        (["--ratio", "0.5", "--budget-evals", "1"], "--budget-evals must be at least 2"),
        (["--ratio", "0.5", "--skip-layers", "7"], "--skip-layers 7: not MoE layers"),
        (["--ratio", "0.5", "--skip-layers", "a"], "--skip-layers 'a'"),
        (["--ratio", "0.5", "--skip-layers", "0,1,2"], "--skip-layers leaves no MoE layer"),
        (["--ratio", "0.5", "--min-per-layer", "1"], "--min-per-layer 1 is below layer 0's top-k 2"),
        (["--ratio", "0.5", "-c", "nonsense"], "nonsense"),
        (["--ratio", "0.5", "--samples", "0"], "--samples must be at least 1"),
        (["--ratio", "0.5", "--sequential"], "allocate --sequential is not supported"),
    ],
)
def test_bad_budgets_and_options_are_one_line(tiny, tmp_path, extra, message):
    folder = tiny("mixtral")
    stats = tiny_stats(folder, tmp_path)
    out = tmp_path / "mask.json"
    result = run_cli(str(folder), "--stats", str(stats), "-c", "soft-counts", "--out", str(out), *extra)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["calibration.txt", "stats.npz"]


def test_held_out_data_is_refused(tmp_path, demo_stats):
    from moe_prune.demo import DEMO_HELDOUT, DEMO_MODEL_DIR

    stats = tmp_path / "demo.npz"
    demo_stats.save(stats)
    with pytest.raises(MoePruneError, match="the held-out set"):
        stage.allocate(stats, DEMO_MODEL_DIR, AllocateSpec("soft-counts", ratio=0.5), data=[str(DEMO_HELDOUT)])


def global_start_mask(stats: Path, criterion: str, counts: list[int]) -> DropMask:
    """The mask of the allocation's global start (score --global refuses criteria not comparable across layers)."""
    from moe_prune.artifacts.stats import Stats
    from moe_prune.demo import DEMO_MODEL_DIR
    from moe_prune.scoring import get_criterion
    from moe_prune.scoring.registry import Inputs, evaluate

    loaded, crit = Stats.load(stats), get_criterion(criterion)
    config = Checkpoint.open(DEMO_MODEL_DIR).config
    layers = stage._layers(config, config.moe_layers, ())
    table = plan.DropTable(layers, crit.direction, *evaluate(crit, Inputs(loaded.identity, loaded, None, 0, 2048)))
    ids = loaded.identity.original_ids
    keep = {
        n: [e for s, e in enumerate(ids[n]) if s not in set(d)]
        for n, d in zip(layers.numbers, table.drops(tuple(counts)), strict=True)
    }
    return DropMask.create(loaded.identity, keep, criterion)


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["soft-counts", "activation-norm"])
def test_demo_half_searched_beats_uniform_and_global(criterion, demo_stats, demo_perplexity, tmp_path):
    """Done check of issue #23: allocate -> prune -> eval beats score (uniform) and the global ranking at 50%."""
    stats = tmp_path / "stats.npz"
    demo_stats.save(stats)
    ppl = {}
    for name, argv in {
        "uniform": ["score", str(stats), "-c", criterion, "--ratio", "0.5", "--out", str(tmp_path / "uniform.json")],
        "searched": [
            "allocate",
            "--stats",
            str(stats),
            "-c",
            criterion,
            "--ratio",
            "0.5",
            "--json",
            "--out",
            str(tmp_path / "searched.json"),
        ],
    }.items():
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        if name == "searched":
            report = json.loads(result.stdout)
    if criterion == "soft-counts":
        result = CliRunner().invoke(
            app,
            [
                "score",
                str(stats),
                "-c",
                criterion,
                "--ratio",
                "0.5",
                "--global",
                "--out",
                str(tmp_path / "global.json"),
            ],
        )
        assert result.exit_code == 0, result.output
    else:
        (tmp_path / "global.json").write_text(global_start_mask(stats, criterion, report["counts"]["global"]).dumps())
    for name in ("uniform", "global", "searched"):
        result = CliRunner().invoke(
            app, ["prune", "--mask", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / name)]
        )
        assert result.exit_code == 0, result.output
        ppl[name] = demo_perplexity(tmp_path / name)
    print(criterion, ppl, report["counts"], report["values"])
    assert report["values"]["searched"]["kl"] <= min(v["kl"] for v in report["values"].values())
    assert ppl["searched"] < ppl["uniform"] and ppl["searched"] < ppl["global"]
