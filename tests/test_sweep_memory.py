"""`sweep` holds only what the combination (and the allocation candidate) being measured needs.

Probes run where a model is judged: inside every `allocate` candidate (the merged blocks swapped in) and at
every combination's evaluation. Each counts the checkpoint folders alive under the sweep's work folder and
the temporary folder, and the bytes of every torch tensor Python still tracks (tracemalloc does not see
torch's CPU allocator, so the tensors are counted from the collector's own list, without collecting:
a model kept alive by a reference cycle counts, as it holds its memory until a full collection).
"""

from __future__ import annotations

import gc
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from moe_prune.allocation.evaluator import Evaluator
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.specs.sweep import SweepSpec
from moe_prune.stages import evaluate
from moe_prune.stages import sweep as stage
from moe_prune.sweep.plan import Combo

EVAL = dict(seq_len=128, batch_size=16, max_tokens=512)


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the collector tracks (reachable or cyclic garbage)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def checkpoints_under(*roots: Path) -> list[Path]:
    """Folders holding a checkpoint (a config.json) below `roots`."""
    return sorted({p.parent for root in roots for p in root.rglob("config.json")})


class Probes:
    """What was alive at each probe: (where, checkpoint folders, tensor bytes)."""

    def __init__(self, roots: tuple[Path, ...]) -> None:
        self.roots, self.seen = roots, []

    def __call__(self, where: str) -> None:
        self.seen.append((where, checkpoints_under(*self.roots), live_tensor_bytes()))


@pytest.fixture
def probed(monkeypatch, tmp_path):
    """Probes inside every allocate candidate and at every sweep evaluation; temporary folders under tmp_path."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    probes = Probes((scratch, tmp_path / "run"))
    measure_in, evaluate_model = Evaluator.measure_in, evaluate.evaluate_model

    def measure_probed(self, candidate, on_batch=None):
        @contextmanager
        def inside():
            with candidate:
                probes("candidate")
                yield

        return measure_in(self, inside(), on_batch)

    def evaluate_probed(*args, **kwargs):
        probes("combination")
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(Evaluator, "measure_in", measure_probed)
    monkeypatch.setattr(evaluate, "evaluate_model", evaluate_probed)
    return probes


def model_bytes() -> int:
    return sum(t.nbytes for t in Checkpoint.open(DEMO_MODEL_DIR).tensors)


def test_sweep_holds_one_checkpoint_and_memory_does_not_grow_with_candidates(demo_stats, tmp_path, probed):
    """A searched merge tries several counts (uniform 4 per layer, the global start's 8/3/2/3, then moves):
    at most one temporary checkpoint exists at any probe, and the tensors alive at the last probes are no
    more than at the first candidate's (plus a tenth of the model: the search's bookkeeping)."""
    stats = tmp_path / "demo.npz"
    demo_stats.save(stats)
    settings = SweepSpec(
        criteria=("usage-frequency",),
        ratios=(0.5,),
        scopes="search",
        merge_methods=("frequency",),
        search_evals=8,
        random_seeds=1,
        **EVAL,
    )
    result = stage.run(DEMO_MODEL_DIR, stats, settings, tmp_path / "run")
    merges = [r for r in result.rows if r.combo.kind == "merge"]
    assert len(merges) == 2 and all(r.status == "done" for r in merges), [(r.combo.line, r.reason) for r in merges]
    segments = [[]]  # the candidates probed before each combination's evaluation
    for where, folders, tensors in probed.seen:
        if where == "combination":
            segments.append([])
        else:
            segments[-1].append((folders, tensors))
    lines = [r.combo.line for r in result.rows]
    assert (
        lines[-2:] == ["merge frequency", "merge frequency (searched)"] and "usage-frequency (min, searched)" in lines
    )
    merge_search = segments[-2]  # the searched merge's candidates, before its own evaluation (the last)
    assert len(merge_search) >= 6, [len(s) for s in segments]
    size = model_bytes()
    merge_growth = [round((b - merge_search[0][1]) / size, 3) for _, b in merge_search]
    combos = [(folders, b) for where, folders, b in probed.seen if where == "combination"]
    combo_growth = [round((b - combos[0][1]) / size, 3) for _, b in combos]
    problems = {
        "checkpoints alive together": [f for _, f, _ in probed.seen if len(f) > 1][:3],
        "evaluated checkpoints (the original is the source's)": [len(f) for f, _ in combos],
        "growth over the searched merge, in models": merge_growth,
        "growth over the combinations, in models": combo_growth,
    }
    ok = {
        "checkpoints alive together": not problems["checkpoints alive together"],
        "evaluated checkpoints (the original is the source's)": [len(f) for f, _ in combos]
        == [0] + [1] * (len(combos) - 1),
        "growth over the searched merge, in models": max(merge_growth) < 0.1,
        "growth over the combinations, in models": max(combo_growth) < 0.1,
    }
    assert all(ok.values()), {k: v for k, v in problems.items() if not ok[k]}


def test_a_refused_build_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A combination refused half-way through its build (a skipped row) leaves nothing in the scratch folder."""

    def refused(plan, combo, target):
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        raise MoePruneError("refused after writing")

    monkeypatch.setattr(stage, "_build", refused)
    row = stage._execute(None, Combo("prune", 0.5, "usage-frequency", "min"), tmp_path)
    assert (row.status, row.reason) == ("skipped", "refused after writing")
    assert checkpoints_under(tmp_path) == []
