"""profile --save-every: the run's partial file is deleted while its lock is still held.

A run that deleted its partial file after releasing the lock could delete the partial file of a second run
that started in between (same --out, so the same partial path) and lose its progress. These tests put
such a second run, deterministically, at the two moments the first one touches its output after the work
(writing the .npz, deleting the partial): it must be refused there, and its partial file must survive.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
from test_profile import SEQ, write_docs
from typer.testing import CliRunner

from moe_prune.artifacts.stats import Stats
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.io.output import work_lock
from moe_prune.runtime.resume import partial_path
from moe_prune.stages import profile as stage


@pytest.mark.parametrize("moment", ["save", "discard"])
def test_a_run_starting_after_the_work_keeps_its_partial_file(tiny, tmp_path, monkeypatch, moment):
    folder = tiny("mixtral")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 3, seed=21)
    out = tmp_path / "s.npz"
    partial = partial_path(out)
    racer = ExitStack()
    outcome: list[str] = []

    def second_run_starts() -> None:
        """What a second `profile --out s.npz --save-every 1` does first: take the partial, then write it."""
        try:
            racer.enter_context(work_lock(partial))
        except MoePruneError as exc:
            outcome.append(f"refused: {exc}")
            return
        partial.write_bytes(b"the second run's progress")
        outcome.append("started")

    def wrap(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def hooked(*args, **kwargs):
            second_run_starts()
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, hooked)

    wrap(*((Stats, "save") if moment == "save" else (stage, "discard_partial")))
    argv = ["profile", str(folder), "--data", str(data), "--out", str(out), "--seq-len", str(SEQ)]
    with racer:
        result = CliRunner().invoke(app, [*argv, "--samples", "3", "--batch-size", "1", "--save-every", "1"])
        assert result.exit_code == 0, result.output
        assert out.is_file()
        assert len(outcome) == 1
        if outcome[0] == "started":  # the first run had let go of the partial: it must not delete the new one
            assert partial.exists(), "the second run's partial file was deleted"
            assert partial.read_bytes() == b"the second run's progress"
        assert outcome[0].startswith("refused") and "is in use by pid" in outcome[0], outcome
    assert not partial.exists()
