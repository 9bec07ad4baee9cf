"""Errors keep their cause: `--debug` shows what went wrong underneath the one line a user sees.

`raise MoePruneError(...) from None` hides the original exception from the traceback `--debug` prints
for a bug report; every handler chains it instead (`from exc`). The CLI's one line is unchanged either
way, since it prints the MoePruneError's own message.
"""

from __future__ import annotations

import ast
from pathlib import Path

from typer.testing import CliRunner

import moe_prune
from moe_prune.cli import app

PACKAGE = Path(moe_prune.__file__).parent
# A comment with this marker on the raise line (or the line above) says why a cause must stay hidden.
HIDDEN = "cause hidden:"


def _from_none_sites() -> list[str]:
    sites = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.cause, ast.Constant) and node.cause.value is None:
                start, end = node.lineno, node.end_lineno or node.lineno
                context = " ".join(lines[max(start - 2, 0) : end])
                if HIDDEN not in context:
                    sites.append(f"{path.relative_to(PACKAGE.parent)}:{start}")
    return sites


def test_no_exception_is_raised_from_none():
    assert _from_none_sites() == []


def test_debug_shows_the_cause_and_the_line_is_unchanged(tmp_path, monkeypatch):
    """A missing statistics file: one line without --debug; with it, the FileNotFoundError underneath."""
    missing = tmp_path / "missing.npz"
    argv = ["score", str(missing), "-c", "usage-frequency", "--ratio", "0.25", "--out", str(tmp_path / "m.json")]
    plain = CliRunner().invoke(app, argv)
    assert plain.exit_code == 1
    assert plain.stderr.strip() == f"error: {missing}: statistics file not found (produce it with `moe-prune profile`)"
    debug = CliRunner().invoke(app, ["--debug", *argv])
    assert debug.exit_code != 0
    assert isinstance(debug.exception.__cause__, FileNotFoundError), repr(debug.exception)
    again = CliRunner().invoke(app, argv)  # --debug lasted for its own invocation only
    assert again.exit_code == 1 and again.stderr == plain.stderr
