"""The containment rule (`Checkpoint.check_files_inside`) covers every file the loaders really open.

The rule walks the whole checkpoint tree rather than listing the names loaders read; these tests hold
it to what transformers and tokenizers actually open while loading, recorded with an audit hook
(`open`, `os.listdir`, `os.scandir` events), for the shipped demo model and a tiny Mixtral carrying
every chat-template file transformers 5 reads. The shards are opened by safetensors' Rust code, which
raises no audit event; they are covered by the index check and by the same walk.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError

_RECORDING: list[list[str]] = []


def _hook(event: str, args: tuple) -> None:
    if _RECORDING and event in ("open", "os.listdir", "os.scandir") and args:
        target = args[0]
        if isinstance(target, str | bytes | os.PathLike):
            _RECORDING[-1].append(os.path.abspath(os.fsdecode(target)))


sys.addaudithook(_hook)  # audit hooks cannot be removed: this one records only inside `_opened`


def _opened(ckpt: Checkpoint) -> set[Path]:
    """Paths under the checkpoint folder that loading its tokenizer, config, generation config and model opened."""
    from transformers import AutoConfig, GenerationConfig

    from moe_prune.runtime.loading import load_model, load_tokenizer

    _RECORDING.append([])
    try:
        tokenizer = load_tokenizer(ckpt)
        load_model(ckpt)
        AutoConfig.from_pretrained(ckpt.folder)
        GenerationConfig.from_pretrained(ckpt.folder)
    finally:
        paths = _RECORDING.pop()
    folder = os.path.abspath(ckpt.folder)
    assert tokenizer.chat_template is None or isinstance(tokenizer.chat_template, str | dict)
    return {Path(p) for p in paths if p == folder or p.startswith(folder + os.sep)}


def _with_templates(folder: Path) -> None:
    """The chat-template files transformers 5 reads: chat_template.jinja and additional_chat_templates/*.jinja."""
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages[0]['content'] }}")


@pytest.fixture(params=["demo", "tiny-mixtral-with-templates"])
def checkpoint(request, tiny, tmp_path) -> Checkpoint:
    if request.param == "demo":
        return Checkpoint.open(DEMO_MODEL_DIR)
    folder = tmp_path / "model"
    shutil.copytree(tiny("mixtral"), folder)
    _with_templates(folder)
    return Checkpoint.open(folder)


def test_every_file_the_loaders_open_is_covered_by_the_containment_rule(checkpoint):
    opened = _opened(checkpoint)
    covered = {Path(os.path.abspath(p)) for p in checkpoint.entries()} | {Path(os.path.abspath(checkpoint.folder))}
    assert any(p.name == "tokenizer.json" for p in opened), opened  # the recording works
    assert opened <= covered, sorted(opened - covered)
    if (checkpoint.folder / "additional_chat_templates").exists():
        assert Path(os.path.abspath(checkpoint.folder / "additional_chat_templates" / "tool_use.jinja")) in opened


def _link_outside(folder: Path, tmp_path: Path, where: str) -> None:
    """One entry of the tree made a link to bytes outside the folder."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "tool_use.jinja").write_text("{{ 'secret' }}")
    target = folder / where
    if target.is_dir():
        shutil.rmtree(target)
        target.symlink_to(outside)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        target.symlink_to(outside / "tool_use.jinja")


@pytest.mark.parametrize(
    "where",
    [
        "chat_template.jinja",
        "additional_chat_templates",
        "additional_chat_templates/tool_use.jinja",
        "some/unknown/nested.file",
    ],
)
def test_an_entry_linking_outside_is_refused_before_any_loader_opens_it(tiny, tmp_path, where):
    folder = tmp_path / "model"
    shutil.copytree(tiny("mixtral"), folder)
    _with_templates(folder)
    _link_outside(folder, tmp_path, where)
    _RECORDING.append([])
    try:
        with pytest.raises(MoePruneError, match=f"^{folder / where}: links outside the checkpoint folder"):
            Checkpoint.open(folder)
    finally:
        opened = _RECORDING.pop()
    assert not [p for p in opened if "outside" in Path(p).parts], "a file outside was opened"


def test_side_files_in_subfolders_are_copied_and_tool_folders_are_not(tiny, tmp_path):
    """A pruned output keeps the chat templates (subfolder too); `.git` / `.cache` are not the model's."""
    from moe_prune.artifacts.mask import DropMask
    from moe_prune.stages import prune

    folder = tmp_path / "model"
    shutil.copytree(tiny("mixtral"), folder)
    _with_templates(folder)
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "download.lock").write_text("")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    ckpt = Checkpoint.open(folder)
    keep = {layer: [0, 1, 2, 3] for layer in ckpt.identity.moe_layers}
    out = tmp_path / "out"
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), out)
    for name in ("chat_template.jinja", "additional_chat_templates/tool_use.jinja", ".gitattributes"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    assert not (out / ".cache").exists()
