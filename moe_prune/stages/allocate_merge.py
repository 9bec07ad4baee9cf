"""`allocate --for merge`: search the per-layer counts `merge` keeps, judging each candidate as merged.

Masking router logits is the pruned model exactly, but not a merged one: merging averages members into
the anchor (or refits its down projection), so the kept experts compute something else. Here each
candidate is the merged model itself: `merge.run` builds the model merged to k experts in every searched
layer once per count k the search tries (into a temporary folder, deleted once loaded), and a candidate
runs the original with each searched layer's block taken from the model of its count (`allocation.blocks`,
which holds only the current candidate's blocks in memory and spills the others to disk). The result
is not a drop mask but the counts, written as JSON with the `moe-prune merge --keep D --keep LAYER=COUNT ...`
command that builds the checkpoint.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_prune.allocation.plan import Layers
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file
from moe_prune.merging.registry import get_method, weight_statistic
from moe_prune.runtime.loading import load_model
from moe_prune.scoring.selection import Budget
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge
from moe_prune.stages.allocate_data import Calibration
from moe_prune.stages.allocate_record import AllocationReport, allocation_record
from moe_prune.stages.calibration import recorded_windows
from moe_prune.stages.refit import check_pass, has_sums

FORMAT = "moe-prune merge allocation"


@dataclass(frozen=True)
class MergeTarget:
    """How `merge` will shrink every layer; the search picks only how many experts each layer keeps."""

    method: str = "uncurl"
    weights: str = "frequency"
    refit: bool = False
    seed: int = 0  # the merge methods' (k-means)

    def check(self, stats: Stats, ckpt: Checkpoint, stats_name: str, trust_remote_code: bool) -> list[str]:
        """Unknown names and statistics the merge cannot use fail here, before the model is loaded; returns notes.

        --refit without stored sums runs `merge`'s layer-by-layer pass once per count tried; that pass feeds
        every layer the original's inputs, so a layer's refit block still does not depend on the other
        layers' counts and the block swap stays exact. Its windows are re-read here, so a moved data file
        fails now rather than at the first build.
        """
        get_method(self.method), weight_statistic(self.weights)
        merge.check_stats(stats, ckpt, self.method, stats_name, self.weights, self.passes(stats) is False)
        if not self.passes(stats):
            return []
        check_pass(ckpt)
        recorded_windows(ckpt, stats, stats_name, trust_remote_code)
        return [
            "--refit without refit sums: every count tried runs merge's layer-by-layer pass over the "
            "calibration windows (profile --refit-stats solves every count from stored sums)"
        ]

    def passes(self, stats: Stats) -> bool | None:
        """None: no refit; True: refit by the layer-by-layer pass; False: refit from stored sums."""
        return not has_sums(stats) if self.refit else None

    def options(self) -> str:
        out = f" --method {self.method}"
        out += f" --weights {self.weights}" if self.weights != "frequency" else ""
        out += " --refit" if self.refit else ""
        return out + (f" --seed {self.seed}" if self.seed else "")


def capped(count: int, layers: Layers) -> dict[int, int]:
    """Per searched layer, `count` within its own [top-k, experts]: a ragged source's small layers.

    The search space already keeps each layer's count there, so a candidate never asks a layer for a
    block outside it; the cap only lets one uniform build serve the layers that can hold `count`.
    """
    bounds = zip(layers.numbers, layers.experts, layers.top_k, layers.searched, strict=True)
    return {layer: min(max(count, top_k), experts) for layer, experts, top_k, searched in bounds if searched}


@contextmanager
def merged_models(
    model: str | Path,
    stats: Stats,
    stats_name: str,
    target: MergeTarget,
    layers: Layers,
    calibration: Calibration,
) -> Iterator[Callable[..., Any]]:
    """`build(k, only=None)`: the model merged to k experts (capped per layer, `capped`) in the searched layers
    (or only in `only`; a layer's block does not depend on the others'). Its checkpoint is deleted as soon as
    it is loaded: the search writes one temporary checkpoint at a time, never one per count kept to the end."""
    work = Path(tempfile.mkdtemp(prefix="moe-prune-allocate-"))
    searched = [layer for layer, on in zip(layers.numbers, layers.searched, strict=True) if on]
    try:

        def build(count: int, only: list[int] | None = None) -> Any:
            merged = set(searched if only is None else only)
            folder = work / f"keep-{count}"
            try:
                merge.run(
                    model,
                    stats,
                    folder,
                    count,
                    MergeSpec(
                        device=calibration.device if target.passes(stats) else None,
                        method=target.method,
                        weights=target.weights,
                        refit=target.refit,
                        skip_layers=[layer for layer in layers.numbers if layer not in merged],
                        seed=target.seed,
                        force=True,
                    ),
                    keep_overrides={k: n for k, n in capped(count, layers).items() if k in merged},
                    stats_name=stats_name,
                )
                return load_model(folder, calibration.dtype, calibration.device, calibration.trust_remote_code)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        yield build
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class MergeAllocation:
    """The searched counts for `merge`, how they were found, and the command that merges with them."""

    target: MergeTarget
    keep: dict[int, int]  # experts per MoE layer after merging
    skip_layers: list[int]
    model: str
    stats: str
    allocation: dict[str, Any]  # the search's record (as a mask's provenance holds it)

    @property
    def default(self) -> int:
        searched = [n for layer, n in self.keep.items() if layer not in self.skip_layers]
        return Counter(searched).most_common(1)[0][0]

    @property
    def overrides(self) -> dict[int, int]:
        return {layer: n for layer, n in self.keep.items() if n != self.default and layer not in self.skip_layers}

    def command(self, out: str = "merged") -> str:
        keep = f"--keep {self.default}" + "".join(f" --keep {k}={n}" for k, n in self.overrides.items())
        skip = f" --skip-layers {','.join(map(str, self.skip_layers))}" if self.skip_layers else ""
        return (
            f"moe-prune merge {shlex.quote(self.model)} --stats {shlex.quote(self.stats)} {keep}{skip}"
            f"{self.target.options()} --out {shlex.quote(out)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "for": "merge",
            **asdict(self.target),
            "keep": {str(k): v for k, v in self.keep.items()},
            "skip_layers": self.skip_layers,
            "model": self.model,
            "stats": self.stats,
            "command": self.command(),
            "allocation": self.allocation,
        }

    def write(self, out: Path, force: bool, inputs: tuple[str | Path, ...] = ()) -> None:
        """The JSON, atomically (refused over an existing file without force)."""
        if Path(out).is_dir():
            raise MoePruneError(f"{out}: is a folder; give a file name for the allocation")
        with atomic_file(Path(out), force, protect=tuple(Path(p) for p in inputs)) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def merge_allocation(
    merge: MergeTarget,
    keep: dict[int, int],
    report: AllocationReport,
    budget: Budget | int,
    calibration: Calibration,
    facts: dict[str, Any],
    stats: str | Path,
    model: str | Path,
) -> MergeAllocation:
    """The `--for merge` result: the counts to merge to and the allocation's record."""
    report.target = {"for": "merge", **asdict(merge)}
    record = allocation_record(report, budget, calibration, facts, stats)
    record = {**{k: v for k, v in record.items() if k not in ("allocation", "stats")}, **record["allocation"]}
    return MergeAllocation(merge, keep, facts["skip_layers"], str(model), str(stats), record)
