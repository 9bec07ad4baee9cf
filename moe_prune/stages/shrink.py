"""The one shrink pipeline of `prune` and `merge` (issue #22): a plan of output experts per MoE layer, then one write.

A prune is the merge in which every cluster holds one expert with weight 1 (`LayerPlan.selection`), so
both commands run the same steps here and differ only in how they make the plan:

1. `Shrink(model, out, ...)`: the size limit parsed, the output checked, the source opened;
2. `Shrink.target(counts, ...)`: the new expert counts checked against the multi-token-prediction layers
   (`checkpoint.edit.stage_mtp`), every router read and refused if not finite, the config rewritten
   (per-layer lists and model code when the counts differ: `checkpoint.ragged`), MTP counts zeroed by
   `--drop-mtp`;
3. the stage plans its layers (prune: the mask's slots; merge: clusters from the statistics);
4. `Shrink.write(plans, ...)`: MTP MoE blocks get the last MoE layer's plan, the output tensors are planned
   (`merging.tensors.ShrinkPlanner`: byte selections wherever nothing is computed, so a prune reads no
   expert and decodes nothing), the lineage is composed in original expert ids with the input's own
   manifest (a prune of a merged checkpoint keeps its slots' members), and the folder written atomically.

`Shrunk` is what both report; `PruneResult` and `MergeResult` add what only their command knows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_prune.architectures.config import ModelConfig
from moe_prune.architectures.mtp import set_mtp_count
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.manifest import Manifest, Members
from moe_prune.checkpoint.edit import Edit, Written, stage_mtp, write_edit
from moe_prune.checkpoint.mtp_tensors import MtpTensors, check_routers_finite
from moe_prune.checkpoint.quantized import Quantization
from moe_prune.checkpoint.ragged import expert_count_config, source_top_k
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.io.output import check_writable
from moe_prune.merging.clustering import Cluster
from moe_prune.merging.layer_plan import LayerPlan
from moe_prune.merging.tensors import ShrinkPlanner
from moe_prune.sizes import parse_size


@dataclass
class Shrunk(Written):
    """What `prune` and `merge` both report: expert counts per layer before and after, top-k, model code, warnings.

    Different counts per layer give a checkpoint that loads with `trust_remote_code` (its `model_code` files).
    """

    top_k: int
    experts_before_per_layer: dict[int, int]
    experts_after_per_layer: dict[int, int]
    model_code: list[str]
    warnings: list[str]

    @property
    def ragged(self) -> bool:
        return len(set(self.experts_after_per_layer.values())) > 1

    def notes(self) -> list[str]:
        """Lines the CLI prints after its table: what became of the MTP layers, how to load a ragged result."""
        lines = list(self.mtp)
        if self.ragged:
            files = ", ".join(self.model_code)
            lines.append(f"different expert counts per layer: load with trust_remote_code=True ({files})")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "experts_before_per_layer": {str(k): v for k, v in self.experts_before_per_layer.items()},
            "experts_after_per_layer": {str(k): v for k, v in self.experts_after_per_layer.items()},
            "ragged": self.ragged,
            "model_code": self.model_code,
            "top_k": self.top_k,
            "warnings": self.warnings,
        }


def top_k_warnings(counts: dict[int, int], top_k: int) -> list[str]:
    """One line per clipping: globally when no layer has top-k experts, else per layer that has fewer."""
    largest = max(counts.values())
    if largest < top_k:
        return [f"top-k {top_k} is more than the {largest} experts kept; top-k set to {largest}"]
    return [
        f"layer {layer}: top-k {top_k} is more than the {n} experts kept; that layer uses {n} per token"
        for layer, n in counts.items()
        if n < top_k
    ]


class Shrink:
    """One edit of a checkpoint's expert axis, from opening the source to the written folder (module docstring)."""

    # set by `target`, which `write` needs first
    counts: dict[int, int]  # experts per MoE layer in the result
    drop_mtp: bool
    mtp: MtpTensors
    config: ModelConfig  # the result's
    model_files: dict[str, str]  # modelling code a ragged result ships

    def __init__(self, model: str | Path, out: Path, max_shard_size: str | int, force: bool) -> None:
        self.max_bytes = parse_size(max_shard_size, "--max-shard-size")
        self.out, self.force = Path(out), force
        check_writable(self.out, force, "folder")
        self.ckpt = Checkpoint.open(model)

    def target(self, counts: dict[int, int], drop_mtp: bool, verb: str, top_k: dict[int, int] | None = None) -> None:
        """Check the result's expert counts (every MoE layer's) before any plan; `verb` names the command.
        `top_k`: experts per token per layer (a mask's, from `allocate --top-k search`); None: the source's."""
        ckpt, config = self.ckpt, self.ckpt.config
        self.counts, self.drop_mtp = counts, drop_mtp
        self.mtp = stage_mtp(ckpt, counts, drop_mtp)
        check_routers_finite(self.mtp, config.adapter, verb, mtp=not drop_mtp)  # experts: read only where computed
        layer_top_k = source_top_k(config) if top_k is None else top_k
        raw, self.model_files = expert_count_config(config.raw, config.adapter, counts, layer_top_k)
        if drop_mtp:
            set_mtp_count(raw, config.text_key, self.mtp.layout.family, 0)
        self.config = ModelConfig(raw, config.adapter, config.text_key, config.source)

    def write(
        self,
        plans: dict[int, LayerPlan],
        step: dict[str, Any],
        mtp_verb: str,
        progress: Callable[[int, int], None] | None = None,
    ) -> Shrunk:
        """Write the plans (MoE layers without one are kept whole); `step` is the manifest history entry and
        `mtp_verb` says what the MTP blocks got from the last MoE layer ("kept", "merged alike")."""
        ckpt, config, mtp = self.ckpt, self.ckpt.config, self.mtp
        slots, merged = lineage(ckpt.identity, ckpt.manifest, plans)
        counts = dict(config.experts_per_layer)
        planned, routed, inputs = dict(plans), set(config.moe_layers), mtp.decoder
        follow = config.moe_layers[-1]
        if not self.drop_mtp:
            inputs = mtp.decoder + mtp.virtual + mtp.extras  # MTP layers under their virtual decoder names
            routed |= set(mtp.moe)
            for virtual in mtp.moe:
                counts[virtual] = counts[follow]
                if (last := plans.get(follow)) is not None:  # else the block is copied as it is, like the layer
                    planned[virtual] = LayerPlan(virtual, last.clusters, last.weights, last.router, last.seed)
        quant = Quantization.from_config(config.raw)  # computed experts are written back in this format
        tensors = mtp.restore(ShrinkPlanner(config.adapter, planned, counts, quant, routed).plan(inputs))
        edit = Edit(ckpt, self.config, tensors, step, slots, mtp, mtp_verb, self.drop_mtp, merged, self.model_files)
        written = write_edit(edit, self.out, self.max_bytes, force=self.force, progress=progress)
        return Shrunk(
            **vars(written),
            top_k=self.config.top_k,
            experts_before_per_layer=config.experts_per_layer,
            experts_after_per_layer=self.counts,
            model_code=sorted(self.model_files),
            warnings=top_k_warnings(self.counts, config.top_k),
        )


