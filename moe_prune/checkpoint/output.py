"""Outputs appear whole or not at all: build in a temporary folder beside the target, then rename."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_prune.errors import MoePruneError


def check_writable(out: Path, force: bool) -> None:
    """Refuse an existing output without --force, before any work is done."""
    if out.exists() and not force:
        raise MoePruneError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise MoePruneError(f"{out}: exists and is not a folder")


@contextmanager
def atomic_folder(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` only if the block succeeds."""
    out = out.expanduser().absolute()
    check_writable(out, force)
    for path in protect:
        if out.resolve() == path.resolve():
            raise MoePruneError(f"{out}: is the input checkpoint; choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
