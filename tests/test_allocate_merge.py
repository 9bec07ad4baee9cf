"""`allocate --for merge`: a candidate is judged as the checkpoint `merge` writes for its counts (checked against
that checkpoint, loaded on its own), the result file's command builds it, and bad options are one-line errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
from helpers import PANGRAMS, tiny_stats
from typer.testing import CliRunner

from moe_prune.allocation.blocks import MergedBlocks
from moe_prune.allocation.evaluator import Evaluator
from moe_prune.allocation.objective import Reference
from moe_prune.allocation.objective import sums as objective_sums
from moe_prune.allocation.plan import Layers
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.runtime.loading import load_model
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import allocate as stage
from moe_prune.stages import merge, profile, prune
from moe_prune.stages.allocate_merge import MergeTarget, merged_models
from moe_prune.stages.refit import has_sums

TEXT = PANGRAMS


@pytest.fixture(scope="module")
def refit_stats(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """(tiny Mixtral: 3 MoE layers of 8 experts, top-2; its statistics with the refit sums)."""
    folder = tiny("mixtral")
    path = tiny_stats(folder, tmp_path_factory.mktemp("merge-stats"), refit_stats=True)
    return folder, path


@pytest.fixture(scope="module")
def plain_stats(tiny, tmp_path_factory) -> Path:
    """The tiny Mixtral's statistics without refit sums (merge --refit runs its layer-by-layer pass)."""
    return tiny_stats(tiny("mixtral"), tmp_path_factory.mktemp("plain-stats"))


@pytest.mark.parametrize(
    ("target", "sums"),
    [(MergeTarget("uncurl", refit=True), True), (MergeTarget("frequency", "output"), True),
     (MergeTarget("uncurl", refit=True), False)],
)  # fmt: skip
def test_candidate_is_the_merged_checkpoint(refit_stats, plain_stats, tmp_path, target, sums):
    """Blocks swapped into the original = `merge --keep 6 --keep 1=3 --keep 2=4` written and loaded by itself;
    also for --refit without refit sums (review #7: merge's layer-by-layer pass feeds each layer the
    original's inputs, so a layer's refit block does not depend on the other layers' counts)."""
    folder, stats_path = refit_stats
    stats = Stats.load(stats_path if sums else plain_stats)
    assert has_sums(stats) == sums
    ckpt = Checkpoint.open(folder)
    model = load_model(folder)
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(2))
    judge = Evaluator(model, ckpt.config, ids, batch_size=3, top=10**6)
    counts = (6, 3, 4)
    layers = Layers((0, 1, 2), (8, 8, 8), (2, 2, 2), (True, True, True))
    with (
        merged_models(folder, stats, "stats", target, layers, stage.Calibration()) as build,
        MergedBlocks(model, ckpt.config, (0, 1, 2), (True, True, True), build) as blocks,
    ):
        esap, kl = judge.measure_in(blocks.swapped(counts))
        assert blocks.built == 3  # one merged model per distinct count
    out = tmp_path / "merged"
    spec = MergeSpec(method=target.method, weights=target.weights, refit=target.refit)
    merge.run(folder, stats, out, 6, spec, keep_overrides={1: 3, 2: 4})
    with torch.inference_mode():
        logits = load_model(out)(input_ids=ids).logits[:, :-1].reshape(-1, 128)
    want_esap, want_kl = objective_sums(judge.references[0], logits)
    assert esap == pytest.approx(want_esap / judge.positions, rel=1e-6)
    assert kl == pytest.approx(want_kl / judge.positions, rel=1e-5, abs=1e-9)
    assert kl > 1e-4  # merged, not the original
    assert judge.measure([[], [], []]) == pytest.approx((1.0, 0.0), abs=1e-9)  # the original's blocks are back


def test_reference_is_the_original(refit_stats):
    folder, _ = refit_stats
    model = load_model(folder)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    judge = Evaluator(model, Checkpoint.open(folder).config, ids, batch_size=2, top=10**6)
    logits = model(input_ids=ids).logits[:, :-1].reshape(-1, 128)
    assert torch.equal(judge.references[0].values, Reference.from_logits(logits, 10**6).values)


