"""Outputs appear whole or not at all: build in a temporary place beside the target, then rename.

The one way every command writes an output, a folder (`atomic_folder`) or a file (`atomic_file`):
- an existing output is refused without --force, before any work and again AT the rename: the final
  step is a rename that cannot replace (renameat2 RENAME_NOREPLACE for folders, link() for files), so
  two runs to the same output never silently overwrite each other;
- temporaries are named `.<name>.tmp-<host>-<pid>-<random>`, so a later run can prove which leftovers
  of a killed run (kill -9 skips every cleanup) are its own and dead, and removes only those;
- files get the mode a plain open() would give (mkstemp's 0600 is not what users expect of a mask);
- every OS failure (read-only folder, full disk) becomes one line naming the path, and the
  temporary is removed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_prune.errors import MoePruneError

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def check_writable(out: Path, force: bool) -> None:
    """Refuse an existing output without --force, before any work is done."""
    out = Path(out)
    if out.is_symlink() and not force:
        raise MoePruneError(f"{out}: already exists (a symbolic link); pass --force to replace it")
    if out.exists() and not force:
        raise MoePruneError(f"{out}: already exists; pass --force to replace it")


def check_not_input(out: Path, inputs: tuple[str | Path, ...]) -> None:
    """Inputs are never modified: refuse an output that is an input, lies inside one, or holds one."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            continue  # a hub id or stdin, not a local file
        source = path.resolve()
        if target == source or target.is_relative_to(source) or source.is_relative_to(target):
            raise MoePruneError(f"{out}: is, holds or lies inside the input {given}; choose another output")


def _temp_prefix(out: Path) -> str:
    return f".{out.name}.tmp-"


def _temp_name(out: Path) -> str:
    return f"{_temp_prefix(out)}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove temporaries of `out` left by killed runs: this host's naming, a process id that no longer runs."""
    pattern = re.compile(rf"{re.escape(_temp_prefix(out))}{re.escape(_HOST)}-(\d+)-[0-9a-f]+")
    removed = []
    try:
        candidates = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in candidates:
        match = pattern.fullmatch(path.name)
        if not match or int(match[1]) == os.getpid() or _alive(int(match[1])):
            continue
        _remove(path)
        removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with FileExistsError if `dst` exists (atomic on Linux; checked rename elsewhere)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # not supported by this file system: fall through
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _os_error(path: Path, exc: OSError) -> MoePruneError:
    where = exc.filename or path
    return MoePruneError(f"{where}: cannot write ({exc.strerror or exc})")


def _prepare(out: Path, force: bool, protect: tuple[Path, ...]) -> Path:
    out = Path(out).expanduser().absolute()
    check_writable(out, force)
    check_not_input(out, protect)
    if not out.parent.is_dir():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(out.parent, exc) from None
    remove_stale_temporaries(out)
    return out


def _finish(tmp: Path, out: Path, force: bool) -> None:
    """Move `tmp` to `out`; with force, the old output is moved aside first and deleted after."""
    old = None
    if force and (out.exists() or out.is_symlink()):
        old = out.parent / f"{_temp_name(out)}.old"
        os.rename(out, old)
    try:
        _rename_noreplace(tmp, out)
    except FileExistsError:
        if old is not None:
            _remove(old)
        raise MoePruneError(f"{out}: appeared while this run was writing it; pass --force to replace it") from None
    if old is not None:
        _remove(old)


@contextmanager
def atomic_folder(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block succeeds."""
    out = _prepare(out, force, protect)
    tmp = out.parent / _temp_name(out)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _os_error(out.parent, exc) from None
    try:
        yield tmp
        _finish(tmp, out, force)
    except OSError as exc:
        raise _os_error(out, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `out`; what the block writes there becomes `out` if it succeeds."""
    out = _prepare(out, force, protect)
    tmp = out.parent / _temp_name(out)
    try:
        tmp.touch(mode=0o666)  # the umask applies, as with a plain open()
        yield tmp
        if force:
            os.replace(tmp, out)
        else:
            _link_noreplace(tmp, out)
    except OSError as exc:
        raise _os_error(out, exc) from None
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _link_noreplace(tmp: Path, out: Path) -> None:
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise MoePruneError(f"{out}: appeared while this run was writing it; pass --force to replace it") from None
    except OSError:  # no hard links on this file system: checked rename
        if out.exists():
            raise MoePruneError(f"{out}: appeared while this run was writing it; pass --force to replace it") from None
        os.rename(tmp, out)
