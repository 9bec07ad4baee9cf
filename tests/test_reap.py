"""REAP (Cerebras): the criterion against a float64 brute force, and super-expert protection."""

from __future__ import annotations

import numpy as np
import pytest
from test_profile import DOCS, FAMILIES, brute_force, settings, windows_of, write_docs

from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.stats import Stats
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.scoring.selection import Budget
from moe_prune.stages import profile
from moe_prune.stages.score import score


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "llama4_text"])
def test_reap_equals_a_brute_force_mean_of_renormalised_gate_times_norm(model_type, tiny, tmp_path):
    """deepseek_v3 routes with sigmoid scores, llama4 scales inputs by a sigmoid gate: REAP renormalises both."""
    folder = tiny(model_type)
    data = tmp_path / "cal.jsonl"
    write_docs(data, DOCS, seed=3)
    stats = profile.run(folder, str(data), settings()).stats
    config = ModelConfig.load(folder / "config.json")
    want = brute_force(load_model(folder), config, *FAMILIES[model_type], windows_of(data, folder))
    counts = want["hard_counts"].astype(float)
    expected = np.divide(want["act_gate_norm_sum"], counts, out=np.zeros_like(counts), where=counts > 0)
    _, report = score(stats, None, "reap", budget=Budget(drop=2))
    got = np.array([report.scores[layer] for layer in sorted(report.scores)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    if config.n_group == 1:  # min drops the least salient experts (grouped routing adds per-group quotas)
        for i, layer in enumerate(sorted(report.dropped)):
            assert report.dropped[layer] == [int(s) for s in np.lexsort((np.arange(len(expected[i])), expected[i]))[:2]]


def _stats_with_act_max(act_max: np.ndarray, top_k: int = 2) -> Stats:
    layers, experts = act_max.shape
    identity = ModelIdentity("mixtral", layers, {i: tuple(range(experts)) for i in range(layers)}, "sha256:test")
    counts = np.tile(np.arange(experts, dtype=np.int64) + 10, (layers, 1))  # slot 0 least used
    arrays = {
        "tokens": np.full(layers, 1000, dtype=np.int64),
        "hard_counts": counts,
        "act_gate_norm_sum": counts.astype(np.float64),
        "act_max": act_max,
    }
    return Stats(identity, arrays, {"top_k": top_k})


def test_super_experts_are_never_dropped():
    act_max = np.ones((8, 64))  # 512 experts: the 99.5th percentile is an ordinary one
    act_max[0, 0] = 500.0  # a massive activation in the first layer: protected
    act_max[7, 0] = 900.0  # in the last 25% of layers: REAP does not protect there
    act_max[1, 0] = 40.0  # below a tenth of the largest: not a super expert
    stats = _stats_with_act_max(act_max)
    plain, _ = score(stats, None, "reap", budget=Budget(drop=1))
    assert all(plain.drop(layer) == (0,) for layer in range(8)), "slot 0 is the least salient everywhere"
    kept, report = score(stats, None, "reap", budget=Budget(drop=1), protect_super_experts=True)
    assert kept.drop(0) == (1,) and all(kept.drop(layer) == (0,) for layer in range(1, 8))
    assert report.params["protected_super_experts"] == [0]
    glob, _ = score(stats, None, "usage-frequency", budget=Budget(drop=8), global_=True, protect_super_experts=True)
    assert 0 not in glob.drop(0) and sum(len(glob.drop(layer)) for layer in range(8)) == 8


def test_protection_that_makes_the_budget_impossible_is_one_line():
    act_max = np.ones((8, 64))
    act_max[0, :2] = 500.0  # two super experts in layer 0; keeping one expert per layer cannot keep both
    with pytest.raises(MoePruneError, match="protected"):
        score(_stats_with_act_max(act_max, top_k=1), None, "reap", budget=Budget(keep=1), protect_super_experts=True)
