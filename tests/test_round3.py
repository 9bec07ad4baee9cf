"""Round-3 hostile inputs that the generator cannot see: a refusal that must come before the work.

The generator (`tests/hostile_round3.py`) checks the one line, the exit code and that nothing changed;
it cannot tell whether the refusal came before or after minutes of work. These tests replace the work
with a function that fails the test if it is ever called.
"""

from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

from moe_prune.cli import app


def _special(path) -> str:
    """A device node where we may make one (root), else a named pipe: both are refused the same way."""
    if os.geteuid() == 0:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return "device node"
    os.mkfifo(path)
    return "named pipe"


@pytest.mark.parametrize("target", ["special", "folder", "stats"])
def test_score_out_is_refused_before_scoring(demo_stats, tmp_path, monkeypatch, target):
    """score --out --force on something that is never replaced is refused by the up-front check."""
    from moe_prune.stages import score as stage

    def never(*args, **kwargs):
        raise AssertionError("scored before the output was checked")

    monkeypatch.setattr(stage, "score", never)
    stats = tmp_path / "stats.npz"
    demo_stats.save(stats)
    out = tmp_path / "out.json"
    if target == "special":
        expected = _special(out)
    elif target == "folder":
        out.mkdir()
        expected = "is a folder, not a file"
    else:
        out = stats
        expected = "input"
    argv = ["score", str(stats), "-c", "usage-frequency", "--ratio", "0.25", "--out", str(out), "--force"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "scored before" not in result.output, result.output
