"""Two runs on one output, as real processes: the second is refused in one line and writes nothing.

finetune (its `.OUT.resume` folder), sweep (results.jsonl, rewritten by each run) and lottery (its rounds)
hold their output with a lock file `.OUT.lock` beside it, profile --save-every its `OUT.partial.npz`
(`io.output.work_lock`). The first run is paused inside the lock (a wrapper holds the stage's
first step until the test releases it), so the second run meets it every time, not by luck; the first
then finishes whole and leaves no lock, resume folder or temporary behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile import COMMANDS, fresh_workspace, snapshot
from test_hostile import good  # noqa: F401  (session fixture)

from moe_prune.errors import MoePruneError
from moe_prune.io.output import _take_over, lock_path, work_lock
from moe_prune.runtime.resume import partial_path

# Runs the CLI with one function replaced by a wrapper that waits, inside the lock, for a release file.
HOLD = """
import importlib, sys, time
from pathlib import Path

module, name, release = sys.argv[1], sys.argv[2], Path(sys.argv[3])
*parents, attr = name.split(".")
owner = importlib.import_module(module)
for part in parents:
    owner = getattr(owner, part)
original = getattr(owner, attr)

def held(*args, **kwargs):
    Path(str(release) + ".held").write_text("")
    deadline = time.monotonic() + 180
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return original(*args, **kwargs)

setattr(owner, attr, held)
sys.argv = ["moe-prune", *sys.argv[4:]]
from moe_prune.cli import main
main()
"""
# command -> (module, function called first inside the lock, extra argv)
HELD = {
    "finetune": ("moe_prune.stages.finetune", "_train", ("--save-every", "1")),
    "sweep": ("moe_prune.sweep.folder", "SweepFolder._start", ()),
    "lottery": ("moe_prune.stages.lottery", "_prepare", ()),
    "profile": ("moe_prune.stages.profile", "_profile", ("--save-every", "1")),
}
# command -> the path it holds when not its output: profile holds the partial file its --save-every writes
HELD_PATH = {"profile": partial_path}
ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "the first run never reached its lock"
        time.sleep(0.05)


def _leftovers(ws_root: Path) -> list[str]:
    return sorted(p.name for p in ws_root.iterdir() if p.name.startswith(".out"))


@pytest.mark.parametrize("command", sorted(HELD))
def test_a_second_run_on_a_held_output_is_one_line_and_writes_nothing(good, tmp_path, command):  # noqa: F811
    ws = fresh_workspace(good, tmp_path / "ws")
    module, name, extra = HELD[command]
    argv = [*COMMANDS[command](ws), *extra]
    release = tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, module, name, str(release), *argv],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    locked = HELD_PATH.get(command, Path)(ws.out)
    try:
        _wait_for(Path(f"{release}.held"), first)
        assert lock_path(locked).exists()
        before = snapshot(ws.root)
        second = subprocess.run(
            [sys.executable, "-m", "moe_prune", *argv], env=ENV, capture_output=True, text=True, timeout=300
        )
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert f"{locked} is in use by pid {first.pid} on {socket.gethostname()}" in lines[0], lines[0]
        assert snapshot(ws.root) == before, "the refused run wrote something"
    finally:
        release.write_text("")
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert ws.out.is_file() if command == "profile" else ws.out.is_dir()
    assert _leftovers(ws.root) == [], "a lock, resume folder or temporary was left behind"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    """kill -9 skips every cleanup and leaves the lock: a later run on this host sees the pid is gone."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom moe_prune.io.output import work_lock\n"
            f"with work_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(300)\n",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(MoePruneError, match=f"is in use by pid {holder.pid}"), work_lock(out):
        pass
    holder.kill()
    holder.wait()
    assert lock_path(out).exists()  # left behind by the killed run
    with work_lock(out):
        assert lock_path(out).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 build-host-elsewhere\n", "is in use by pid 1 on build-host-elsewhere"),  # another host: never judged
        ("{live} {host}\n", "is in use by pid {live} on {host}"),
        ("not a lock\n", "unreadable; delete it if no run uses"),
        ("9" * 100_000, "unreadable; delete it if no run uses"),  # read bounded, not parsed whole
    ],
)
def test_a_held_or_foreign_lock_is_refused_in_one_line(tmp_path, content, message):
    out = tmp_path / "out"
    fill = {"live": os.getpid(), "host": socket.gethostname()}
    lock_path(out).write_text(content.format(**fill))
    with pytest.raises(MoePruneError, match=message.format(**fill)), work_lock(out):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # nothing of ours, theirs kept


def test_a_lock_that_is_a_link_or_a_pipe_is_refused(tmp_path):
    out = tmp_path / "out"
    target = tmp_path / "elsewhere"
    target.write_text(f"{_dead_pid()} {socket.gethostname()}\n")  # a dead owner, but only through a link
    lock_path(out).symlink_to(target)
    with pytest.raises(MoePruneError, match="unreadable"), work_lock(out):
        pass
    lock_path(out).unlink()
    os.mkfifo(lock_path(out))
    with pytest.raises(MoePruneError, match="unreadable"), work_lock(out):
        pass  # a pipe is not opened for a blocking read


def test_taking_over_gives_back_a_live_runs_fresh_lock(tmp_path):
    """Two runs see the same dead lock; the faster replaces it; the slower must not remove the new one."""
    lock = lock_path(tmp_path / "out")
    lock.write_text(f"{os.getpid()} {socket.gethostname()}\n")  # the faster run's lock, made just now
    _take_over(lock, (_dead_pid(), socket.gethostname()))  # the slower run still believes the owner is dead
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]


def test_the_lock_goes_with_the_run_and_parents_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), work_lock(out):
        assert lock_path(out).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
        raise RuntimeError("the run fails")
    assert list(tmp_path.iterdir()) == []
    with work_lock(out):
        out.mkdir()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_every_process_of_a_refused_multi_process_finetune_stops_with_the_line(tmp_path, free_port):
    """Under accelerate only the main process locks; the others wait for its decision and stop with it,
    rather than load the model and train alone into collectives (or be killed by the launcher)."""
    out = tmp_path / "ft"
    lock_path(out).write_text(f"{os.getpid()} {socket.gethostname()}\n")  # held by this (live) test process
    before = snapshot(tmp_path)
    env = {**ENV, "PYTHONPATH": str(Path(__file__).parents[1]), "ACCELERATE_USE_CPU": "1"}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port), "-m", "moe_prune", "finetune", "--out", str(out)]
    command += ["--tokens", "1024", "--seq-len", "64", "--batch-size", "2", "--eval-tokens", "0", "--save-every", "1"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    refused = [line for line in done.stderr.splitlines() if f"{out} is in use by pid {os.getpid()}" in line]
    assert done.returncode != 0 and len(refused) == 2, done.stderr[-3000:]  # one line from each process
    assert "a bug in moe-prune" not in done.stderr, done.stderr[-3000:]
    assert snapshot(tmp_path) == before
