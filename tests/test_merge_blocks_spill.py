"""`allocate --for merge` builds each (count, layer) merged block once: blocks the current candidate does not use
are spilled to a private temporary folder and restored when needed again (review: dropping and rebuilding them
cost ~16x the builds), the scores equal a search that never puts a block aside, and the folder goes with the
search, also when it raises."""

from __future__ import annotations

import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import tiny_stats

from moe_prune.allocation import spill
from moe_prune.allocation.blocks import MergedBlocks
from moe_prune.allocation.evaluator import Evaluator
from moe_prune.errors import MoePruneError
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.stages import allocate as stage

EVALS = 24


@pytest.fixture(scope="module")
def mixtral_stats(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """(tiny Mixtral: 3 MoE layers of 8 experts, top-2; its statistics)."""
    folder = tiny("mixtral")
    path = tiny_stats(folder, tmp_path_factory.mktemp("spill-stats"))
    return folder, path


class Record:
    """What a search did: the (count, layer) blocks each build merged, every candidate's counts and scores, the
    restores, and the spill folder's files seen while a candidate ran."""

    def __init__(self) -> None:
        self.builds: list[list[tuple[int, int]]] = []
        self.candidates: list[tuple[int, ...]] = []
        self.scores: list[tuple[float, float]] = []
        self.restores = 0
        self.spill_files: set[str] = set()
        self.blocks: list[MergedBlocks] = []


@pytest.fixture
def recorded(monkeypatch, tmp_path) -> tuple[Record, Path]:
    """Record the search through `stage.allocate`'s own names; temporary folders go under tmp_path/tmp."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    record, merged_models, measure_in, restore = Record(), stage.merged_models, Evaluator.measure_in, spill.restore

    @contextmanager
    def recording_models(*args, **kwargs):
        with merged_models(*args, **kwargs) as build:

            def recording_build(count, only=None):
                record.builds.append([(count, layer) for layer in only])
                return build(count, only)

            yield recording_build

    class RecordingBlocks(MergedBlocks):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            record.blocks.append(self)

        def swapped(self, counts):
            record.candidates.append(tuple(counts))
            return super().swapped(counts)

    def recording_measure(self, candidate, on_batch=None):
        @contextmanager
        def inside():
            with candidate:
                record.spill_files |= {p.name for p in scratch.rglob("*.safetensors")}
                yield

        record.scores.append(measure_in(self, inside(), on_batch))
        return record.scores[-1]

    def counting_restore(*args, **kwargs):
        record.restores += 1
        return restore(*args, **kwargs)

    monkeypatch.setattr(stage, "merged_models", recording_models)
    monkeypatch.setattr(stage, "MergedBlocks", RecordingBlocks)
    monkeypatch.setattr(Evaluator, "measure_in", recording_measure)
    monkeypatch.setattr(spill, "restore", counting_restore)
    return record, scratch


def run_search(stats: tuple[Path, Path]) -> None:
    folder, path = stats
    spec = AllocateSpec(criterion="soft-counts", keep=12, budget_evals=EVALS, for_="merge", method="frequency")
    stage.allocate(path, folder, spec)


def test_each_block_is_built_once_and_scores_equal_a_search_that_keeps_every_block(
    mixtral_stats, recorded, monkeypatch
):
    record, scratch = recorded
    run_search(mixtral_stats)
    built = [key for keys in record.builds for key in keys]
    needed = {(count, layer) for counts in record.candidates for layer, count in enumerate(counts)}
    assert Counter(built).most_common(1)[0][1] == 1, Counter(built).most_common(3)  # no block built twice
    assert len(record.candidates) > 10 and record.restores > 0  # a real search that came back to spilled blocks
    tried = sorted({count for count, _ in needed})
    assert sorted(count for (count, _), *_ in record.builds) == tried  # one build per count, at its first use
    assert set(built) == {(count, layer) for count in tried for layer in range(3)}  # of every searched layer
    (blocks,) = record.blocks
    assert blocks.made == built and blocks.built == len(tried)
    assert record.spill_files <= {f"keep-{count}-layer-{layer}.safetensors" for count, layer in built}
    assert record.spill_files and list(scratch.iterdir()) == []  # spilled while searching, nothing left after
    spilling = (list(record.candidates), list(record.scores), record.restores)

    record.__init__()
    monkeypatch.setattr(MergedBlocks, "_spill", lambda self, key: None)  # every block stays in memory
    run_search(mixtral_stats)
    assert record.restores == 0 and not record.spill_files
    assert (record.candidates, record.scores) == spilling[:2]  # the same path and, exactly, the same scores


def test_the_spill_folder_goes_when_the_search_raises(mixtral_stats, recorded, monkeypatch):
    record, scratch = recorded
    measure = Evaluator.measure_in

    def failing(self, candidate, on_batch=None):
        if record.spill_files:
            raise MoePruneError("stopped mid-search")
        return measure(self, candidate, on_batch)

    monkeypatch.setattr(Evaluator, "measure_in", failing)
    with pytest.raises(MoePruneError, match="stopped mid-search"):
        run_search(mixtral_stats)
    assert record.spill_files and list(scratch.iterdir()) == []


class Block(torch.nn.Module):
    """A parameter, a persistent and a non-persistent buffer, and a second name for the parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)))
        self.register_buffer("scale", torch.arange(3.0))
        self.register_buffer("table", torch.randn(5, generator=torch.Generator().manual_seed(2)), persistent=False)
        self.inner = torch.nn.Linear(3, 2)
        self.tied = torch.nn.Linear(3, 4, bias=False)
        self.tied.weight = self.weight
        self.flag = "kept"


def test_spill_and_restore_bring_back_every_tensor(tmp_path):
    block = Block().to(torch.bfloat16)
    before = {name: t.clone() for name, t in spill.tensors_of([block]).items()}
    assert {"0.table", "0.tied.weight", "0.inner.bias"} <= set(before)
    file = tmp_path / "block.safetensors"
    spill.spill([block], file)
    assert all(t.is_meta for t in spill.tensors_of([block]).values()) and spill.device_of([block]) is None
    spill.restore([block], file, torch.device("cpu"))
    after = spill.tensors_of([block])
    assert after.keys() == before.keys() and block.flag == "kept"
    assert all(torch.equal(after[n], before[n]) and after[n].dtype == torch.bfloat16 for n in before)
    other = Block()
    other.register_buffer("extra", torch.zeros(1))
    with pytest.raises(MoePruneError, match=r"block\.safetensors: .*0\.extra"):
        spill.restore([other], file, torch.device("cpu"))