def test_cli_writes_counts_whose_command_merges(refit_stats, tmp_path):
    folder, stats = refit_stats
    out = tmp_path / "counts.json"
    argv = [str(folder), "--stats", str(stats), "--for", "merge", "--method", "uncurl", "--refit"]
    argv += ["--ratio", "0.5", "--budget-evals", "6", "--json", "-o", str(out)]
    result = CliRunner().invoke(app, ["allocate", *argv])
    assert result.exit_code == 0, result.output
    report, written = json.loads(result.stdout), json.loads(out.read_text())
    keep = [written["keep"][str(layer)] for layer in (0, 1, 2)]
    assert keep == report["counts"]["searched"] and sum(keep) <= 12 and min(keep) >= 2
    assert written["for"] == "merge" and written["refit"] and written["allocation"]["evaluations"] <= 6
    assert report["target"] == {"for": "merge", "method": "uncurl", "weights": "frequency", "refit": True, "seed": 0}
    command = shlex.split(written["command"])
    command[command.index("--out") + 1] = str(tmp_path / "merged")
    built = CliRunner().invoke(app, [*command[1:], "--json"])
    assert built.exit_code == 0, built.output
    after = json.loads(built.stdout)["experts_after"]
    assert [after[str(layer)] for layer in (0, 1, 2)] == keep


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "uncurl"], "--method apply to --for merge only"),
        (["--refit"], "--refit apply to --for merge only"),
        (["--for", "quantize"], "--for 'quantize': use prune or merge"),
        (["--for", "merge", "--method", "nonsense"], "nonsense"),
        (["--for", "merge", "--weights", "mass"], "unknown --weights 'mass'"),
        (["--for", "merge", "--method", "hcsmoe"], "lacks out_all_sum"),
    ],
)
def test_bad_merge_options_are_one_line(refit_stats, tmp_path, extra, message):
    folder, stats = refit_stats
    out = tmp_path / "counts.json"
    result = CliRunner().invoke(
        app, ["allocate", str(folder), "--stats", str(stats), "--ratio", "0.5", "--out", str(out), *extra]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_library_call_returns_counts(refit_stats):
    folder, stats = refit_stats
    result, report = stage.allocate(stats, folder, AllocateSpec("soft-counts", keep=10, budget_evals=4, for_="merge"))
    assert isinstance(result, stage.MergeAllocation)
    assert sum(result.keep.values()) <= 10 and list(result.keep.values()) == report.counts["searched"]


def test_ragged_source_searches_each_layer_within_its_experts(tiny, tmp_path):
    """Review #1: a ragged source (6/3/5 experts): counts above a small layer's are merged there to its own
    count, so the search runs to its end instead of stopping at '--keep 6 for layer 1 is more than its 3'."""
    folder = tiny("mixtral")
    keep = {0: [0, 1, 2, 3, 4, 5], 1: [0, 2, 4], 2: [1, 3, 5, 6, 7]}
    ragged = tmp_path / "ragged"
    prune.run(folder, DropMask.create(Checkpoint.open(folder).identity, keep, "test"), ragged)
    stats = tiny_stats(ragged, tmp_path)
    result, report = stage.allocate(stats, ragged, AllocateSpec("soft-counts", keep=11, budget_evals=12, for_="merge"))
    assert isinstance(result, stage.MergeAllocation) and report.evaluations > 1
    for counts in report.counts.values():
        assert all(2 <= k <= n for k, n in zip(counts, (6, 3, 5), strict=True)) and sum(counts) <= 11
    assert list(result.keep.values()) == report.counts["searched"]


def test_merge_without_criterion_ranks_by_what_profile_for_the_method_recorded(refit_stats, tmp_path):
    """Review #6: statistics `profile --for uncurl` wrote (no soft_counts) serve `allocate --for merge --method
    uncurl` without --criterion, as they serve `merge`; the global start ranks by usage frequency."""
    folder, _ = refit_stats
    data = tmp_path / "calibration.txt"
    data.write_text(TEXT)
    settings = profile.Settings(samples=4, seq_len=32, batch_size=4, for_names=("uncurl",))
    stats = tmp_path / "uncurl.npz"
    profile.run(folder, str(data), settings).stats.save(stats)
    assert "soft_counts" not in Stats.load(stats).arrays
    out = tmp_path / "counts.json"
    argv = [str(folder), "--stats", str(stats), "--for", "merge", "--method", "uncurl", "--ratio", "0.5"]
    result = CliRunner().invoke(app, ["allocate", *argv, "--budget-evals", "4", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["criterion"] == "usage-frequency" and report["global_from"] == "usage-frequency"
    assert json.loads(out.read_text())["keep"]


def test_refit_without_sums_searches_and_says_what_it_costs(refit_stats, plain_stats):
    """Review #7: `allocate --for merge --refit` takes statistics without refit_hh/refit_hy, as `merge --refit` does."""
    folder, _ = refit_stats
    spec = AllocateSpec(keep=12, budget_evals=3, for_="merge", refit=True)
    result, report = stage.allocate(plain_stats, folder, spec)
    assert isinstance(result, stage.MergeAllocation) and sum(result.keep.values()) <= 12
    assert any("layer-by-layer pass" in warning for warning in report.warnings)
