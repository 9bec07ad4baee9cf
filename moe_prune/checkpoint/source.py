"""Open an input checkpoint (local folder or hub id): its config, tensors, manifest and identity.

No file outside the checkpoint folder is ever read because the checkpoint says so: every shard the
index names, and every entry of the folder and of its subfolders, must resolve (after symbolic links)
inside the folder, or, for a hub cache snapshot whose files are links into `../../blobs`, inside that
repository's cache. The whole tree is checked, not a list of the names loaders read today:
transformers, tokenizers and lm-eval open files by names that change between releases
(`chat_template.jinja`, `additional_chat_templates/*.jinja` came with transformers 5), and
`tests/test_containment.py` records what they open to hold this rule to it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from moe_prune.architectures import fit_layer_prefix
from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.common import describe
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.manifest import Manifest
from moe_prune.checkpoint.generation_config import check_generation_config
from moe_prune.checkpoint.safetensors_io import TensorInfo, read_header
from moe_prune.checkpoint.validate import INDEX_NAME, read_weight_map, validate_checkpoint
from moe_prune.demo import DEMO_ALIAS, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.io.hub import offline, quiet_hub_logs

SINGLE_NAME = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


def resolve_model(model: str | Path) -> Path:
    """A local folder as is; `demo` (when no such folder exists) the shipped demo model; `org/name` from the hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if text == DEMO_ALIAS:
        return DEMO_MODEL_DIR
    if path.exists():
        raise MoePruneError(f"{text}: not a model folder")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MoePruneError(f"{text}: model folder not found")
    if offline():
        raise MoePruneError(
            f"{text}: not a local folder, and the hub cannot be reached in offline mode (HF_HUB_OFFLINE)"
        )
    try:
        from huggingface_hub import snapshot_download

        with quiet_hub_logs():
            return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # hub errors have many types; all mean the same to the user (--debug shows the cause)
        raise MoePruneError(
            f"{text}: not a local folder and could not be fetched from the hub ({describe(exc)})"
        ) from exc


