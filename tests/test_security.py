"""A checkpoint's own Python runs only with --trust-remote-code; no file outside the checkpoint is read.

Every place a checkpoint can carry code gets a marker-writing Python file; every command that reads a
model runs on it with and without the flag, and the marker appears exactly when the flag was given
(commands without the flag never run it). Then the file-system side: shards and side files that
resolve outside the folder, and two writers racing for one output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hostile import COMMANDS, Workspace, fresh_workspace, snapshot
from hostile_code import add_auto_map, evil_code, make_ragged
from test_hostile import good  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file, atomic_folder, remove_stale_temporaries


def edited_model_file(ws: Workspace) -> None:
    make_ragged(ws)
    path = ws.model / "modeling_moe_prune.py"
    path.write_text(path.read_text() + evil_code(ws))


def ragged_auto_config(ws: Workspace) -> None:
    make_ragged(ws)
    add_auto_map(ws, "AutoConfig", "evil", "EvilConfig")


def stock_auto_config(ws: Workspace) -> None:
    add_auto_map(ws, "AutoConfig", "evil", "EvilConfig")


def stock_auto_model(ws: Workspace) -> None:
    (ws.model / "evil.py").write_text(
        evil_code(ws) + "from transformers import MixtralForCausalLM\nclass Evil(MixtralForCausalLM): pass\n"
    )
    config = ws.config()
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    ws.write_config(config)


def tokenizer_auto_map(ws: Workspace) -> None:
    (ws.model / "evil_tok.py").write_text(
        evil_code(ws)
        + "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast): pass\n"
    )
    path = ws.model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    path.write_text(json.dumps(config))


PLACES = {
    "edited-modeling-file": edited_model_file,
    "ragged-auto-map-config": ragged_auto_config,
    "stock-auto-map-config": stock_auto_config,
    "stock-auto-map-model": stock_auto_model,
    "tokenizer-auto-map": tokenizer_auto_map,
}
TRUSTING = ("profile", "sequential", "eval", "finetune")  # commands with --trust-remote-code
NEVER_LOADING = ("prune", "merge", "score-weights")  # read headers only: no flag, never any code


def _run(argv: list[str]):
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]  # a module imported by an earlier test must be imported (and run) again
    return CliRunner().invoke(app, argv, catch_exceptions=True)


@pytest.mark.parametrize("place", sorted(PLACES))
@pytest.mark.parametrize("command", [*TRUSTING, *NEVER_LOADING])
def test_checkpoint_code_runs_only_with_consent(good, tmp_path, place, command):  # noqa: F811
    ws = fresh_workspace(good, tmp_path / "ws")
    PLACES[place](ws)
    result = _run(COMMANDS[command](ws))
    assert not ws.marker.exists(), f"{place}/{command}: the checkpoint's code ran without --trust-remote-code"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    if place.startswith(("edited", "ragged")) and command in TRUSTING:
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    elif command in TRUSTING:  # transformers' own code runs; the ignored auto_map is said once
        assert result.exit_code == 0, result.stderr
        assert "auto_map" in result.stderr and "ignored" in result.stderr
    if command in TRUSTING:
        if ws.out.is_dir():
            shutil.rmtree(ws.out)
        ws.out.unlink(missing_ok=True)
        _run([*COMMANDS[command](ws), "--trust-remote-code"])
        assert ws.marker.exists(), f"{place}/{command}: --trust-remote-code did not run the checkpoint's code"


def test_unmodified_ragged_checkpoint_loads_without_the_flag(good, tmp_path):  # noqa: F811
    ws = fresh_workspace(good, tmp_path / "ws")
    make_ragged(ws)
    result = _run(COMMANDS["eval"](ws))
    assert result.exit_code == 0, result.stderr
    assert not [m for m in sys.modules if m.startswith("transformers_modules")], "the folder's file was imported"


def test_the_shipped_class_is_byte_identical_to_the_written_file(tmp_path):
    """What moe-prune runs for a ragged folder is the very file such folders carry."""
    from importlib import resources

    from moe_prune.checkpoint import modeling_moe_prune, ragged

    packaged = resources.files("moe_prune.checkpoint").joinpath(ragged.MODEL_FILE).read_bytes()
    assert Path(modeling_moe_prune.__file__).read_bytes() == packaged == ragged.model_code().encode()


# -- files outside the checkpoint ------------------------------------------------------------------


def _index_to(ws: Workspace, target: str) -> None:
    """Shard moved to `target` (relative to the model folder) and an index naming it there."""
    shard = ws.shard()
    header, _ = ws.header()
    names = [k for k in header if k != "__metadata__"]
    dest = (ws.model / target).resolve() if not Path(target).is_absolute() else Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shard.rename(dest)
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, target)}
    (ws.model / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
@pytest.mark.parametrize("command", ["prune", "merge", "score-weights", "profile", "sequential", "eval", "finetune"])
def test_shards_outside_the_folder_are_never_read(good, tmp_path, where, command):  # noqa: F811
    ws = fresh_workspace(good, tmp_path / "ws")
    outside = tmp_path / "elsewhere" / "x.safetensors"
    if where == "relative":
        _index_to(ws, "../../elsewhere/x.safetensors")
    elif where == "absolute":
        _index_to(ws, str(outside))
    else:
        outside.parent.mkdir()
        ws.shard().rename(outside)
        (ws.model / "model.safetensors").symlink_to(outside)
    before = snapshot(ws.root)
    result = _run(COMMANDS[command](ws))
    assert result.exit_code == 1, result.stderr
    assert "outside the checkpoint" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(ws.root) == before


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_side_file_linking_outside_is_refused(good, tmp_path, command):  # noqa: F811
    """Even a name no loader reads today: any entry of the tree may be read (see tests/test_containment.py)."""
    ws = fresh_workspace(good, tmp_path / "ws")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the checkpoint's")
    (ws.model / "notes.txt").symlink_to(secret)
    result = _run(COMMANDS[command](ws))
    assert result.exit_code == 1, result.stderr
    assert "notes.txt" in result.stderr and "outside the checkpoint" in result.stderr
    assert not ws.out.exists()


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_read_files_linking_outside_are_refused(good, tmp_path, name):  # noqa: F811
    ws = fresh_workspace(good, tmp_path / "ws")
    moved = tmp_path / name
    (ws.model / name).rename(moved)
    (ws.model / name).symlink_to(moved)
    result = _run(COMMANDS["eval"](ws))
    assert result.exit_code == 1 and name in result.stderr and "outside the checkpoint" in result.stderr


# -- outputs ---------------------------------------------------------------------------------------


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(MoePruneError, match="appeared while this run"), atomic_folder(out, force=False) as tmp:
        (tmp / "mine").write_text("second writer")
        out.mkdir()  # the other writer finishes first
        (out / "theirs").write_text("first writer")
    assert (out / "theirs").read_text() == "first writer" and not (out / "mine").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"], "temporary folder left behind"


def test_a_file_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "o.npz"
    with pytest.raises(MoePruneError, match="appeared while this run"), atomic_file(out, force=False) as tmp:
        tmp.write_text("second writer")
        out.write_text("first writer")  # the other writer finishes first
    assert out.read_text() == "first writer"
    assert [p.name for p in tmp_path.iterdir()] == ["o.npz"], "temporary file left behind"


def test_two_concurrent_prunes_to_one_output_leave_one_winner(good, tmp_path):  # noqa: F811
    ws = fresh_workspace(good, tmp_path / "ws")
    argv = [sys.executable, "-m", "moe_prune"]
    procs = [
        subprocess.Popen([*argv, *COMMANDS["prune"](ws)], stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        for _ in range(2)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    errors = [p.stderr.read() for p in procs]
    assert codes == [0, 1], errors
    assert any("already exists" in e or "appeared while" in e for e in errors)
    assert [p.name for p in ws.root.iterdir() if p.name.startswith(".out")] == []


def test_stale_temporaries_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "o"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from moe_prune.io.output import _HOST

    stale = tmp_path / f".o.tmp-{_HOST}-{dead.pid}-deadbeef"
    live = tmp_path / f".o.tmp-{_HOST}-{os.getppid()}-cafe0000"
    foreign = tmp_path / ".o.tmp-otherhost-1-0000"
    for path in (stale, live, foreign):
        path.mkdir()
    assert remove_stale_temporaries(out) == [stale]
    assert live.exists() and foreign.exists() and not stale.exists()


def test_a_ragged_checkpoint_of_an_earlier_release_loads_with_moe_prunes_own_code(good, tmp_path):  # noqa: F811
    """0.1.0 wrote an older modeling_moe_prune.py: byte-exact copies still load (moe-prune runs its own copy)."""
    ws = fresh_workspace(good, tmp_path / "ws")
    make_ragged(ws)
    # The file 0.1.0 shipped (git show 8618eae:moe_prune/checkpoint/modeling_moe_prune.py), kept as data.
    earlier = (Path(__file__).parent / "data" / "modeling_moe_prune_0.1.0.py.txt").read_bytes()
    (ws.model / "modeling_moe_prune.py").write_bytes(earlier)
    assert _run(COMMANDS["eval"](ws)).exit_code == 0
    (ws.model / "modeling_moe_prune.py").write_bytes(earlier + b"\n")
    assert _run(COMMANDS["eval"](ws)).exit_code == 1
