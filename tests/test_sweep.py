"""`sweep`: rows equal the stages run by hand, random floor, --prune-hopeless, resume, fingerprint, bad options."""

from __future__ import annotations

import json
import math
import shlex
import statistics
import tempfile
from pathlib import Path

import pytest
from helpers import assert_one_line_error
from typer.testing import CliRunner

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app, sweep_tables
from moe_prune.demo import DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.plotting import pyplot
from moe_prune.specs.eval import EvalSpec
from moe_prune.specs.sweep import SweepSpec
from moe_prune.stages import evaluate, tasks
from moe_prune.stages import sweep as stage

MODEL = str(DEMO_MODEL_DIR)
EVAL = dict(seq_len=128, batch_size=16, max_tokens=2048)  # 2048 held-out tokens: a fraction of a second per model
# usage-frequency compares across layers (global), router-weight-norm reads weights, gradient-norm needs
# gradients the statistics lack (skipped), frequency merges.
FULL = SweepSpec(
    criteria=("usage-frequency", "router-weight-norm", "gradient-norm"),
    ratios=(0.25, 0.5, 0.75),
    directions="both",
    scopes="both",
    merge_methods=("frequency",),
    random_seeds=2,
    **EVAL,
)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def stats_file(demo_stats, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "demo.npz"
    demo_stats.save(path)
    return path


@pytest.fixture(scope="module")
def full(stats_file, tmp_path_factory):
    """One uninterrupted sweep: 3 ratios, both directions, both scopes, a merge method, 2 random seeds."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    return out, stage.run(MODEL, stats_file, FULL, out)


def perplexity(folder: str | Path) -> float:
    return evaluate.run(folder, EvalSpec(data=str(DEMO_HELDOUT), **EVAL)).model.perplexity


def rows(result) -> dict[str, dict]:
    return {r["key"]: r for r in result.to_dict()["rows"]}


def test_every_combination_is_a_row_and_the_floor_is_the_best_random_mask(full):
    out, result = full
    by_kind = {
        kind: [r for r in result.rows if r.combo.kind == kind] for kind in ("original", "random", "prune", "merge")
    }
    assert len(by_kind["original"]) == 1 and len(by_kind["random"]) == 3 * 2 and len(by_kind["merge"]) == 3
    # per ratio: usage-frequency 2 directions x 2 scopes, router-weight-norm 2 (no global), gradient-norm 2
    assert len(by_kind["prune"]) == 3 * (4 + 2 + 2)
    skipped = [r for r in result.rows if r.status == "skipped"]
    assert {r.combo.name for r in skipped} == {"gradient-norm"} and all("grad_gram" in r.reason for r in skipped)
    assert all(r.status == "done" for r in result.rows if r.combo.name != "gradient-norm")
    for ratio, floor in result.floors.items():
        values = [r.perplexity for r in by_kind["random"] if r.combo.ratio == ratio]
        assert floor.mean == statistics.fmean(values) and (floor.low, floor.high) == (min(values), max(values))
        assert floor.value == min(values) and floor.rule == "best of 2 random masks"
    for r in result.rows:
        if r.status == "done" and r.combo.kind != "original" and r.combo.scope == "layer":
            assert set(r.kept.values()) == {8 - round(8 * r.combo.ratio)}
    assert not (out / "checkpoints").exists() and not list(out.rglob("*.safetensors"))  # built, measured, deleted
    saved = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["key"] for r in saved} == {r.combo.key for r in result.rows}
    assert json.loads((out / "table.json").read_text())["rows"] == result.to_dict()["rows"]


def test_rows_equal_their_own_commands_run_by_hand(full, tmp_path, monkeypatch):
    """The best row of each ratio, a global mask, a merge and a random mask: rebuilt with the row's own
    `moe-prune score && prune` / `merge` command line, evaluated by `eval`: the same perplexity."""
    _, result = full
    monkeypatch.chdir(tmp_path)
    done = [r for r in result.rows if r.status == "done"]
    picked = {r.combo.key: r for r in result.best().values()}
    for wanted in ("global", "merge", "random"):
        row = next(r for r in done if wanted in (r.combo.scope, r.combo.kind) and r.combo.ratio == 0.5)
        picked[row.combo.key] = row
    assert len(picked) >= 4
    for row in picked.values():
        for part in row.command.split(" && "):
            words = shlex.split(part)
            assert words[0] == "moe-prune"
            built = invoke(*words[1:])
            assert built.exit_code == 0, built.output
        assert perplexity(tmp_path / words[words.index("--out") + 1]) == row.perplexity, row.combo.line
    original = next(r for r in result.rows if r.combo.kind == "original")
    assert original.perplexity == perplexity(MODEL)


def test_direction_verdicts_and_recommendation_follow_the_rows(full):
    _, result = full
    report = result.to_dict()
    measured = {(r.combo.name, r.combo.scope, r.combo.direction, r.combo.ratio): r.perplexity for r in result.rows}
    verdicts = {(v["criterion"], v["scope"]): v for v in report["directions"]}
    assert set(verdicts) == {
        ("usage-frequency", "layer"),
        ("usage-frequency", "global"),
        ("router-weight-norm", "layer"),
    }
    for (name, scope), verdict in verdicts.items():
        wins = sum(measured[(name, scope, "min", r)] < measured[(name, scope, "max", r)] for r in FULL.ratios)
        assert verdict["wins"]["min"] == wins and verdict["wins"]["max"] == 3 - wins
        assert verdict["winner"] == ("min" if wins >= 2 else "max") and verdict["text"].startswith(f"{name}")
        assert verdict["default"] == {"usage-frequency": "min", "router-weight-norm": "max"}[name]
    for ratio, best in report["best"].items():
        candidates = [r for r in result.rows if r.combo.ratio == float(ratio) and r.combo.kind in ("prune", "merge")]
        assert best["perplexity"] == min(r.perplexity for r in candidates if r.status == "done")
    lines: dict[str, list[float]] = {}
    for r in result.rows:
        if r.status == "done" and r.combo.kind in ("prune", "merge"):
            lines.setdefault(r.combo.line, []).append(math.log(r.perplexity))
    assert report["recommended"]["line"] == min(lines, key=lambda line: sum(lines[line]))


def test_prune_hopeless_skips_exactly_the_lines_worse_than_random_earlier(full, stats_file, tmp_path, monkeypatch):
    _, result = full
    floors = result.floors
    expected = set()
    for r in result.rows:
        if r.status == "done" and r.combo.kind in ("prune", "merge") and r.perplexity > floors[r.combo.ratio].value:
            expected |= {
                o.combo.key for o in result.rows if o.combo.line == r.combo.line and o.combo.ratio > r.combo.ratio
            }
    expected -= {r.combo.key for r in result.rows if r.status == "skipped"}
    assert expected  # the demo has lines worse than random (the wrong direction of usage-frequency)
    evaluated: list[str] = []
    measured = {r.combo.key: r for r in result.rows}

    def replay(plan, row, folder):
        """The full sweep's measurement of the same model (built for real; measuring is tested elsewhere)."""
        evaluated.append(row.combo.key)
        done = measured[row.combo.key]
        row.status, row.perplexity, row.nll = done.status, done.perplexity, done.nll
        row.tokens_scored, row.active_params, row.bytes_on_disk = (
            done.tokens_scored,
            done.active_params,
            done.bytes_on_disk,
        )

    monkeypatch.setattr(stage, "_measure", replay)
    pruned = stage.run(MODEL, stats_file, SweepSpec(**{**vars(FULL), "prune_hopeless": True}))
    hopeless = {r.combo.key for r in pruned.rows if r.status == "hopeless"}
    assert hopeless == expected and not hopeless & set(evaluated)
    full_rows = rows(result)
    for key, row in rows(pruned).items():
        if key not in hopeless:
            assert row == full_rows[key]


def test_hopeless_rule_covers_merges_failures_and_later_ratios():
    """On made-up rows: a line (merge lines too) worse than the best random mask, or failed, stops at larger ratios."""
    from moe_prune.sweep.plan import Combo
    from moe_prune.sweep.results import Row, floors, hopeless

    def row(kind, ratio, perplexity, name="x", seed=None, status="done"):
        return Row(
            Combo(kind, ratio, name, "min" if kind != "merge" else None, "layer", seed), status, perplexity=perplexity
        )

    rows = [row("random", 0.25, 10.0, "random", 0), row("random", 0.25, 12.0, "random", 1)]
    rows += [row("random", 0.5, 20.0, "random", 0), row("random", 0.5, 22.0, "random", 1)]
    rows += [row("merge", 0.25, 10.5, "uncurl"), row("prune", 0.25, 9.5, "a"), row("prune", 0.5, 20.5, "a")]
    rows += [row("prune", 0.25, None, "b", status="failed")]
    floor = floors(rows)
    assert floor[0.25].mean == 11.0 and floor[0.5].mean == 21.0
    assert floor[0.25].value == 10.0 and floor[0.5].value == 20.0  # the best mask: 10.5 beats the mean, not it
    assert "at ratio 0.25" in hopeless(Combo("merge", 0.5, "uncurl", None, "layer"), rows, floor)
    assert "at ratio 0.25" in hopeless(Combo("merge", 0.75, "uncurl", None, "layer"), rows, floor)
    assert hopeless(Combo("prune", 0.5, "a", "min"), rows, floor) is None  # better than random at 0.25
    assert "at ratio 0.5" in hopeless(Combo("prune", 0.75, "a", "min"), rows, floor)  # worse at 0.5
    assert hopeless(Combo("prune", 0.75, "a", "max"), rows, floor) is None  # another line
    assert "inf" in hopeless(Combo("prune", 0.5, "b", "min"), rows, floor)  # a model that failed is worst
    assert hopeless(Combo("random", 0.5, "random", "min", "layer", 0), rows, floor) is None  # the floor itself


def test_a_random_mask_is_never_best_nor_recommended():
    """On made-up rows where a random mask has the lowest perplexity: it is the floor, not a result."""
    from moe_prune.sweep.plan import Combo
    from moe_prune.sweep.results import Row, SweepResult

    def row(kind, ratio, perplexity, name, seed=None):
        return Row(
            Combo(kind, ratio, name, None if kind == "random" else "min", "layer", seed), "done", perplexity=perplexity
        )

    rows = [row("random", r, 1.0, "random", 0) for r in (0.25, 0.5)]
    rows += [row("prune", 0.25, 3.0, "a"), row("prune", 0.5, 5.0, "a"), row("merge", 0.25, 2.0, "m")]
    result = SweepResult(None, "m", "s.npz", "d", {}, {1: 8}, 2, (0.25, 0.5), rows, {"a": "min"})
    assert {ratio: r.combo.name for ratio, r in result.best().items()} == {0.25: "m", 0.5: "a"}
    assert result.recommended()["line"] == rows[2].combo.line and result.recommended()["best_at"] == [0.5]


def test_interrupted_sweep_resumes_and_ends_with_the_same_rows(full, stats_file, tmp_path, monkeypatch):
    """A part of the full sweep (its rows depend on nothing else), interrupted after 5 models, then resumed."""
    _, uninterrupted = full
    part = SweepSpec(**{**vars(FULL), "criteria": ("usage-frequency",), "ratios": (0.25, 0.5), "merge_methods": ()})
    out = tmp_path / "run"
    evaluated: list[str] = []
    real = stage._measure

    def interrupted(plan, row, folder):
        if len(evaluated) == 5:
            raise KeyboardInterrupt
        evaluated.append(row.combo.key)
        real(plan, row, folder)

    monkeypatch.setattr(stage, "_measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage.run(MODEL, stats_file, part, out)
    first = list(evaluated)
    assert not (out / "checkpoints").exists() and not (out / "table.json").exists()
    saved = [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert saved == first  # every finished model, and only those

    evaluated.clear()
    monkeypatch.setattr(
        stage, "_measure", lambda plan, row, folder: (evaluated.append(row.combo.key), real(plan, row, folder))[1]
    )
    resumed = stage.run(MODEL, stats_file, part, out)
    assert resumed.reused == 5 and not set(evaluated) & set(first)  # nothing measured twice
    assert len(evaluated) + 5 == len(resumed.rows) == 1 + 2 * (2 + 4)
    full_rows = rows(uninterrupted)
    assert all(row == full_rows[key] for key, row in rows(resumed).items())
    assert resumed.floors == {r: uninterrupted.floors[r] for r in part.ratios}
    evaluated.clear()
    again = stage.run(MODEL, stats_file, part, out)  # finished: everything read back
    assert evaluated == [] and again.reused == len(again.rows) and rows(again) == rows(resumed)


def test_another_fingerprint_is_refused_without_force(full, stats_file, tmp_path):
    out, _ = full
    before = (out / "results.jsonl").read_bytes()
    other = SweepSpec(**{**vars(FULL), "max_tokens": 1024})
    with pytest.raises(MoePruneError, match=r"holds a sweep of another .*max_tokens \(2048 there, 1024 now\)"):
        stage.run(MODEL, stats_file, other, out)
    result = invoke(
        "sweep", "--stats", str(stats_file), "-c", "usage-frequency", "--max-tokens", "1024", "-o", str(out)
    )
    assert result.exit_code == 1 and result.output.startswith("error:") and len(result.output.splitlines()) == 1
    assert (out / "results.jsonl").read_bytes() == before
    small = tmp_path / "small"
    args = ["sweep", "--stats", str(stats_file), "-c", "usage-frequency", "--ratios", "0.5", "--random-seeds", "1",
            "--seq-len", "128", "--max-tokens", "512"]  # fmt: skip
    assert invoke(*args, "-o", str(small)).exit_code == 0
    changed = invoke(*args[:-1], "256", "-o", str(small))
    assert changed.exit_code == 1 and "max_tokens (512 there, 256 now)" in changed.output
    forced = invoke(*args[:-1], "256", "-o", str(small), "--force", "--json")
    assert forced.exit_code == 0, forced.output
    assert (
        json.loads(forced.stdout)["reused"] == 0
        and json.loads((small / "sweep.json").read_text())["fingerprint"]["max_tokens"] == 256
    )


def test_cli_table_plot_json_and_no_leftovers(stats_file, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    args = ["sweep", "--stats", str(stats_file), "-c", "usage-frequency", "--ratios", "0.5", "--directions", "both",
            "--merge-methods", "prune", "--random-seeds", "1", "--seq-len", "128", "--max-tokens", "512"]  # fmt: skip
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["out"] is None and report["plot"] is None
    assert list(scratch.iterdir()) == []  # the temporary work folder is gone
    # `merge --method prune` keeps the most used experts: the same model as usage-frequency (min)
    by_line = {(r["line"], r["combo"]["ratio"]): r["perplexity"] for r in report["rows"]}
    assert by_line[("merge prune", 0.5)] == by_line[("usage-frequency (min)", 0.5)]

    no_folder = invoke(*args, "--plot")
    assert (
        no_folder.exit_code == 1 and "--plot draws DIR/sweep.png in the work folder; pass --out DIR" in no_folder.output
    )
    plt = pyplot()
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    out = tmp_path / "run"
    drawn = invoke(*args, "-o", str(out), "--plot", "--json")
    assert drawn.exit_code == 0, drawn.output
    report = json.loads(drawn.stdout)
    assert report["plot"] == str(out / "sweep.png") and (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = {line.get_label(): line.get_xydata().tolist() for line in figures[0].axes[0].get_lines()}
    original = next(r for r in report["rows"] if r["line"] == "original")["perplexity"]
    for row in report["rows"]:
        if row["combo"]["kind"] in ("prune", "merge"):  # each line runs from its ratio's point to the original
            assert lines[row["line"]] == [[4.0, row["perplexity"]], [8.0, original]]
    table = invoke(*args, "-o", str(out), "--plot")  # every row read back; the plot redrawn
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "random" in text and "usage-frequency: " in text and "recommended:" in text and "5 reused" in text
    assert len(figures) == 2


def fake_tasks(name, folder, label, manager, settings, progress):
    """lm-eval stand-in: a metric that reveals which model it scored (its experts in layer 0)."""
    kept = Checkpoint.open(folder).config.experts_per_layer[0]
    results = {"fake": {"acc,none": kept / 8, "acc_stderr,none": 0.0, "other,none": -1.0}, "group": {"alias": "g"}}
    return tasks.ModelTasks(name, results, {}, {}, {}, {}, {}, {})


def test_tasks_are_columns_measured_on_each_model(stats_file, monkeypatch):
    monkeypatch.setattr(tasks, "prepare", lambda settings: "manager")
    monkeypatch.setattr(tasks, "evaluate_tasks", fake_tasks)
    settings = SweepSpec(criteria=("usage-frequency",), ratios=(0.25, 0.5), random_seeds=1, tasks="fake", **EVAL)
    result = stage.run(MODEL, stats_file, settings)
    assert result.tasks == ["fake"]
    for row in result.rows:
        assert row.tasks == {"fake": {"metric": "acc,none", "value": row.kept[0] / 8, "stderr": 0.0}}
    table = " ".join(
        str(c) for column in sweep_tables.sweep_table(result).columns for c in [column.header, *column._cells]
    )
    assert "fake\nacc" in table and "0.750" in table and "0.500" in table


@pytest.mark.slow
def test_task_accuracy_equals_eval_tasks_on_the_rebuilt_model(stats_file, tmp_path, monkeypatch):
    """Real lm-eval: the best row's accuracy is what `tasks.run` measures on the model its command builds."""
    settings = SweepSpec(
        criteria=("usage-frequency",),
        ratios=(0.5,),
        random_seeds=1,
        tasks="demo_records",
        limit=8,
        **EVAL,
    )
    result = stage.run(MODEL, stats_file, settings)
    best = result.best()[0.5]
    monkeypatch.chdir(tmp_path)
    for part in best.command.split(" && "):
        assert invoke(*shlex.split(part)[1:]).exit_code == 0
    folder = tmp_path / shlex.split(best.command)[-1]
    measured = tasks.run(folder, tasks.TaskSettings(["demo_records"], limit=8)).model
    assert best.tasks["demo_records"]["value"] == measured.results["demo_records"]["acc,none"]


def test_work_folder_never_holds_the_inputs_nor_takes_a_foreign_folder(stats_file, tmp_path):
    before = stats_file.read_bytes()
    holder = invoke(
        "sweep", "--stats", str(stats_file), "-c", "usage-frequency", "-o", str(stats_file.parent), "--force"
    )
    assert holder.exit_code == 1 and "is, holds or lies inside the input" in holder.output
    assert stats_file.read_bytes() == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    taken = invoke("sweep", "--stats", str(stats_file), "-c", "usage-frequency", "-o", str(foreign))
    assert taken.exit_code == 1 and "already exists and holds no sweep; pass --force" in taken.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


BAD = [
    (["-c", "usage-frequncy"], "unknown criterion 'usage-frequncy' (did you mean 'usage-frequency'?)"),
    (["-c", "usage-frequency", "--ratios", "1.5"], "--ratios 1.5: each ratio must be above 0 and below 1"),
    (["-c", "usage-frequency", "--ratios", "0,0.5"], "--ratios 0: each ratio must be above 0 and below 1"),
    (["-c", "usage-frequency", "--ratios", "half"], "--ratios 'half': expected a fraction"),
    (
        ["-c", "usage-frequency", "--ratios", "0.9"],
        "--ratios 0.9 keeps 1 of the 8 experts of layer 0, fewer than top-k 2",
    ),
    (["-c", "usage-frequency", "--merge-methods", "uncrul"], "unknown merge method 'uncrul' (did you mean 'uncurl'?)"),
    (
        ["-c", "usage-frequency", "--directions", "sideways"],
        "--directions 'sideways': use one of default, opposite, both",
    ),
    (
        ["-c", "usage-frequency", "--global", "everywhere"],
        "--global 'everywhere': use one of layer, global, search, both, all",
    ),
    (["-c", "usage-frequency", "--merge-refit", "maybe"], "--merge-refit 'maybe': use one of no, yes, both"),
    (["-c", "usage-frequency", "--merge-weights", "mass"], "unknown --weights 'mass'"),
    (["-c", "usage-frequency", "--search-evals", "1"], "--search-evals must be at least 2"),
    (["-c", "usage-frequency", "--random-seeds", "0"], "--random-seeds must be at least 1"),
    (["-c", "gradient-norm,gradient-entropy"], "serves none of the criteria and merge methods asked for"),
    (["-c", "usage-frequency", "--data", "missing.jsonl"], "missing.jsonl: data file not found"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_options_are_one_line_and_write_nothing(args, message, stats_file, tmp_path):
    out = tmp_path / "run"
    result = invoke("sweep", "--stats", str(stats_file), *args, "-o", str(out))
    assert_one_line_error(result, message)
    assert not out.exists()
