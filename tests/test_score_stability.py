"""`score` stability: near-constant scores and ties warn, the margin at the cut, bootstrap agreement over
disjoint partial profiles (`--stability`), and one-line errors for parts that do not belong together."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.stats import Stats
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.scoring.selection import Budget
from moe_prune.scoring.stability import resample
from moe_prune.stages.score import score

runner = CliRunner()
E = 4
IDENT = ModelIdentity("mixtral", 2, {0: tuple(range(E)), 1: tuple(range(E))}, "sha256:synthetic")


def counts_stats(counts: np.ndarray, shard: int = 0, parts: int = 1, ident: ModelIdentity = IDENT) -> Stats:
    """usage-frequency statistics of `counts` [2, E] (top-1: every token chooses one expert), of shard i/n."""
    counts = np.asarray(counts, dtype=np.int64)
    provenance = {"top_k": 1, "data": "synthetic", "samples": 64, "seq_len": 8, "seed": 0, "shard": [shard, parts]}
    return Stats(ident, {"hard_counts": counts, "tokens": counts.sum(axis=1)}, provenance)


def save_parts(tmp_path, parts: list[np.ndarray], **kw) -> tuple[Stats, list[str]]:
    """Each part saved as shard i/n; returns the combined statistics (their sum) and the paths."""
    paths = []
    for i, counts in enumerate(parts):
        path = tmp_path / f"part{i}.npz"
        counts_stats(counts, i, len(parts), **kw).save(path)
        paths.append(str(path))
    full = counts_stats(sum(np.asarray(p) for p in parts), **kw)
    full.provenance = {"top_k": 1}
    return full, paths


def usage_report(stats: Stats, drop: int = 1, **kw):
    return score(stats, None, "usage-frequency", budget=Budget(drop=drop), **kw)[1]


# ---- ties and near-constant scores --------------------------------------------------------------------------


def test_nearly_constant_layer_warns_and_a_distinct_one_does_not():
    """Layer 0: soft counts equal up to 1e-7 relative (float noise); layer 1: spread 10%."""
    soft = np.array([[1000.0, 1000.0001, 1000.0, 1000.00005], [1000.0, 1100.0, 1050.0, 1020.0]])
    stats = Stats(IDENT, {"soft_counts": soft, "tokens": np.array([2000, 2000])}, {"top_k": 1})
    report = score(stats, None, "soft-counts", budget=Budget(drop=1))[1]
    layers = report.stability.layers
    assert layers[0].constant and not layers[1].constant
    warned = [w for w in report.warnings if "nearly constant" in w]
    assert len(warned) == 1 and "'soft-counts'" in warned[0] and "layer 0;" in warned[0]
    assert "layer 1" not in warned[0]


def test_tie_at_the_cut_warns_only_where_last_dropped_equals_first_kept():
    counts = np.array([[10, 20, 20, 50], [10, 20, 30, 50]])
    report = usage_report(counts_stats(counts), drop=2)
    assert [s.tie for s in report.stability.layers.values()] == [True, False]
    assert any("score the same in layer 0;" in w for w in report.warnings)
    report = usage_report(counts_stats(counts), drop=1)  # the cut moves between distinct scores: no tie
    assert not any(s.tie or s.constant for s in report.stability.layers.values()) and not report.warnings


def test_cli_prints_the_near_constant_warning_on_stderr_and_in_json(tmp_path):
    path = tmp_path / "stats.npz"
    counts_stats(np.array([[25, 25, 25, 25], [10, 20, 30, 40]])).save(path)
    args = ["score", str(path), "-c", "usage-frequency", "--drop", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "nearly constant" in result.stderr and "in layer 0;" in result.stderr
    assert "constant" in result.stdout  # the margin column says so
    result = runner.invoke(app, [*args, "--json"])
    data = json.loads(result.stdout)
    assert data["layers"]["0"]["constant"] and not data["layers"]["1"]["constant"]
    assert any("nearly constant" in w for w in data["warnings"])


# ---- margin --------------------------------------------------------------------------------------------------


def test_margin_equals_a_hand_computation():
    counts = np.array([[10, 50, 30, 90], [40, 10, 20, 80]])  # tokens 180 and 150: scores are counts / tokens
    layers = usage_report(counts_stats(counts), drop=2).stability.layers
    assert layers[0].margin == pytest.approx((50 - 30) / (90 - 10))  # dropped 10, 30; first kept 50
    assert layers[1].margin == pytest.approx((40 - 20) / (80 - 10))
    stats = counts_stats(counts)
    layers = score(stats, None, "usage-frequency", direction="max", budget=Budget(drop=1))[1].stability.layers
    assert layers[0].margin == pytest.approx((90 - 50) / (90 - 10))  # max: dropped 90, first kept 50
    assert layers[1].margin == pytest.approx((80 - 40) / (80 - 10))


def test_global_margin_is_against_the_last_expert_dropped_anywhere():
    counts = np.array([[10, 50, 30, 90], [40, 10, 20, 80]])
    tokens = counts.sum(axis=1)
    stats = counts_stats(counts)
    report = score(stats, None, "usage-frequency", budget=Budget(drop=3), global_=True, min_keep=1)[1]
    scores = counts / tokens[:, None]
    dropped = sorted(scores.ravel())[:3]  # 10/180, 10/150, 20/150
    assert report.dropped == {0: [0], 1: [1, 2]}
    spread = scores.max() - scores.min()
    kept0 = min(scores[0, i] for i in (1, 2, 3))
    kept1 = min(scores[1, i] for i in (0, 3))
    assert report.stability.layers[0].margin == pytest.approx((kept0 - dropped[-1]) / spread)
    assert report.stability.layers[1].margin == pytest.approx((kept1 - dropped[-1]) / spread)


def test_pair_margin_is_the_gap_to_the_next_pair_the_greedy_rule_would_take():
    co = np.array([[0, 9, 2, 4], [9, 0, 7, 3], [2, 7, 0, 5], [4, 3, 5, 0]], dtype=np.int64)
    hard = np.array([40, 30, 20, 10], dtype=np.int64)
    np.fill_diagonal(co, hard)
    arrays = {"coselection": np.stack([co, co]), "hard_counts": np.stack([hard, hard])}
    report = score(Stats(IDENT, arrays, {"top_k": 1}), None, "co-selection", budget=Budget(drop=1))[1]
    # max: pair (0, 1) = 9 drops expert 1; without expert 1 the best pair left is (2, 3) = 5
    assert report.dropped[0] == [1]
    assert report.stability.layers[0].margin == pytest.approx((9 - 5) / (9 - 2))


# ---- bootstrap ----------------------------------------------------------------------------------------------


def test_identical_shards_agree_fully(tmp_path):
    part = np.array([[10, 11, 30, 40], [5, 30, 31, 40]])  # close scores, but every shard says the same
    full, paths = save_parts(tmp_path, [part] * 3)
    report = usage_report(full, stability=paths, draws=30)
    for layer in report.stability.layers.values():
        assert layer.agreement == 1.0 and layer.jaccard == 1.0
    assert report.stability.draws == 30 and report.stability.parts == paths


def _flip_parts() -> list[np.ndarray]:
    """Layer 0: experts 0 and 1 swap places between shards; layer 1: the same order in every shard."""
    a = np.array([[12, 10, 50, 50], [5, 30, 40, 40]])
    b = np.array([[10, 12, 50, 50], [5, 30, 40, 40]])
    return [a, b, a]


def expected_agreement(parts: list[np.ndarray], draws: int, seed: int) -> tuple[float, float]:
    """Layer 0's agreement and Jaccard, recomputed here: the same resamples of the parts, argmin of the sums."""
    rng = np.random.default_rng(seed)
    full_drop = int(np.argmin(sum(parts)[0]))
    same = jaccard = 0.0
    for _ in range(draws):
        picks = rng.integers(0, len(parts), size=len(parts))
        drop = int(np.argmin(sum(parts[i] for i in picks)[0]))
        same += drop == full_drop
        jaccard += 1.0 if drop == full_drop else 2 / 4  # keep 3 of 4: two in common out of four
    return same / draws, jaccard / draws


