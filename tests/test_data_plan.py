"""One data plan (issue #22): `--data` parsed once per run, and every stage's windows drawn by one loader.

The loader (`runtime.data_plan.load_windows`) is watched while profile, `merge --refit`'s re-reading, allocate,
sweep's searched rows and lottery run on the same `--data`: each must load the very same plan and get windows
with the same hash (`artifacts.provenance.hash_tokens`, what profile records as windows_sha256); finetune and a
lottery round's finetune of the same tokens must share theirs too.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from moe_prune.artifacts.provenance import hash_tokens
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.lottery.recipe import LotteryParams
from moe_prune.runtime import data_plan, shares
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.specs.sweep import SweepSpec
from moe_prune.stages import allocate, calibration, finetune, lottery, profile, sweep
from moe_prune.training import text
from moe_prune.training.options import FinetuneOptions

CRITERION = "activation-norm"
SAMPLES, SEQ = 16, 32  # sweep's searches judge on allocate's default 16 windows at the profiled length


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> list[str]:
    """The demo's calibration records in two files, mixed 3:1."""
    folder = tmp_path_factory.mktemp("plan")
    lines = DEMO_CALIBRATION.read_text().splitlines(keepends=True)
    half = len(lines) // 2
    (folder / "a.jsonl").write_text("".join(lines[:half]))
    (folder / "b.jsonl").write_text("".join(lines[half:]))
    return [f"{(folder / 'a.jsonl').resolve()}:0.75", f"{(folder / 'b.jsonl').resolve()}:0.25"]


@pytest.fixture
def parses(monkeypatch) -> list[str]:
    """Every `--data` value parsed from its text (parsed `SourceSpec`s passed on are not parsed again)."""
    seen: list[str] = []
    real = shares.parse_source

    def spy(text_value: str, option: str = "--data") -> shares.SourceSpec:
        seen.append(text_value)
        return real(text_value, option)

    monkeypatch.setattr(shares, "parse_source", spy)
    return seen


@pytest.fixture
def loads(monkeypatch) -> list[tuple[data_plan.DataPlan, str]]:
    """(plan, hash of its windows) of every window loading, whichever stage asked."""
    seen: list[tuple[data_plan.DataPlan, str]] = []
    real = data_plan.load_windows

    def spy(plan, tokenizer, sources=None):
        loaded = real(plan, tokenizer, sources)
        seen.append((plan, hash_tokens(loaded.windows)))
        return loaded

    monkeypatch.setattr(data_plan, "load_windows", spy)
    monkeypatch.setattr(text, "load_windows", spy)
    return seen


def test_profile_parses_each_data_value_once(two_sources, parses, tmp_path):
    args = ["profile", "--samples", "2", "--seq-len", str(SEQ), "--out", str(tmp_path / "s.npz")]
    result = CliRunner().invoke(app, [*args, *(a for d in two_sources for a in ("--data", d))])
    assert result.exit_code == 0, result.output
    assert parses == two_sources  # the CLI parses, the stage takes the parsed sources


def test_every_stage_draws_the_same_windows_from_one_plan(two_sources, loads, parses, tmp_path):
    settings = profile.Settings(samples=SAMPLES, seq_len=SEQ, seed=0, batch_size=8)
    stats = profile.run(DEMO_MODEL_DIR, two_sources, settings).stats
    assert len(loads) == 1
    plan, digest = loads[0]
    assert digest == stats.provenance["windows_sha256"] and plan.specs == tuple(shares.parse_sources(two_sources))
    path = tmp_path / "s.npz"
    stats.save(path)

    windows, _ = calibration.recorded_windows(Checkpoint.open(DEMO_MODEL_DIR), stats, str(path), False)
    assert hash_tokens(windows) == digest  # merge --refit's re-reading
    allocate.allocate(str(path), DEMO_MODEL_DIR, AllocateSpec(CRITERION, ratio=0.5, budget_evals=2))
    search = SweepSpec(
        criteria=(CRITERION,), ratios=(0.5,), scopes="search", search_evals=2, random_seeds=1, max_tokens=256
    )
    sweep.run(DEMO_MODEL_DIR, path, search)
    assert len(loads) == 4 and all(load == (plan, digest) for load in loads)  # refit, allocate, sweep: the same

    loads.clear()
    parses.clear()
    fields = dict(tokens_first=512, seq_len=SEQ, batch_size=4, profile_samples=SAMPLES, profile_seq_len=SEQ)
    params = LotteryParams(str(DEMO_MODEL_DIR), CRITERION, two_sources, rounds=1, eval_tokens=0, **fields)
    lottery.run(params, tmp_path / "lottery")
    assert parses == two_sources  # once for the recipe, its checks and every round's profile and finetune
    assert loads[0] == (plan, digest)  # the round's profile
    options = FinetuneOptions(**lottery._finetune_fields(params, 512))
    finetune.run(DEMO_MODEL_DIR, two_sources, tmp_path / "tuned", options)
    assert len(loads) == 3 and loads[2] == loads[1]  # finetune alone and the round's: one plan, one set of rows
    assert loads[1][0].specs == plan.specs and loads[1][0].tokens == (384, 128)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seed", "x", "provenance seed must be an integer, not a string 'x'"),
        ("seq_len", 1, "provenance seq_len must be at least 2, not 1"),
        ("split_on", 3, "provenance split_on must be a string, not an integer"),
    ],
)
def test_allocate_reads_the_recorded_settings_checked(field, value, message, tmp_path):
    """allocate judges on the data the statistics record, read through `stages.calibration`'s checks: a
    hand-edited value is one line naming the file, not a ValueError from int() deep in the data reader."""
    settings = profile.Settings(samples=2, seq_len=SEQ, batch_size=2)
    stats = profile.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), settings).stats
    stats.provenance[field] = value
    path = tmp_path / "edited.npz"
    stats.save(path)
    with pytest.raises(MoePruneError) as caught:
        allocate.allocate(str(path), DEMO_MODEL_DIR, AllocateSpec(CRITERION, ratio=0.5, budget_evals=2))
    assert str(caught.value) == f"{path}: {message}"


def test_naming_the_task_reader_loads_no_torch():
    """The CLI imports `stages.tasks` (for `task:`), which registers the task reader: that must not load torch,
    or every command, `--help` included, would pay for it (`runtime.readers` is torch-free)."""
    code = "import sys, moe_prune.cli, moe_prune.runtime.readers as r; print('torch' in sys.modules, sorted(r.READERS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "['task:']"]
