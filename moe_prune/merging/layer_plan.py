"""What becomes of one MoE layer when a checkpoint shrinks: its output slots, each a cluster of input experts.

Prune and merge share this one plan (issue #22, one shrink pipeline): a prune is the plan whose clusters each
hold one expert with weight 1 (`selection`), so its experts are byte copies; a merge averages its clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_prune.architectures.spec import ExpertTensor
from moe_prune.merging.clustering import Cluster
from moe_prune.merging.refit import is_down

ROUTER_RULES = ("anchor", "average", "reinit")


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's clusters (current slot ids, sorted by anchor), averaging weights and router rule."""

    layer: int
    clusters: list[Cluster]
    weights: list[tuple[float, ...]]
    router: str = "anchor"
    seed: int = 0
    refit: tuple[np.ndarray, ...] | None = None  # per cluster, the refit down projection D^T [I, H]

    @classmethod
    def selection(cls, layer: int, slots: list[int]) -> LayerPlan:
        """Keep `slots` (current slot numbers) as they are: one-expert clusters, weight 1, anchor router rows."""
        return cls(layer, [Cluster(slot, (slot,)) for slot in sorted(slots)], [(1.0,)] * len(slots))

    @property
    def anchors(self) -> list[int]:
        return [c.anchor for c in self.clusters]

    @property
    def passthrough(self) -> bool:
        """True when every cluster is a single expert and nothing is refit: the experts are byte copies (pruning)."""
        return self.refit is None and all(len(c.members) == 1 for c in self.clusters)

    def computes(self, index: int, layout: ExpertTensor) -> bool:
        """Whether slot `index`'s tensor of this layout is computed (else it is its anchor's, byte for byte)."""
        if self.refit is not None:
            return is_down(layout)
        return len(self.clusters[index].members) > 1