def test_flipped_order_between_shards_lowers_agreement_in_that_layer_only(tmp_path):
    parts = _flip_parts()
    full, paths = save_parts(tmp_path, parts)
    report = usage_report(full, stability=paths, draws=60, seed=1)
    layers = report.stability.layers
    want_agreement, want_jaccard = expected_agreement(parts, 60, 1)
    assert 0 < layers[0].agreement < 1 and layers[1].agreement == 1.0
    assert layers[0].agreement == pytest.approx(want_agreement)
    assert layers[0].jaccard == pytest.approx(want_jaccard)
    assert any(w.startswith("layer 0: selection unstable") for w in report.warnings)
    assert not any(w.startswith("layer 1:") for w in report.warnings)


def test_bootstrap_is_deterministic_for_a_seed(tmp_path):
    full, paths = save_parts(tmp_path, _flip_parts())
    runs = {
        s: [usage_report(full, stability=paths, draws=40, seed=s).stability.layers[0].agreement for _ in "ab"]
        for s in range(4)
    }
    assert all(a == b for a, b in runs.values())
    assert len({a for a, _ in runs.values()}) > 1  # and the seed is used


def test_resample_equals_combining_the_drawn_parts():
    """Sums weighted by copies, bitsets ORed, maxima: the same as `Stats.combine` of the drawn multiset."""
    rng = np.random.default_rng(0)
    parts = [
        Stats(
            IDENT,
            {
                "hard_counts": rng.integers(0, 50, size=(2, E)),
                "act_max": rng.uniform(0, 5, size=(2, E)),
                "vocab_bits": rng.integers(0, 256, size=(2, E, 3), dtype=np.uint8),
            },
        )
        for _ in range(3)
    ]
    picks = np.array([2, 0, 1])
    got = resample([p.arrays for p in parts], picks, ("hard_counts", "act_max", "vocab_bits"))
    want = parts[0].combine(parts[0]).combine(parts[2])
    for name, array in want.arrays.items():
        assert np.array_equal(got[name], array), name


