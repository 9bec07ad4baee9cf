"""Hostile outputs (registered with @hostile): what `--out` names is never something to destroy or write into.

The one output check (`io.output.check_writable` / `check_not_input`) refuses, before any work and
even with --force: a device node or a pipe (as root, `--out /dev/null --force` would delete the node), a
file where a folder is written and the reverse, a symbolic link loop, and a work folder (sweep, lottery)
inside an input (lottery wrote its recipe, statistics and mask into the model before prune refused).
"""

from __future__ import annotations

import os
import stat

from hostile import Workspace, _nothing, hostile

FOLDER_WRITERS = ("prune", "merge", "finetune", "sweep", "lottery")
FILE_WRITERS = ("score", "profile", "combine", "allocate")


def _device(ws: Workspace) -> None:
    """A character device like /dev/null (root can make one); a named pipe otherwise (the same refusal)."""
    try:
        os.mknod(ws.out, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        os.mkfifo(ws.out)


@hostile("out-is-a-device-node", (*FOLDER_WRITERS, *FILE_WRITERS), "ws/out", extra=("--force",))
def out_is_a_device_node(ws: Workspace) -> None:
    _device(ws)


@hostile("out-is-a-named-pipe", (*FOLDER_WRITERS, *FILE_WRITERS), "ws/out", extra=("--force",))
def out_is_a_named_pipe(ws: Workspace) -> None:
    os.mkfifo(ws.out)


@hostile("out-is-a-symlink-loop", (*FOLDER_WRITERS, *FILE_WRITERS), "symbolic link loop", extra=("--force",))
def out_is_a_symlink_loop(ws: Workspace) -> None:
    os.symlink(ws.root / "loop", ws.out)
    os.symlink(ws.out, ws.root / "loop")


@hostile("out-is-a-file-for-a-folder", FOLDER_WRITERS, "ws/out", extra=("--force",))
def out_is_a_file(ws: Workspace) -> None:
    ws.out.write_text("someone's notes\n")


@hostile("out-is-a-folder-for-a-file", FILE_WRITERS, "ws/out", extra=("--force",))
def out_is_a_folder(ws: Workspace) -> None:
    ws.out.mkdir()
    (ws.out / "keep.txt").write_text("mine\n")


# Work folders (sweep, lottery) inside or around an input: refused before the first file is written.
hostile("work-folder-inside-the-model", ("sweep", "lottery"), "input", extra=("--out", "{model}/sub"))(_nothing)
hostile("work-folder-is-the-model", ("sweep", "lottery"), "input", extra=("--out", "{model}", "--force"))(_nothing)
hostile("work-folder-holds-the-inputs", ("sweep", "lottery"), "input", extra=("--out", "{root}", "--force"))(_nothing)


# finetune's resume folder `.OUT.resume` must be a folder: --force could not remove a link or a file, and
# state saved through a link would land wherever it points.
@hostile("resume-folder-is-a-link", ("finetune",), ".out.resume", extra=("--force", "--save-every", "1"))
def resume_folder_is_a_link(ws: Workspace) -> None:
    (ws.root / "elsewhere").mkdir()
    os.symlink(ws.root / "elsewhere", ws.root / ".out.resume")


@hostile("resume-folder-is-a-file", ("finetune",), ".out.resume", extra=("--force",))
def resume_folder_is_a_file(ws: Workspace) -> None:
    (ws.root / ".out.resume").write_text("not a saved run\n")
