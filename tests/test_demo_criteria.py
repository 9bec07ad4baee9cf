"""On the shipped demo model, MC-Suite/SEER criteria pick better experts to drop than chance.

Runs the real pipeline (profile -> score -> prune -> eval) for usage frequency, soft counts and
activation norm at 25% and 50% of the experts dropped per layer, against the mean of ten seeded
random masks of the same size, and prints the perplexity table (copied into the README).
"""

from __future__ import annotations

import statistics

import pytest

from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.scoring.selection import Budget
from moe_prune.stages import prune
from moe_prune.stages.score import score

CRITERIA = ("usage-frequency", "soft-counts", "activation-norm")
RATIOS = (0.25, 0.5)
RANDOM_SEEDS = range(10)  # the issue asks for at least five; ten steady the mean (sd is large)


def test_soft_counts_beat_random_masks_at_half_on_the_demo_model(demo_stats, demo_perplexity, tmp_path):
    """The fast check of the table below: one criterion at 50% against the mean of five random masks."""

    def pruned(criterion: str, seed: int = 0) -> float:
        mask, _ = score(demo_stats, None, criterion, budget=Budget(ratio=0.5), seed=seed)
        prune.run(DEMO_MODEL_DIR, mask, tmp_path / f"{criterion}-{seed}")
        return demo_perplexity(tmp_path / f"{criterion}-{seed}")

    randoms = [pruned("random", seed) for seed in range(5)]
    assert demo_perplexity(DEMO_MODEL_DIR) < pruned("soft-counts") < statistics.mean(randoms)


@pytest.mark.slow
def test_criteria_beat_random_masks_on_the_demo_model(demo_stats, demo_perplexity, tmp_path):
    def pruned(criterion: str, ratio: float, seed: int = 0) -> float:
        mask, _ = score(demo_stats, None, criterion, budget=Budget(ratio=ratio), seed=seed)
        out = tmp_path / f"{criterion}-{ratio}-{seed}"
        prune.run(DEMO_MODEL_DIR, mask, out)
        return demo_perplexity(out)

    base = demo_perplexity(DEMO_MODEL_DIR)
    table = {criterion: {ratio: pruned(criterion, ratio) for ratio in RATIOS} for criterion in CRITERIA}
    randoms = {ratio: [pruned("random", ratio, seed) for seed in RANDOM_SEEDS] for ratio in RATIOS}

    lines = ["| criterion | " + " | ".join(f"drop {ratio:.0%}" for ratio in RATIOS) + " |"]
    lines += ["|---|" + "---:|" * len(RATIOS), f"| none (demo model) | {base:.3f} | {base:.3f} |"]
    lines += [f"| {c} (min) | " + " | ".join(f"{row[r]:.3f}" for r in RATIOS) + " |" for c, row in table.items()]
    cells = [f"{statistics.mean(randoms[r]):.3f} ± {statistics.stdev(randoms[r]):.3f}" for r in RATIOS]
    lines.append("| random (mean ± sd of 10 seeds) | " + " | ".join(cells) + " |")
    print("\nheld-out perplexity of the demo model, first 8192 tokens, seq 256:\n" + "\n".join(lines))

    for criterion, row in table.items():
        for ratio in RATIOS:
            assert base < row[ratio], f"dropping experts by {criterion} cannot beat the unpruned model"
            assert row[ratio] < statistics.mean(randoms[ratio]), f"{criterion} at {ratio:.0%} is no better than random"
