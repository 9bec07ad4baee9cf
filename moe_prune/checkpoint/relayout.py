"""Put a saved text model back into its multimodal wrapper's checkpoint layout.

moe-prune loads a wrapper (Qwen3.5-MoE, Llama 4: a `text_config`, weights under `model.language_model.*` or
`language_model.model.*`) as transformers' causal LM, which holds the text model only. `save_pretrained`
then writes the text model's tensors, under the wrapper's names (Qwen3.5-MoE) or its own (Llama 4), and none
of the vision tower's. Beside the wrapper's config.json that is a checkpoint no reader can place, which has
lost the tensors the causal LM never held. This rewrites it in the source's layout: every trained tensor under
the source name it was loaded from, every other source tensor copied byte for byte.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moe_prune.architectures import get_adapter
from moe_prune.checkpoint.safetensors_io import DTYPE_BITS, OutputTensor, TensorInfo, read_header
from moe_prune.checkpoint.source import INDEX_NAME, Checkpoint
from moe_prune.checkpoint.writer import write_weights
from moe_prune.errors import MoePruneError

# dtypes of quantized weights and their scales: a float output cannot carry them unconverted.
QUANTIZED = {name for name, bits in DTYPE_BITS.items() if bits < 16 and name not in {"BOOL"}}


def source_name(saved: str, source: dict[str, TensorInfo], head: str, where: Path) -> str:
    """The source tensor a saved one was loaded from: the same name, else the name with the wrapper's `head`
    in front (Llama 4: `language_model.`; its vision tower has `model.layers.*` names of its own)."""
    for name in (saved, head + saved):
        if name in source:
            return name
    raise MoePruneError(f"{where}: cannot place the trained tensor {saved} in the wrapper's layout")


def wrapper_head(ckpt: Checkpoint) -> str:
    """What the wrapper's layer prefix puts before its text model's own (`language_model.`), or ''."""
    wrapper = ckpt.config.adapter.layer_prefix
    text = get_adapter(ckpt.config.text["model_type"]).layer_prefix
    return wrapper.removesuffix(text) if wrapper.endswith(text) else ""


def restore_source_layout(folder: Path, ckpt: Checkpoint, max_bytes: int) -> None:
    """Rewrite `folder`'s weights (a causal LM's save_pretrained of `ckpt`) in `ckpt`'s layout, if it is a wrapper's."""
    if ckpt.config.text_key is None:
        return
    saved = [t for shard in sorted(folder.glob("*.safetensors")) for t in read_header(shard)[0]]
    source = {t.name: t for t in ckpt.tensors}
    head = wrapper_head(ckpt)
    placed = {source_name(t.name, source, head, ckpt.folder): t for t in saved}
    if len(placed) != len(saved):
        raise MoePruneError(f"{ckpt.folder}: two trained tensors map to one source tensor")
    if all(name == t.name for name, t in placed.items()) and len(placed) == len(source):
        return  # the causal LM is the whole wrapper (Gemma 4), saved under its names
    for name, t in placed.items():
        if t.shape != source[name].shape:
            raise MoePruneError(
                f"{ckpt.folder}: trained {t.name} has shape {t.shape}, the source {name} {source[name].shape}"
            )
    tensors = []
    for name, info in source.items():
        got = placed.get(name, info)
        if got is info and info.dtype in QUANTIZED:
            raise MoePruneError(
                f"{ckpt.folder}: {name} is {info.dtype} and not part of the text model; a finetuned (float) wrapper "
                "cannot carry it unconverted"
            )
        tensors.append(OutputTensor(name, got.dtype, got.shape, got.file, ((got.start, got.end),)))
    staging = folder / ".relayout"
    staging.mkdir()
    write_weights(staging, tensors, max_bytes)
    for old in [*folder.glob("*.safetensors"), folder / INDEX_NAME]:
        old.unlink(missing_ok=True)
    for new in staging.iterdir():
        new.rename(folder / new.name)
    shutil.rmtree(staging)