def test_criteria_without_statistics_are_stable_by_construction(tmp_path):
    full, paths = save_parts(tmp_path, _flip_parts())
    report = score(full, None, "random", budget=Budget(drop=1), stability=paths)[1]
    assert "stable by construction" in report.stability.note
    assert all(s.agreement is None for s in report.stability.layers.values())


# ---- refusals ----------------------------------------------------------------------------------------------


def _one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def test_cli_refuses_parts_that_do_not_belong_together(tmp_path):
    full, paths = save_parts(tmp_path, _flip_parts())
    full_path = tmp_path / "full.npz"
    full.save(full_path)
    base = ["score", str(full_path), "-c", "usage-frequency", "--drop", "1"]

    other = ModelIdentity("mixtral", 2, {0: tuple(range(E)), 1: tuple(range(E))}, "sha256:another")
    counts_stats(_flip_parts()[1], 1, 3, ident=other).save(tmp_path / "other.npz")
    line = _one_line_error([*base, "--stability", paths[0], "--stability", str(tmp_path / "other.npz")])
    assert "other.npz" in line

    counts_stats(_flip_parts()[0], 0, 3).save(tmp_path / "again.npz")  # shard 0/3 of the same data again
    line = _one_line_error([*base, "--stability", paths[0], "--stability", str(tmp_path / "again.npz")])
    assert "again.npz" in line and "same calibration windows" in line

    assert "at least two" in _one_line_error([*base, "--stability", paths[0]])
    line = _one_line_error([*base, "--stability", paths[0], "--stability", paths[1], "--draws", "0"])
    assert "--draws" in line

    lacking = tmp_path / "lacking.npz"
    Stats(IDENT, {"hard_counts": _flip_parts()[1]}, {"data": "x", "shard": [1, 3]}).save(lacking)
    line = _one_line_error([*base, "--stability", paths[0], "--stability", str(lacking)])
    assert "lacking.npz" in line and "tokens" in line


def test_gradient_criteria_cannot_be_resampled(tmp_path):
    gram = np.stack([np.eye(E)] * 2)
    paths = []
    for i in range(2):
        Stats(IDENT, {"grad_gram": gram}, {"data": "x", "shard": [i, 2]}).save(tmp_path / f"g{i}.npz")
        paths.append(str(tmp_path / f"g{i}.npz"))
    with pytest.raises(MoePruneError, match="do not add across parts"):
        score(Stats(IDENT, {"grad_gram": gram}, {"top_k": 1}), None, "gradient-norm", stability=paths)


def test_cli_shows_margin_agreement_and_the_hint(tmp_path):
    full, paths = save_parts(tmp_path, _flip_parts())
    full.save(tmp_path / "full.npz")
    args = ["score", str(tmp_path / "full.npz"), "-c", "usage-frequency", "--drop", "1", "--report"]
    args += [x for p in paths for x in ("--stability", p)] + ["--draws", "50"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "agreement" in result.stdout and "margin" in result.stdout
    assert "layer 0: selection unstable (agreement" in result.stderr and "profile more data" in result.stderr
    data = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert data["stability"]["draws"] == 50 and data["layers"]["1"]["agreement"] == 1.0
    assert data["layers"]["0"]["agreement"] < 1


def test_real_profile_shards_are_accepted(tmp_path):
    """Two `profile --shard i/2` runs of the demo model: accepted as parts; the same shard twice is refused."""
    from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR
    from moe_prune.stages import profile

    paths = []
    for i in range(2):
        settings = profile.Settings(samples=8, seq_len=64, batch_size=4, shard=(i, 2))
        profile.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), settings).stats.save(tmp_path / f"p{i}.npz")
        paths.append(tmp_path / f"p{i}.npz")
    full = profile.combine(paths)
    report = score(full, DEMO_MODEL_DIR, "activation-norm", budget=Budget(drop=2), stability=paths, draws=20)[1]
    assert all(0 <= s.agreement <= 1 for s in report.stability.layers.values())
    assert not any("tokens per MoE layer" in w for w in report.warnings)  # the parts sum to the full file
    with pytest.raises(MoePruneError, match="same calibration windows"):
        score(full, None, "activation-norm", budget=Budget(drop=2), stability=[paths[0], paths[0]])
