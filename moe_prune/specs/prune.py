"""How `prune` writes its checkpoint: `stages.prune.run`'s keywords and `moe-prune prune`'s options (the model,
mask and output folder are the command's own)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_prune.specs.groups import Output


@dataclass(frozen=True)
class PruneSpec(Output):
    """Prune's options: only how the output is written (what is dropped is the mask's)."""
