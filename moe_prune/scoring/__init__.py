"""Expert-importance criteria (MC-Suite, SEER heavy hitters, baselines) and drop selection.

The criterion modules register themselves with `registry.criterion`; importing them here, explicitly,
fills the registry before anyone can ask it (a broken module fails loudly) and keeps `registry.py` free
of imports back up into its users.
"""

from moe_prune.scoring import activations, gradients, routing, weights  # noqa: F401
from moe_prune.scoring.registry import CRITERIA, Criterion, Inputs, all_criteria, get_criterion

__all__ = ["CRITERIA", "Criterion", "Inputs", "all_criteria", "get_criterion"]
