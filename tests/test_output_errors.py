"""The output side failing (a full disk): one line naming the output, exit 1, no temporary left behind.

A full disk is simulated with RLIMIT_FSIZE in the child process (writes past the limit fail with
EFBIG, as they fail with ENOSPC on a full disk): no root, no mount, same code path (an OSError from
a write in the middle of building the output).
"""

from __future__ import annotations

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
