"""Outputs appear whole or not at all: build in a temporary place beside the target, then rename.

The one way every command writes an output, a folder (`atomic_folder`) or a file (`atomic_file`):
- an existing output is refused without --force, before any work and again AT the rename: the final
  step is a rename that cannot replace (renameat2 RENAME_NOREPLACE for folders, link() for files), so
  two runs to the same output never silently overwrite each other;
- temporaries are named `.<name>.tmp-<host>-<pid>-<random>`, so a later run can prove which leftovers
  of a killed run (kill -9 skips every cleanup) are its own and dead, and removes only those;
- files get the mode a plain open() would give (mkstemp's 0600 is not what users expect of a mask);
- every OS failure (read-only folder, full disk) becomes one line naming the path, and the
  temporary is removed;
- only a regular file (for a file output) or a folder (for a folder output) is ever replaced, even with
  --force: a device node, a pipe or a socket given as an output is refused (as root, /dev/null would go).

Work folders that several steps write over time (a sweep, a lottery run, finetune's resume folder) are
guarded by `work_lock`: a lock file `.<name>.lock` beside the output, created with O_EXCL, holding the
owner's pid and host. A second run on the same output is refused in one line before it writes anything.

One file over 300 lines: the writer and the lock share the host-tagged temporary names, the proof that
their owner is dead (`_alive`) and the no-replace link; split, the lock would import the writer's internals.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal

from moe_prune.errors import MoePruneError

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


Kind = Literal["file", "folder"]


def check_writable(out: Path, force: bool, kind: Kind | None = None) -> None:
    """Refuse an existing output without --force, before any work is done; with --force, refuse to
    replace anything but a regular file or a folder (of `kind` when given)."""
    out = Path(out)
    try:
        found = out.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:  # a path through a file, a name too long, a folder we may not search
        raise MoePruneError(f"{out}: cannot be an output ({exc.strerror or exc})") from exc
    if stat.S_ISLNK(found.st_mode):
        if not force:
            raise MoePruneError(f"{out}: already exists (a symbolic link); pass --force to replace it")
        return  # --force replaces the link itself, never what it points to
    is_dir, is_file = stat.S_ISDIR(found.st_mode), stat.S_ISREG(found.st_mode)
    if not (is_dir or is_file):
        what = _special(found.st_mode)
        raise MoePruneError(f"{out}: is a {what}, not a file or folder; never replaced, even with --force")
    if kind is not None and is_dir != (kind == "folder"):
        have = "folder" if is_dir else "file"
        raise MoePruneError(f"{out}: is a {have}, not a {kind}; not replaced, even with --force")
    if not force:
        raise MoePruneError(f"{out}: already exists; pass --force to replace it")


def _special(mode: int) -> str:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device node"
    if stat.S_ISFIFO(mode):
        return "named pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def _resolved(path: Path, what: str) -> Path:
    """`path` with every link followed; a link loop is the user's error, in one line."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError
        raise MoePruneError(f"{what}: cannot be resolved (a symbolic link loop?)") from exc


def check_not_input(out: Path, inputs: tuple[str | Path, ...]) -> None:
    """Inputs are never modified: refuse an output that is an input, lies inside one, or holds one."""
    target = _resolved(Path(out), str(out))
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            continue  # a hub id or stdin, not a local file
        source = _resolved(path, str(given))
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


class OutputError(MoePruneError):
    """Writing an output failed (full disk, read-only folder): fatal to a run of many steps, never a skipped one."""


def _os_error(path: Path, exc: OSError) -> OutputError:
    where = exc.filename or path
    return OutputError(f"{where}: cannot write ({exc.strerror or exc})")


def _prepare(out: Path, force: bool, protect: tuple[Path, ...], kind: Kind) -> Path:
    out = Path(out).expanduser().absolute()
    check_writable(out, force, kind)
    check_not_input(out, protect)
    if not out.parent.is_dir():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(out.parent, exc) from exc
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
    except FileExistsError as exc:
        if old is not None:
            _remove(old)
        raise MoePruneError(f"{out}: appeared while this run was writing it; pass --force to replace it") from exc
    if old is not None:
        _remove(old)


