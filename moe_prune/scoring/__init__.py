"""Expert-importance criteria (MC-Suite, SEER heavy hitters, baselines) and drop selection."""

from moe_prune.scoring.registry import CRITERIA, Criterion, Inputs, all_criteria, get_criterion

__all__ = ["CRITERIA", "Criterion", "Inputs", "all_criteria", "get_criterion"]