def lineage(
    identity: ModelIdentity, previous: Manifest | None, plans: dict[int, LayerPlan]
) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[Members, ...]]]:
    """(slots, merged) of the output manifest in ORIGINAL expert ids: each slot's anchor, and for merged layers
    (now or before) each slot's members with their weights, composed with what the input's slots already hold."""
    slots: dict[int, tuple[int, ...]] = {}
    merged: dict[int, tuple[Members, ...]] = {}
    for layer in identity.moe_layers:
        ids = identity.original_ids[layer]
        was_merged = previous is not None and layer in previous.merged
        plan = plans.get(layer)
        if plan is None:
            slots[layer] = ids
            if was_merged:
                merged[layer] = previous.merged[layer]
            continue
        slots[layer] = tuple(ids[c.anchor] for c in plan.clusters)
        if was_merged or any(len(c.members) > 1 for c in plan.clusters):
            before = (
                previous.members(layer) if previous and layer in previous.slots else tuple(((i, 1.0),) for i in ids)
            )
            merged[layer] = tuple(_compose(before, c, w) for c, w in zip(plan.clusters, plan.weights, strict=True))
    return slots, merged


def _compose(previous: tuple[Members, ...], cluster: Cluster, weights: tuple[float, ...]) -> Members:
    """Members of a new slot in ORIGINAL ids: current slots expand into what they already merged."""
    out: dict[int, float] = {}
    for slot, weight in zip(cluster.members, weights, strict=True):
        for orig, inner in previous[slot]:
            out[orig] = out.get(orig, 0.0) + weight * inner
    return tuple(out.items())
