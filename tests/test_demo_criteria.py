"""On the shipped demo model, MC-Suite/SEER criteria pick better experts to drop than chance.

Runs the real pipeline (profile -> score -> prune -> eval) for usage frequency, soft counts and
activation norm at 25% and 50% of the experts dropped per layer, against the mean of five seeded
random masks of the same size, and prints the perplexity table (copied into the README).
"""

from __future__ import annotations

import statistics

import pytest

from moe_prune.demo import DEMO_CALIBRATION, DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.scoring.selection import Budget
from moe_prune.stages import evaluate, profile, prune
from moe_prune.stages.score import score

CRITERIA = ("usage-frequency", "soft-counts", "activation-norm")
RATIOS = (0.25, 0.5)
RANDOM_SEEDS = range(5)
EVAL_TOKENS = 16384


def perplexity(folder) -> float:
    return evaluate.run(folder, str(DEMO_HELDOUT), seq_len=256, batch_size=8, max_tokens=EVAL_TOKENS).model.perplexity


@pytest.fixture(scope="module")
def demo_stats():
    settings = profile.Settings(samples=64, seq_len=256, seed=0, batch_size=8)
    return profile.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), settings).stats


def pruned_perplexity(stats, criterion: str, ratio: float, seed: int, tmp_path) -> float:
    mask, _ = score(stats, None, criterion, budget=Budget(ratio=ratio), seed=seed)
    out = tmp_path / f"{criterion}-{ratio}-{seed}"
    prune.run(DEMO_MODEL_DIR, mask, out)
    return perplexity(out)


def test_criteria_beat_random_masks_on_the_demo_model(demo_stats, tmp_path):
    base = perplexity(DEMO_MODEL_DIR)
    table = {
        criterion: {ratio: pruned_perplexity(demo_stats, criterion, ratio, 0, tmp_path) for ratio in RATIOS}
        for criterion in CRITERIA
    }
    randoms = {
        ratio: [pruned_perplexity(demo_stats, "random", ratio, seed, tmp_path) for seed in RANDOM_SEEDS]
        for ratio in RATIOS
    }
    header = "| criterion | " + " | ".join(f"drop {ratio:.0%}" for ratio in RATIOS) + " |"
    lines = [header, "|---|" + "---:|" * len(RATIOS), f"| none (demo model) | {base:.3f} | {base:.3f} |"]
    for criterion, row in table.items():
        lines.append(f"| {criterion} (min) | " + " | ".join(f"{row[r]:.3f}" for r in RATIOS) + " |")
    cells = [f"{statistics.mean(randoms[r]):.3f} ± {statistics.stdev(randoms[r]):.3f}" for r in RATIOS]
    lines.append("| random (mean ± sd of 5 seeds) | " + " | ".join(cells) + " |")
    print(f"\nheld-out perplexity of the demo model, first {EVAL_TOKENS} tokens, seq 256:\n" + "\n".join(lines))
    for criterion, row in table.items():
        for ratio in RATIOS:
            assert base < row[ratio], f"dropping experts by {criterion} cannot beat the unpruned model"
            assert row[ratio] < statistics.mean(randoms[ratio]), f"{criterion} at {ratio:.0%} is no better than random"
