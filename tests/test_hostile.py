"""Hostile and corrupt inputs (generated, see tests/hostile.py): one line naming the file, exit 1, nothing lost.

Every registered case runs through every command that reads its kind of input. The good inputs run
through every command too, so a case fails because of its damage and not because the command is
broken.
"""

from __future__ import annotations

import shutil
import signal
from contextlib import contextmanager

import hostile_artifacts  # noqa: F401  (registers cases)
import hostile_checkpoint  # noqa: F401
import hostile_code  # noqa: F401
import hostile_data  # noqa: F401
import hostile_mtp  # noqa: F401
import hostile_outputs  # noqa: F401
import hostile_parsing  # noqa: F401
import hostile_round3  # noqa: F401
import hostile_round4  # noqa: F401
import hostile_round5  # noqa: F401
import hostile_serving
import hostile_tasks  # noqa: F401
import pytest
from hostile import CASES, COMMANDS, PATCHES, fresh_workspace, snapshot
from hostile_serving import good_ragged  # noqa: F401  (fixture)
from typer.testing import CliRunner

from moe_prune.cli import app

DATA = "\n\n".join(
    f"Record {i}: the {w} of {i * 7 % 13} is {i * 11 % 17}; the trader sold {i % 5} crates at dawn."
    for i, w in enumerate(["weight", "price", "height", "colour", "speed", "size", "age", "value"] * 12)
)


@pytest.fixture(scope="session")
def good(tiny, tmp_path_factory):
    """A workspace of good inputs: tiny Mixtral with tokenizer, two statistics files, a mask, text."""
    from moe_prune.stages import profile

    root = tmp_path_factory.mktemp("hostile-good") / "ws"
    root.mkdir()
    shutil.copytree(tiny("mixtral"), root / "model")
    (root / "data.txt").write_text(DATA)
    for seed, name in ((0, "stats.npz"), (1, "stats2.npz")):
        settings = profile.Settings(samples=4, seq_len=16, seed=seed, batch_size=4)
        profile.run(root / "model", str(root / "data.txt"), settings).stats.save(root / name)
    result = CliRunner().invoke(
        app,
        [
            "score",
            str(root / "stats.npz"),
            "--criterion",
            "usage-frequency",
            "--ratio",
            "0.25",
            "--out",
            str(root / "mask.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    return root


# A run that takes longer blocks on something (a named pipe opened for reading waits for a writer forever).
HANG_S = 300


class Hung(BaseException):
    """Raised in a run past HANG_S: a BaseException, so neither the CLI nor CliRunner words it as an error."""


@contextmanager
def hang_guard():
    def hung(*_: object) -> None:
        raise Hung(f"the command ran past {HANG_S} s: it blocks on an input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run(argv: list[str]):
    with hang_guard():
        if argv[0] == hostile_serving.COMMAND:
            return hostile_serving.serve(argv[1:])
        return CliRunner().invoke(app, argv, catch_exceptions=True)


# The good inputs a command starts from (the plugin serves ragged checkpoints only).
GOOD = {hostile_serving.COMMAND: "good_ragged"}
PATCHES = {**PATCHES, hostile_serving.COMMAND: hostile_serving.stand_in_vllm}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_good_inputs_pass(request, tmp_path, monkeypatch, command):
    ws = fresh_workspace(request.getfixturevalue(GOOD.get(command, "good")), tmp_path / "ws")
    PATCHES.get(command, lambda patch: None)(monkeypatch)
    result = run(COMMANDS[command](ws))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    if command == hostile_serving.COMMAND:
        hostile_serving.check_good(ws, result)
    elif not command.startswith("eval"):
        assert ws.out.exists()


PAIRS = [(name, command) for name, case in sorted(CASES.items()) for command in case.commands]


@pytest.mark.parametrize(("case_name", "command"), PAIRS, ids=[f"{n}-{c}" for n, c in PAIRS])
def test_hostile_input_is_one_line_exit_1_and_nothing_lost(request, tmp_path, monkeypatch, case_name, command):
    case = CASES[case_name]
    ws = fresh_workspace(request.getfixturevalue(GOOD.get(command, "good")), tmp_path / "ws")
    PATCHES.get(command, lambda patch: None)(monkeypatch)
    case.build(ws)
    before = snapshot(ws.root)
    result = run([*COMMANDS[command](ws), *(arg.format(**ws.places()) for arg in case.extra)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    context = f"{case_name} / {command}: exit {result.exit_code}, stderr={result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{context}: traceback {result.exception!r}"
    )
    assert "Traceback" not in result.stderr, context
    assert result.exit_code == case.exit_code, context
    assert len(lines) == 1, context
    assert case.blame in lines[0], f"{context}: the line does not name {case.blame!r}"
    assert snapshot(ws.root) == before, f"{context}: files changed or appeared"
    assert not ws.marker.exists(), f"{context}: the checkpoint's own code ran"
