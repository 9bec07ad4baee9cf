"""Write an output checkpoint: resharded safetensors, index, config, side files, manifest."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from moe_prune.architectures.config import ModelConfig
from moe_prune.artifacts.manifest import MANIFEST_NAME, Manifest
from moe_prune.checkpoint.ragged import write_model_files
from moe_prune.checkpoint.safetensors_io import AnyOutput, Progress, write_file
from moe_prune.checkpoint.source import INDEX_NAME, Checkpoint
from moe_prune.errors import MoePruneWarning
from moe_prune.io.output import atomic_folder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf", ".ckpt")
REWRITTEN = {"config.json", INDEX_NAME, MANIFEST_NAME, "pytorch_model.bin.index.json"}


def assign_shards(tensors: list[AnyOutput], max_bytes: int) -> list[list[AnyOutput]]:
    """Greedy in order: a new shard starts when the next tensor would pass `max_bytes`."""
    shards: list[list[AnyOutput]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_weights(
    folder: Path, tensors: list[AnyOutput], max_bytes: int, progress: Progress | None = None
) -> list[str]:
    """Write shards named like transformers does and the index; returns the shard file names."""
    shards = assign_shards(tensors, max_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        write_file(folder / name, shard, progress=progress)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return names


def copy_side_files(source: Path, folder: Path) -> None:
    """Tokenizer, generation config, chat templates (subfolders too), remote code...: everything but weights.

    A side file that links outside the checkpoint is skipped with a warning: its bytes are not the checkpoint's.
    """
    kept, skipped = Checkpoint(source).side_files()
    for path in kept:
        relative = path.relative_to(source)
        if str(relative) not in REWRITTEN and not path.name.endswith(WEIGHT_SUFFIXES):
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / relative)
    for path in skipped:
        warnings.warn(f"{path}: links outside the checkpoint folder; not copied", MoePruneWarning, stacklevel=2)


def write_checkpoint(
    folder: Path,
    source: Path,
    tensors: list[AnyOutput],
    config: ModelConfig,
    manifest: Manifest,
    max_bytes: int,
    progress: Progress | None = None,
) -> list[str]:
    """Everything an output checkpoint folder holds; returns the shard names."""
    names = write_weights(folder, tensors, max_bytes, progress)
    copy_side_files(source, folder)
    (folder / "config.json").write_text(json.dumps(config.raw, indent=2, sort_keys=True) + "\n")
    manifest.write(folder)
    return names


def write_output(
    out: Path,
    source: Path,
    tensors: list[AnyOutput],
    config: ModelConfig,
    manifest: Manifest,
    max_bytes: int,
    *,
    force: bool = False,
    model_files: dict[str, str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], int]:
    """Write a whole output checkpoint atomically (temporary folder, then rename); (shard names, bytes written).

    `progress(done_bytes, total_bytes)` follows the tensor bytes written, so callers can draw a bar.
    """
    total = sum(t.nbytes for t in tensors)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress:
            progress(done, total)

    with atomic_folder(Path(out), force, protect=(source,)) as tmp:
        shards = write_checkpoint(tmp, source, tensors, config, manifest, max_bytes, advance)
        write_model_files(tmp, model_files or {})
        written = sum((tmp / name).stat().st_size for name in shards)
    return shards, written
