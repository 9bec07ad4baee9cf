"""Generator of hostile and corrupt inputs: every case is built from good inputs and run through every
command that reads that kind of input.

A case is a function decorated with `@hostile(...)` that damages a fresh copy of the good inputs in a
`Workspace` (a tiny Mixtral checkpoint with tokenizer, its statistics, a mask, calibration text). The
runner (`tests/test_hostile.py`) then runs each named command in-process and asserts what a user is
promised for bad input: exit code 1, exactly one line on stderr and it names the file at fault, no
traceback, nothing new on disk (no output, no temporary folder, no partial file) and every input
byte-identical afterwards. Case modules (`tests/hostile_*.py`) register themselves on import.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest


@dataclass
class Workspace:
    """Copies of good inputs in one folder; outputs go to names that must never appear."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def stats(self) -> Path:
        return self.root / "stats.npz"

    @property
    def stats2(self) -> Path:
        return self.root / "stats2.npz"

    @property
    def mask(self) -> Path:
        return self.root / "mask.json"

    @property
    def data(self) -> Path:
        return self.root / "data.txt"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def marker(self) -> Path:
        """Written by the code cases' Python files if they ever run; outside the workspace."""
        return self.root.parent / f"{self.root.name}.ran"

    def places(self) -> dict[str, str]:
        """Placeholders a case's `extra` argv may use."""
        names = ("root", "model", "stats", "stats2", "mask", "data", "out")
        return {name: str(getattr(self, name)) for name in names}

    # Helpers for damaging inputs ----------------------------------------------------------------

    def config(self) -> dict:
        return json.loads((self.model / "config.json").read_text())

    def write_config(self, config: dict) -> None:
        (self.model / "config.json").write_text(json.dumps(config, indent=2))

    def shard(self) -> Path:
        shards = sorted(self.model.glob("*.safetensors"))
        assert len(shards) == 1, shards
        return shards[0]

    def header(self, shard: Path | None = None) -> tuple[dict, bytes]:
        """(header dict, data buffer) of a shard."""
        raw = (shard or self.shard()).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8 : 8 + n]), raw[8 + n :]

    def write_header(self, header: dict, data: bytes, shard: Path | None = None) -> None:
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        (shard or self.shard()).write_bytes(len(blob).to_bytes(8, "little") + blob + data)

    def stats_arrays(self, path: Path | None = None) -> dict[str, np.ndarray]:
        with np.load(path or self.stats, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def write_stats(self, arrays: dict[str, np.ndarray], path: Path | None = None) -> None:
        with open(path or self.stats, "wb") as handle:
            np.savez(handle, **arrays)

    def mask_json(self) -> dict:
        return json.loads(self.mask.read_text())

    def write_mask(self, obj: dict | str) -> None:
        self.mask.write_text(obj if isinstance(obj, str) else json.dumps(obj))


# Commands ----------------------------------------------------------------------------------------
# name -> argv builder. Every command writes (if at all) to ws.out, so "nothing new" is checkable.
COMMANDS: dict[str, Callable[[Workspace], list[str]]] = {
    "prune": lambda ws: ["prune", str(ws.model), "--mask", str(ws.mask), "--out", str(ws.out)],
    "merge": lambda ws: ["merge", str(ws.model), "--stats", str(ws.stats), "--keep", "4", "--out", str(ws.out)],
    "score": lambda ws: [
        "score",
        str(ws.stats),
        "--criterion",
        "usage-frequency",
        "--ratio",
        "0.25",
        "--out",
        str(ws.out),
    ],
    "allocate": lambda ws: [
        "allocate",
        str(ws.model),
        "--stats",
        str(ws.stats),
        "--criterion",
        "usage-frequency",
        "--ratio",
        "0.25",
        "--data",
        str(ws.data),
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--budget-evals",
        "3",
        "--out",
        str(ws.out),
    ],
    "score-weights": lambda ws: [
        "score",
        str(ws.stats),
        "--model",
        str(ws.model),
        "--criterion",
        "weight-norm",
        "--ratio",
        "0.25",
        "--out",
        str(ws.out),
    ],
    "profile": lambda ws: [
        "profile",
        str(ws.model),
        "--data",
        str(ws.data),
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--out",
        str(ws.out),
    ],
    "sequential": lambda ws: [
        "profile",
        str(ws.model),
        "--data",
        str(ws.data),
        "--samples",
        "2",
        "--seq-len",
        "16",
        "--sequential",
        "--out",
        str(ws.out),
    ],
    "combine": lambda ws: ["profile", "--combine", str(ws.stats), str(ws.stats2), "--out", str(ws.out)],
    "eval": lambda ws: ["eval", str(ws.model), "--data", str(ws.data), "--seq-len", "16", "--max-tokens", "64"],
    "eval-vllm": lambda ws: [
        "eval",
        str(ws.model),
        "--engine",
        "vllm",
        "--data",
        str(ws.data),
        "--seq-len",
        "16",
        "--max-tokens",
        "64",
    ],
    "finetune": lambda ws: [
        "finetune",
        str(ws.model),
        "--data",
        str(ws.data),
        "--tokens",
        "128",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--eval-data",
        str(ws.data),
        "--eval-tokens",
        "32",
        "--out",
        str(ws.out),
    ],
    "sweep": lambda ws: [
        "sweep",
        str(ws.model),
        "--stats",
        str(ws.stats),
        "--criteria",
        "usage-frequency",
        "--ratios",
        "0.25",
        "--random-seeds",
        "1",
        "--data",
        str(ws.data),
        "--seq-len",
        "16",
        "--max-tokens",
        "64",
        "--out",
        str(ws.out),
    ],
    "lottery": lambda ws: [
        "lottery",
        str(ws.model),
        "--criterion",
        "usage-frequency",
        "--target-ratio",
        "0.25",
        "--rounds",
        "1",
        "--no-finetune",
        "--data",
        str(ws.data),
        "--profile-samples",
        "2",
        "--profile-seq-len",
        "16",
        "--seq-len",
        "16",
        "--eval-data",
        str(ws.data),
        "--eval-tokens",
        "32",
        "--out",
        str(ws.out),
    ],
    # Not a CLI command: the vLLM plugin's loader on a ragged checkpoint (tests/hostile_serving.py runs it).
    "serve-plugin": lambda ws: ["serve-plugin", str(ws.model)],
}
# Commands that take no options (a case that only adds arguments does not apply) and write nothing.
WITHOUT_OPTIONS = ("serve-plugin",)


def _vllm_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """`eval --engine vllm` without vLLM: the engine check passes and vLLM's `LLM` is played by transformers'
    model of the folder (its log-probs too), so every case reaches what moe-prune checks before it hands the
    folder to vLLM, and a non-finite model still fails where vLLM's NaN log-probs would."""
    from moe_prune.runtime import vllm_engine
    from moe_prune.runtime.loading import load_model
    from moe_prune.stages import evaluate

    @contextmanager
    def served(folder: Path, dtype: str, max_len: int, trust_remote_code: bool, *args: object, **kwargs: object):
        yield load_model(folder, dtype, "cpu", trust_remote_code), folder

    def nll_sum(llm: tuple, chunks, batch_size: int, on_batch) -> tuple[float, int]:
        model, folder = llm
        return evaluate.nll_sum(model, chunks, batch_size, on_batch, folder)

    monkeypatch.setattr(vllm_engine, "check_engine", lambda engine, device="cpu": None)
    monkeypatch.setattr(evaluate, "check_engine", lambda engine, device="cpu": None)
    monkeypatch.setattr(vllm_engine, "served", served)
    monkeypatch.setattr(vllm_engine, "nll_sum", nll_sum)


# What a command needs in place to run here (applied by the runner before it runs the command).
PATCHES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {"eval-vllm": _vllm_stand_in}

# Commands grouped by the kind of input they read.
MODEL_READERS = (
    "prune",
    "merge",
    "score-weights",
    "profile",
    "sequential",
    "eval",
    "eval-vllm",
    "finetune",
    "sweep",
    "lottery",
    "allocate",
    "serve-plugin",
)
# Run the model's forward pass.
LOADERS = ("profile", "sequential", "eval", "eval-vllm", "finetune", "sweep", "lottery", "allocate")
STATS_READERS = ("score", "merge", "combine", "sweep", "allocate")
MASK_READERS = ("prune",)
DATA_READERS = ("profile", "eval", "finetune", "sweep", "lottery", "allocate")


@dataclass(frozen=True)
class Case:
    """One hostile input: how to build it, which commands read it, what the error line must name."""

    name: str
    build: Callable[[Workspace], None]
    commands: tuple[str, ...]
    blame: str  # a substring of the path at fault, e.g. "config.json" or "model.safetensors"
    extra: tuple[str, ...] = ()  # extra argv appended to every command; {model}, {stats}, {data}... name inputs
    exit_code: int = 1
    tags: frozenset[str] = field(default_factory=frozenset)


CASES: dict[str, Case] = {}


def hostile(
    name: str, commands: tuple[str, ...] | list[str], blame: str, extra: tuple[str, ...] = (), exit_code: int = 1
) -> Callable[[Callable[[Workspace], None]], Callable[[Workspace], None]]:
    """Register a case builder under `name`."""

    def register(build: Callable[[Workspace], None]) -> Callable[[Workspace], None]:
        if name in CASES:
            raise ValueError(f"hostile case {name!r} registered twice")
        for command in commands:
            if command not in COMMANDS:
                raise ValueError(f"{name}: unknown command {command!r}")
        applies = tuple(c for c in commands if not (extra and c in WITHOUT_OPTIONS))
        CASES[name] = Case(name, build, applies, blame, tuple(extra), exit_code)
        return build

    return register


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (symlinks not followed) -> content hash, link target or 'dir'."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = f"link:{path.readlink()}"
        elif path.is_dir():
            found[rel] = "dir"
        elif not path.is_file():
            found[rel] = "special"  # a pipe or socket: reading it would block
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def fresh_workspace(good: Path, root: Path) -> Workspace:
    """A copy of the good inputs (symlinks copied as links)."""
    shutil.copytree(good, root, symlinks=True)
    return Workspace(root)


# Outputs that would modify an input (with --force): the same class for every writing command. ------


def _nothing(ws: Workspace) -> None:
    """The inputs stay good; the damage is in the arguments."""


WRITERS = ("prune", "merge", "score", "profile", "combine", "finetune", "allocate")
for _name, _target, _commands in (
    ("out-is-the-model", "{model}", ("prune", "merge", "finetune", "profile")),
    ("out-inside-the-model", "{model}/sub", ("prune", "merge", "finetune", "profile")),
    ("out-holds-the-inputs", "{root}", ("prune", "merge", "finetune", "score", "profile", "combine", "allocate")),
    ("out-is-the-statistics", "{stats}", ("score", "combine", "merge", "allocate")),
    ("out-is-the-data", "{data}", ("profile", "finetune", "allocate")),
    ("out-is-the-mask", "{mask}", ("prune",)),
):
    hostile(_name, _commands, "input", extra=("--out", _target, "--force"))(_nothing)
for _name, _option, _value, _commands in (
    ("max-shard-size-not-a-size", "--max-shard-size", "5XB", ("prune", "merge", "finetune")),
    ("max-shard-size-zero", "--max-shard-size", "0", ("prune", "merge", "finetune")),
    ("buffer-memory-negative", "--buffer-memory", "-1GB", ("sequential",)),
):
    hostile(_name, _commands, _option, extra=(_option, _value))(_nothing)
# Usage errors (click's own parsing) are one line and exit 1 like every other failure.
hostile("unknown-option", tuple(COMMANDS), "--no-such-option", extra=("--no-such-option",))(_nothing)
hostile("option-not-a-number", ("profile", "sequential", "eval", "finetune"), "--seq-len", extra=("--seq-len", "x"))(
    _nothing
)