@dataclass
class Checkpoint:
    """A safetensors checkpoint folder, read lazily: headers only, never the weights."""

    folder: Path

    @classmethod
    def open(cls, model: str | Path) -> Checkpoint:
        ckpt = cls(resolve_model(model))
        ckpt.check_files_inside()
        if not ckpt.tensors:  # reads every shard header: corrupt input fails before any work
            raise MoePruneError(f"{ckpt.folder}: the checkpoint holds no tensors")
        validate_checkpoint(ckpt.config, ckpt.tensors, ckpt.weight_list)  # config against weights, from the headers
        check_generation_config(ckpt.folder, ckpt.config.get("vocab_size"))  # copied by prune/merge, read at load
        return ckpt

    @cached_property
    def root(self) -> Path:
        """Where the checkpoint's files may live: the folder, or the hub cache repository of a snapshot."""
        folder = self.folder.resolve()
        if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
            return folder.parent.parent
        return folder

    def inside(self, path: Path) -> bool:
        """Whether `path` resolves (symbolic links followed) inside the checkpoint."""
        try:
            return path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):  # a symlink loop, an unreadable path
            return False

    def entries(self) -> Iterator[Path]:
        """Every entry of the folder and of its subfolders (symbolic links listed, not followed), depth first."""
        pending = [self.folder]
        while pending:
            folder = pending.pop()
            try:
                with os.scandir(folder) as scan:
                    found = sorted(scan, key=lambda entry: entry.name)
            except OSError as exc:
                raise MoePruneError(f"{folder}: cannot read ({exc.strerror})") from exc
            for entry in found:
                yield Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))

    def check_files_inside(self) -> None:
        """Refuse any entry of the tree that lies outside the checkpoint or that reading would hang on.

        Any loader may open any of them (a tokenizer reads templates from a subfolder), so none is exempt.
        """
        for path in self.entries():
            if not self.inside(path):
                raise MoePruneError(f"{path}: links outside the checkpoint folder; refusing to read it")
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:  # a dangling link inside the folder: loaders fail to open it, one line each
                continue
            except OSError as exc:
                raise MoePruneError(f"{path}: cannot read ({exc.strerror})") from exc
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):  # reading a pipe or device blocks or never ends
                raise MoePruneError(f"{path}: is not a regular file (a pipe, socket or device); refusing to read it")

    def side_files(self) -> tuple[list[Path], list[Path]]:
        """(files of the tree to copy into an output, entries skipped because they lie outside it).

        Hidden folders (`.git`, `.cache` of `hf download`) are the tools' own, not the model's: not copied.
        """
        kept, skipped = [], []
        for path in self.entries():
            if any(part.startswith(".") for part in path.relative_to(self.folder).parts[:-1]):
                continue
            if not self.inside(path):
                skipped.append(path)
            elif path.is_file():
                kept.append(path)
        return kept, skipped

    @cached_property
    def config(self) -> ModelConfig:
        """config.json with its adapter fitted to the tensors' layer prefix (a wrapper's keys under a text config)."""
        config = ModelConfig.load(self.folder / "config.json")
        return replace(config, adapter=fit_layer_prefix(config.adapter, [t.name for t in self.tensors]))

    @cached_property
    def shard_files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            weight_map = read_weight_map(index)
            files = sorted(set(weight_map.values()))
            spelled: dict[Path, str] = {}  # one file under two names would be read, and loaded, twice
            for name in files:
                path = self.folder / name
                if Path(name).is_absolute() or ".." in Path(name).parts or not self.inside(path):
                    raise MoePruneError(f"{index}: shard {name!r} lies outside the checkpoint folder")
                if not path.is_file():
                    raise MoePruneError(f"{index}: lists missing shard {name}")
                if (other := spelled.setdefault(path.resolve(), name)) != name:
                    raise MoePruneError(f"{index}: names one shard file twice, as {other!r} and {name!r}")
            return [self.folder / f for f in files]
        if (self.folder / SINGLE_NAME).is_file():
            return [self.folder / SINGLE_NAME]
        others = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if len(others) == 1 and (self.folder / others[0]).is_file():
            return [self.folder / others[0]]
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
            raise MoePruneError(f"{self.folder}: only safetensors checkpoints are supported (found .bin/.pt weights)")
        raise MoePruneError(f"{self.folder}: no safetensors weights found")

    @property
    def weight_list(self) -> Path:
        """The file that lists the weights: the index of a sharded checkpoint, else its one shard."""
        index = self.folder / INDEX_NAME
        return index if index.is_file() else self.shard_files[0]

    @cached_property
    def tensors(self) -> list[TensorInfo]:
        """Every tensor of every shard, in shard then file order."""
        out: list[TensorInfo] = []
        seen: set[str] = set()
        for shard in self.shard_files:
            infos, _ = read_header(shard)
            for info in infos:
                if info.name in seen:
                    raise MoePruneError(f"{shard}: tensor {info.name!r} appears in two shards")
                seen.add(info.name)
                out.append(info)
        return out

    @cached_property
    def manifest(self) -> Manifest | None:
        return Manifest.read(self.folder)

    @cached_property
    def identity(self) -> ModelIdentity:
        """Identity in original expert ids (from moe_prune.json when an earlier stage wrote one)."""
        config = self.config
        counts = config.experts_per_layer
        slots = self.manifest.slots if self.manifest else {layer: tuple(range(n)) for layer, n in counts.items()}
        if sorted(slots) != config.moe_layers:
            raise MoePruneError(f"{self.folder}: moe_prune.json layers disagree with config.json")
        for layer, ids in slots.items():
            if len(ids) != counts[layer]:
                raise MoePruneError(
                    f"{self.folder}: moe_prune.json says layer {layer} has {len(ids)} experts, "
                    f"config.json says {counts[layer]}"
                )
        return ModelIdentity(config.model_type, config.num_layers, slots, config.fingerprint())

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shard_files)
