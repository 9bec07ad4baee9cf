"""Resumable state of an unfinished run, kept in a work folder beside the output: `.<out name>.resume/`.

  run.json       schema header, the run's fingerprint (model, data, settings, process count) and the
                 last completed step whose state is saved
  state-<step>/  `accelerate` save_state: model, optimizer, every process's RNG states

The output folder itself appears only when the run finishes (atomically), so the work folder lives
beside it, not inside. The run holds the output's lock (`io.output.work_lock`) while it uses
the work folder: two runs to one output never share it. It is removed after a successful finish; an
interrupted run leaves it for `--resume`. The data position needs no saving: batches follow from the seed and the step.
"""

from __future__ import annotations

import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_prune.artifacts.common import (
    check_header,
    describe,
    dump_json,
    first_difference,
    read_json,
    require_int,
    require_type,
)
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file

RUN_SCHEMA = "moe-prune/finetune-run"
RUN_VERSION = 1
STATE_SUFFIXES = (".safetensors", ".bin", ".pkl", ".pt")


def work_folder(out: Path) -> Path:
    """Where the resumable state of a run writing `out` lives."""
    return out.parent / f".{out.name}.resume"


@dataclass
class WorkFolder:
    """The work folder of one output; only the main process writes to it."""

    path: Path

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    def state_dir(self, step: int) -> Path:
        return self.path / f"state-{step:08d}"

    def exists(self) -> bool:
        """Whether an interrupted run is saved here; anything else by that name (a link, a file) is refused:
        --force would not remove it, and state written through a link would land outside."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise MoePruneError(f"{self.path}: cannot be read ({exc.strerror or exc})") from exc
        if not stat.S_ISDIR(mode):
            raise MoePruneError(f"{self.path}: is not a folder (finetune keeps resumable state there); remove it")
        return True

    def read(self) -> tuple[dict[str, Any], int]:
        """(fingerprint, last saved step) of the interrupted run."""
        if not self.run_file.exists():
            raise MoePruneError(f"{self.path}: holds no saved state (run.json missing); start again with --force")
        obj, name = read_json(self.run_file, "finetune run state")
        check_header(obj, RUN_SCHEMA, RUN_VERSION, name)
        fingerprint = require_type(obj.get("fingerprint"), dict, name, "fingerprint")
        step = require_int(obj.get("step"), name, "step", minimum=1)
        if not self.state_dir(step).is_dir():
            raise MoePruneError(f"{self.path}: saved state of step {step} is missing; start again with --force")
        return fingerprint, step

    def check_resumable(self, fingerprint: dict[str, Any]) -> int:
        """The step to continue from, or a one-line error when the saved run is another run or damaged."""
        if not self.exists():
            raise MoePruneError(f"{self.path}: no interrupted run to resume (nothing was saved; see --save-every)")
        saved, step = self.read()
        diff = first_difference(saved, fingerprint)
        if diff is not None:
            raise MoePruneError(
                f"{self.path}: was saved by another run ({diff}); rerun it with the same settings, "
                "or start over with --force"
            )
        self.check_state(step)
        return step

    def check_state(self, step: int) -> None:
        """Open every file `accelerate` will load from the saved state, so a damaged one fails here, in one line."""
        folder = self.state_dir(step)
        required = (("model*.safetensors", "pytorch_model*.bin"), ("optimizer*.bin",), ("random_states_*.pkl",))
        for patterns in required:
            if not any(any(folder.glob(pattern)) for pattern in patterns):
                raise MoePruneError(f"{folder}: saved state lacks {patterns[0]}; start again with --force")
        for path in sorted(folder.iterdir()):
            if path.suffix in STATE_SUFFIXES:
                _check_state_file(path)

    def commit(self, step: int, fingerprint: dict[str, Any]) -> None:
        """Point run.json at the state of `step` (already written), then drop older states."""
        obj = {"schema": RUN_SCHEMA, "version": RUN_VERSION, "step": step, "fingerprint": fingerprint}
        with atomic_file(self.run_file, force=True) as tmp:
            tmp.write_text(dump_json(obj))
        for old in self.path.glob("state-*"):
            if old != self.state_dir(step):
                shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _check_state_file(path: Path) -> None:
    """Read a saved-state file the way `accelerate` will (safetensors header, or its restricted torch.load)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        else:
            from accelerate.utils import load

            load(str(path), map_location="cpu", mmap=True)
    except Exception as exc:  # torch.load and safetensors raise many types for a damaged file
        raise MoePruneError(f"{path}: damaged saved state ({describe(exc)}); start again with --force") from exc
