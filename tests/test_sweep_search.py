"""`sweep` with searched allocations, output-weighted and refit merges: which rows the options make, and (on the
demo) that each such row is the model its own command line builds."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_prune.cli import app
from moe_prune.demo import DEMO_CALIBRATION, DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.scoring import get_criterion
from moe_prune.specs.eval import EvalSpec
from moe_prune.specs.sweep import SweepSpec
from moe_prune.stages import evaluate, profile
from moe_prune.stages import sweep as stage
from moe_prune.sweep.plan import Combo, combinations, parse_scopes

EVAL = dict(seq_len=128, batch_size=16, max_tokens=2048)


def test_scopes_parse_and_keep_their_old_meaning():
    assert parse_scopes("both") == ("layer", "global") and parse_scopes("all") == ("layer", "global", "search")
    assert parse_scopes("search,layer") == ("layer", "search") and parse_scopes("global") == ("global",)
    with pytest.raises(MoePruneError, match="--global 'wide'"):
        parse_scopes("layer,wide")


def test_combinations_with_search_weights_and_refit():
    crits = [get_criterion("soft-counts"), get_criterion("router-weight-norm")]  # global_ok: yes, no
    combos = combinations(crits, ["uncurl", "prune"], (0.5,), "both", "all", 2, 0, ("frequency", "output"), "both", 8)
    prune = {(c.name, c.direction, c.scope) for c in combos if c.kind == "prune"}
    assert prune == {
        ("soft-counts", "min", "layer"),
        ("soft-counts", "max", "layer"),
        ("soft-counts", "min", "global"),
        ("soft-counts", "max", "global"),
        ("soft-counts", "min", "search"),  # searched only in the criterion's own direction
        ("router-weight-norm", "max", "layer"),
        ("router-weight-norm", "min", "layer"),
        ("router-weight-norm", "max", "search"),
    }
    merges = [c for c in combos if c.kind == "merge"]
    # uncurl: 2 scopes x 2 weights x 2 refits; prune keeps anchors (no averaging): 2 scopes x 2 refits
    assert len(merges) == 8 + 4 and len({c.key for c in combos}) == len(combos)
    assert len({c.line for c in merges}) == len(merges)
    assert all((c.evals == 8) == (c.scope == "search") for c in combos)
    # rows of earlier sweeps keep their keys (results.jsonl is read back by key)
    assert Combo("merge", 0.5, "uncurl", None, "layer", 0).key == "merge:uncurl:None:layer:0:0.5"
    assert Combo("prune", 0.5, "reap", "min", "global").line == "reap (min, global)"
    assert (
        Combo("merge", 0.5, "uncurl", None, "search", 0, "output", True, 8).line
        == "merge uncurl (output, refit, searched)"
    )


@pytest.fixture(scope="module")
def refit_stats(tmp_path_factory) -> Path:
    """Demo statistics with the refit sums (8 windows of 128 tokens: small, enough to refit)."""
    path = tmp_path_factory.mktemp("sweep-search") / "demo.npz"
    settings = profile.Settings(samples=8, seq_len=128, seed=0, batch_size=8, refit_stats=True)
    profile.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), settings).stats.save(path)
    return path


@pytest.mark.slow
def test_searched_and_refit_rows_are_their_own_commands(refit_stats, tmp_path, monkeypatch):
    """A searched prune, an output-weighted refit merge and its searched twin: each row's command line, run by
    hand (allocate -> prune, or merge with the searched counts), gives the row's perplexity."""
    settings = SweepSpec(
        criteria=("soft-counts",),
        ratios=(0.5,),
        scopes="layer,search",
        merge_methods=("frequency",),
        merge_weights=("output",),
        merge_refit="yes",
        search_evals=4,
        random_seeds=1,
        **EVAL,
    )
    result = stage.run(DEMO_MODEL_DIR, refit_stats, settings, tmp_path / "run")
    done = {r.combo.line: r for r in result.rows if r.status == "done"}
    assert set(done) == {
        "original",
        "random",
        "soft-counts (min)",
        "soft-counts (min, searched)",
        "merge frequency (output, refit)",
        "merge frequency (output, refit, searched)",
    }, [(r.combo.line, r.reason) for r in result.rows]
    assert sum(done["soft-counts (min, searched)"].kept.values()) == 16
    assert sum(done["merge frequency (output, refit, searched)"].kept.values()) <= 16
    monkeypatch.chdir(tmp_path)
    for line in (
        "soft-counts (min, searched)",
        "merge frequency (output, refit)",
        "merge frequency (output, refit, searched)",
    ):
        row = done[line]
        for part in row.command.split(" && "):
            words = shlex.split(part)
            built = CliRunner().invoke(app, words[1:])
            assert built.exit_code == 0, built.output
        folder = tmp_path / words[words.index("--out") + 1]
        assert evaluate.run(folder, EvalSpec(data=str(DEMO_HELDOUT), **EVAL)).model.perplexity == row.perplexity, line
    floor = result.to_dict()["floors"][0]
    assert floor["rule"] == "best of 1 random mask" and floor["floor"] == floor["low"]
