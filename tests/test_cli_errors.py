"""Every failure is one line and exit 1; --debug (or MOE_PRUNE_DEBUG=1) gives the traceback of a bug."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moe_prune.cli import app
from moe_prune.cli.common import DEBUG_ENV


@pytest.fixture
def broken_prune(monkeypatch, tmp_path):
    """`prune` hits a bug (an exception moe-prune did not mean to raise) after reading its inputs."""
    from moe_prune.artifacts import mask

    def bug(*args, **kwargs):
        raise KeyError("slot 7\nsecond line")

    monkeypatch.setattr(mask.DropMask, "read", bug)
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored (unset) after the test, even when --debug sets it
    return ["prune", "demo", "--mask", "m.json", "--out", str(tmp_path / "o")]


def test_a_bug_is_one_line_saying_how_to_get_the_traceback(broken_prune):
    result = CliRunner().invoke(app, broken_prune)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert "unexpected KeyError" in lines[0] and "--debug" in lines[0] and "Traceback" not in result.stderr


def test_debug_shows_the_traceback(broken_prune, monkeypatch):
    result = CliRunner().invoke(app, ["--debug", *broken_prune])
    assert isinstance(result.exception, KeyError), result.stderr
    monkeypatch.setenv(DEBUG_ENV, "1")
    result = CliRunner().invoke(app, broken_prune)
    assert isinstance(result.exception, KeyError)


def test_machine_errors_name_the_path(monkeypatch, tmp_path):
    """An OSError (full disk, permissions) is the machine's, not a bug: one line with its path."""
    from moe_prune.artifacts import mask

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "m.json"))

    monkeypatch.setattr(mask.DropMask, "read", denied)
    monkeypatch.setenv(DEBUG_ENV, "0")  # restored (unset) after the test, even when --debug sets it
    result = CliRunner().invoke(app, ["prune", "demo", "--mask", "m.json", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path / 'm.json'}: Permission denied"


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "someorg/somemodel"],
        ["profile", "someorg/somemodel", "--out", "{tmp}/s.npz"],
        ["score", "--model", "someorg/somemodel", "--criterion", "weight-norm", "--drop", "1"],
        ["eval", "demo", "--data", "someorg/somedataset"],
    ],
)
def test_hub_ids_without_network_are_one_line(argv, tmp_path):
    """Tests run with HF_HUB_OFFLINE=1 (conftest): a hub id is one line naming it, no retries, no traceback."""
    (tmp_path / "m.json").write_text("{}")
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in argv])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert "someorg/some" in lines[0] and "offline" in lines[0]
    assert not list(tmp_path.glob("[so]*")), "nothing written"