@contextmanager
def atomic_folder(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block succeeds."""
    out = _prepare(out, force, protect, "folder")
    tmp = out.parent / _temp_name(out)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _os_error(out.parent, exc) from exc
    try:
        yield tmp
        _finish(tmp, out, force)
    except OSError as exc:
        raise _os_error(out, exc) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path, force: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `out`; what the block writes there becomes `out` if it succeeds."""
    out = _prepare(out, force, protect, "file")
    tmp = out.parent / _temp_name(out)
    try:
        tmp.touch(mode=0o666)  # the umask applies, as with a plain open()
        yield tmp
        if force:
            os.replace(tmp, out)
        else:
            _link_noreplace(tmp, out)
    except OSError as exc:
        raise _os_error(out, exc) from exc
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _link_noreplace(tmp: Path, out: Path) -> None:
    try:
        os.link(tmp, out)
    except FileExistsError as exc:
        raise MoePruneError(f"{out}: appeared while this run was writing it; pass --force to replace it") from exc
    except OSError as exc:  # no hard links on this file system: checked rename
        if out.exists():
            raise MoePruneError(f"{out}: appeared while this run was writing it; pass --force to replace it") from exc
        os.rename(tmp, out)


LOCK_LIMIT = 4096  # bytes read of a lock file: a pid and a host name, never a whole (hostile) file


def lock_path(out: Path) -> Path:
    """The lock file of the work folder or output `out`: beside it, so it exists before `out` does."""
    return out.parent / f".{out.name}.lock"


@contextmanager
def work_lock(out: Path) -> Iterator[None]:
    """Hold `out` for this process: a second run on the same output gets one line and writes nothing.

    The lock file is built whole under a temporary name, then hard-linked to `.<name>.lock` (the link,
    like O_EXCL, fails if the name exists), so no run ever reads a half-written lock. A lock of a process
    of this host that no longer runs (kill -9) is taken over, as `remove_stale_temporaries` does for
    temporaries; a lock of another host is never judged (its pids are not ours to check).
    """
    out = Path(out).expanduser().absolute()
    lock = lock_path(out)
    made = [folder for folder in (out.parent, *out.parent.parents) if not folder.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(lock)  # the lock's own temporaries, left by a kill -9 while locking
        _acquire(lock, out)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield
    finally:
        if _owner(lock) == (os.getpid(), socket.gethostname()):
            lock.unlink(missing_ok=True)
        _remove_empty(made)  # a failed run leaves no empty parent folders behind


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run made for its lock, deepest first, where nothing else was put in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _acquire(lock: Path, out: Path) -> None:
    tmp = lock.parent / _temp_name(lock)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        finally:
            os.close(fd)
        for _ in range(3):  # each retry follows the removal of a dead owner's lock
            try:
                _link_or_create(tmp, lock)
                return
            except FileExistsError as exc:
                owner = _owner(lock)
                if owner is None:
                    raise MoePruneError(
                        f"{out} is in use: its lock {lock} is unreadable; delete it if no run uses {out}"
                    ) from exc
                pid, host = owner
                if host != socket.gethostname() or _alive(pid):
                    raise MoePruneError(f"{out} is in use by pid {pid} on {host}") from exc
                _take_over(lock, owner)
        raise MoePruneError(f"{out} is in use: its lock {lock} keeps changing owner")
    except OSError as exc:
        raise _os_error(lock, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _link_or_create(tmp: Path, lock: Path) -> None:
    """Hard-link the finished lock file into place; where links are unsupported, create it with O_EXCL."""
    try:
        os.link(tmp, lock)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
            raise
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, tmp.read_bytes())
        finally:
            os.close(fd)


def _take_over(lock: Path, dead: tuple[int, str]) -> None:
    """Remove the lock of a dead owner, only if it is still that owner's: moved aside in one rename first,
    so two runs taking over at once cannot remove the lock the faster one has just made."""
    aside = lock.parent / _temp_name(lock)
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # another run took it over first; try again
    if _owner(aside) != dead:  # a live run's fresh lock: give it back
        with suppress(FileExistsError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


def _owner(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None for anything else (a link, a pipe, garbage)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, LOCK_LIMIT).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return int(parts[0]), parts[1]
