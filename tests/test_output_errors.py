"""The output side failing (a full disk): one line naming the output, exit 1, no temporary left behind.

A full disk is simulated with RLIMIT_FSIZE in the child process (writes past the limit fail with
EFBIG, as they fail with ENOSPC on a full disk): no root, no mount, same code path (an OSError from
a write in the middle of building the output).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
from hostile import COMMANDS, fresh_workspace, snapshot
from test_hostile import good  # noqa: F401  (session fixture)

WRITERS = ("prune", "merge", "score", "profile", "combine", "finetune", "sweep", "eval-log-samples")
# eval writes only with --log-samples (lm-eval's demo tasks, two documents: seconds)
ARGV = {
    **COMMANDS,
    "eval-log-samples": lambda ws: [
        "eval",
        str(ws.model),
        "--tasks",
        "demo_records",
        "--limit",
        "2",
        "--no-perplexity",
        "--log-samples",
        str(ws.out),
    ],
}
LIMIT = 256  # bytes: below every output (the smallest, a mask, is about 1 KB)


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed by the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.parametrize("command", WRITERS)
def test_a_full_disk_is_one_line_and_leaves_nothing(good, tmp_path, command):  # noqa: F811
    ws = fresh_workspace(good, tmp_path / "ws")
    before = snapshot(ws.root)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "moe_prune", *ARGV[command](ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_limit_file_size,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(ws.out) in lines[0] and "too large" in lines[0].lower(), lines[0]
    assert snapshot(ws.root) == before, "an output or a temporary file was left behind"


# eval --log-samples is an output like every other: checked before lm-eval runs, --force to replace.


def _eval_samples(model, target, *extra: str):
    from typer.testing import CliRunner

    from moe_prune.cli import app

    argv = ["eval", str(model), "--tasks", "demo_records", "--limit", "2", "--no-perplexity"]
    return CliRunner().invoke(app, [*argv, "--log-samples", str(target), *extra])


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        ("{model}/config.json", (), "already exists; pass --force"),
        ("{model}/config.json", ("--force",), "is, holds or lies inside the input"),
        ("{model}/samples.jsonl", (), "is, holds or lies inside the input"),
        ("{data}", ("--force",), "is, holds or lies inside the input"),
        ("{root}/notes.jsonl", (), "already exists; pass --force"),
        ("{root}/device", ("--force",), "not a file or folder; never replaced"),
        ("{root}/folder", ("--force",), "is a folder, not a file"),
        ("{root}/loop", ("--force",), "symbolic link loop"),
    ],
)
def test_log_samples_is_refused_before_lm_eval_runs(good, tmp_path, monkeypatch, target, extra, message):  # noqa: F811
    pytest.importorskip("lm_eval")
    from moe_prune.stages import tasks

    ws = fresh_workspace(good, tmp_path / "ws")
    (ws.root / "notes.jsonl").write_text("mine\n")
    (ws.root / "folder").mkdir()
    os.mkfifo(ws.root / "device")
    os.symlink(ws.root / "loop", ws.root / "loop2")
    os.symlink(ws.root / "loop2", ws.root / "loop")
    monkeypatch.setattr(tasks, "run", lambda *a, **k: pytest.fail("lm-eval ran before the output was checked"))
    before = snapshot(ws.root)
    path = target.format(**ws.places())
    result = _eval_samples(ws.model, path, "--data", str(ws.data), *extra)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1, (result.stderr, result.exception)
    assert message in lines[0] and path in lines[0], lines[0]
    assert snapshot(ws.root) == before


def test_log_samples_replaces_a_file_only_with_force(good, tmp_path):  # noqa: F811
    pytest.importorskip("lm_eval")
    ws = fresh_workspace(good, tmp_path / "ws")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("an earlier run\n")
    result = _eval_samples(ws.model, samples, "--force")
    assert result.exit_code == 0, (result.stderr, result.exception)
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["model"], r["task"]) for r in records] == [("model", "demo_records")] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl", "ws"]  # no temporary left
