"""The sweep's work folder (`--out DIR`), which makes a sweep resumable:

    sweep.json      schema header and the fingerprint: model, statistics, evaluation data and settings
    results.jsonl   one finished combination per line, the whole file rewritten atomically after each
    table.json      the final report (the `--json` document), written when the sweep ends
    sweep.png       with --plot: perplexity against experts kept (`sweep.plot`), redrawn on each run
    checkpoints/    the one combination being evaluated (deleted after it, and at the end)

The folder is locked while a sweep uses it (`.DIR.lock` beside it, see `io.output.work_lock`).
A rerun with the same fingerprint skips the combinations in results.jsonl (and may add criteria or ratios);
another fingerprint is refused without --force, which starts over. Without --out the folder is temporary.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.artifacts.common import (
    check_header,
    decode_utf8,
    dump_json,
    first_difference,
    parse_json,
    read_capped,
    read_json,
)
from moe_prune.artifacts.provenance import data_fingerprint, fingerprint_json, model_fingerprint
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file, check_not_input, work_lock
from moe_prune.sweep.results import Row

RUN_SCHEMA = "moe-prune/sweep-run"
RUN_VERSION = 1
OWN_FILES = ("sweep.json", "results.jsonl", "table.json", "sweep.png")


@dataclass
class SweepFolder:
    path: Path
    temporary: bool = False
    created: bool = False  # this run made the folder (so a run that finished nothing removes it)
    _held: ExitStack | None = field(default=None, repr=False)  # the folder's lock while this run uses it

    @property
    def header(self) -> Path:
        return self.path / "sweep.json"

    @property
    def results(self) -> Path:
        return self.path / "results.jsonl"

    @property
    def table(self) -> Path:
        return self.path / "table.json"

    @property
    def scratch(self) -> Path:
        """Where each combination's checkpoint is built and evaluated, then deleted."""
        return self.path / "checkpoints"

    @classmethod
    def open(
        cls, out: Path | None, fingerprint: dict[str, Any], force: bool, inputs: tuple[str | Path, ...]
    ) -> SweepFolder:
        """The folder of this sweep: new, or the same sweep's to resume; refuses another sweep without force.

        The folder is held (`work_lock`) until `cleanup`: a second sweep into it is refused before it reads or
        writes anything there (two sweeps each rewriting results.jsonl would lose one run's rows). A run that
        fails here leaves nothing it made.
        """
        if out is None:
            return cls(Path(tempfile.mkdtemp(prefix="moe-prune-sweep-")), temporary=True)
        folder = cls(Path(out).expanduser().absolute())
        check_not_input(folder.path, inputs)
        if folder.path.exists() and not folder.path.is_dir():
            raise MoePruneError(f"{out}: exists and is not a folder")
        held = ExitStack()
        held.enter_context(work_lock(folder.path))
        try:
            folder._start(out, fingerprint_json(fingerprint), force)
        except BaseException:
            if folder.created:
                shutil.rmtree(folder.path, ignore_errors=True)
            held.close()
            raise
        folder._held = held
        return folder

    def _start(self, out: Path, fingerprint: dict[str, Any], force: bool) -> None:
        if self.header.exists() and not force:
            diff = first_difference(self._saved_fingerprint(), fingerprint)
            if diff:
                raise MoePruneError(
                    f"{out}: holds a sweep of another model, statistics, data or settings ({diff}); "
                    "pass --force to start over or choose another --out"
                )
            return
        if self.path.exists() and any(self.path.iterdir()) and not force:
            raise MoePruneError(f"{out}: already exists and holds no sweep; pass --force to use it")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MoePruneError(f"{out}: cannot write ({exc.strerror or exc})") from exc
        self.clear()
        self._write(self.header, {"schema": RUN_SCHEMA, "version": RUN_VERSION, "fingerprint": fingerprint})

    def _saved_fingerprint(self) -> Any:
        obj, name = read_json(self.header, "sweep header")
        check_header(obj, RUN_SCHEMA, RUN_VERSION, name)
        return obj.get("fingerprint")

    def clear(self) -> None:
        """Forget an earlier sweep in this folder (only the sweep's own files)."""
        for name in OWN_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def load(self) -> dict[str, Row]:
        """The combinations finished by earlier runs, by key."""
        if not self.results.exists():
            return {}
        rows = {}
        blob, name = read_capped(self.results, "sweep results")  # bounded: a link to /dev/zero or a pipe is refused
        for number, line in enumerate(decode_utf8(blob, name, "sweep results").splitlines(), 1):
            where = f"{self.results}:{number}"
            obj = parse_json(line, where, "result line")
            try:
                row = Row.from_dict(obj)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise MoePruneError(f"{where}: malformed result ({exc!r}); pass --force to start over") from exc
            rows[row.combo.key] = row
        return rows

    def save(self, rows: list[Row]) -> None:
        """Rewrite results.jsonl with every finished row: a kill leaves the previous version whole."""
        if not self.temporary:
            lines = "".join(json.dumps(r.to_dict()) + "\n" for r in rows)
            with atomic_file(self.results, force=True) as tmp:
                tmp.write_text(lines, encoding="utf-8")

    def write_table(self, obj: dict[str, Any]) -> None:
        if not self.temporary:
            self._write(self.table, obj)

    def _write(self, path: Path, obj: dict[str, Any]) -> None:
        with atomic_file(path, force=True) as tmp:
            tmp.write_text(dump_json(json.loads(json.dumps(obj, default=str))), encoding="utf-8")

    def abandon(self) -> None:
        """A run that fails before finishing any combination leaves nothing behind (nothing to resume)."""
        if self.results.exists():
            return
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.clear()

    def cleanup(self) -> None:
        """Remove the checkpoints being built (a temporary folder goes whole), then let go of the folder."""
        shutil.rmtree(self.path if self.temporary else self.scratch, ignore_errors=True)
        if self._held is not None:
            self._held.close()
            self._held = None


def fingerprint(ckpt: Checkpoint, stats: str | Path, data: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Model (config, tensor headers, weights' hash), statistics and data by content, and the settings.

    Files are named by their sha256, not their path: moving the statistics does not orphan a sweep.
    """

    def content(source: str) -> dict[str, Any]:
        found = data_fingerprint(source)
        return {"sha256": found["sha256"]} if found["sha256"] else {"source": source}

    return {"model": model_fingerprint(ckpt), "stats": content(str(stats)), "data": content(data), **settings}
