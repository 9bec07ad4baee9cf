"""Hostile cases: hostile_checkpoint (registered with @hostile).

Three classes of damage to the tiny Mixtral checkpoint (3 layers x 8 experts, top-2, vocabulary 128):
- shard headers safetensors itself would refuse (offsets, dtype, shape, header length, truncation);
- a config.json that is no config, or that disagrees with the weights (layers, experts, top-k, vocabulary);
- weights that are incomplete (a missing expert tensor or router) or not finite (NaN, Inf).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from hostile import LOADERS, MODEL_READERS, Workspace, hostile
from safetensors.numpy import load_file, save_file

EXPERT = "model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"
ROUTER = "model.layers.{layer}.block_sparse_moe.gate.weight"
# Commands that compute with expert weights, and so must check them for NaN/Inf.
WEIGHT_READERS = ("score-weights", "merge")


def _tensors(ws: Workspace) -> dict[str, np.ndarray]:
    return load_file(ws.shard())


def _save(ws: Workspace, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, ws.shard(), metadata={"format": "pt"})


def _edit_entry(ws: Workspace, name: str, **fields) -> None:
    """Change one header entry's fields, leaving the data buffer as it is."""
    header, data = ws.header()
    header[name].update(fields)
    ws.write_header(header, data)


def _edit_config(ws: Workspace, **fields) -> None:
    config = ws.config()
    config.update(fields)
    ws.write_config(config)


# Shard headers ----------------------------------------------------------------------------------


@hostile("shard-overlapping-offsets", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    header, data = ws.header()
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1] - b["data_offsets"][0]]
    ws.write_header(header, data)


@hostile("shard-offsets-disagree-with-shape", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    _edit_entry(ws, EXPERT.format(layer=1, expert=3, w="w2"), shape=[32, 47])


@hostile("shard-offsets-disagree-with-dtype", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    _edit_entry(ws, ROUTER.format(layer=0), dtype="F16")


@hostile("shard-unknown-dtype", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    _edit_entry(ws, EXPERT.format(layer=0, expert=0, w="w1"), dtype="Q32")


@hostile("shard-negative-dimension", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    _edit_entry(ws, "model.norm.weight", shape=[-32])


@hostile("shard-offsets-leave-a-gap", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    """Two tensors swap sizes' worth of place: each range is the right size, but one starts past a hole."""
    header, data = ws.header()
    entry = header["model.norm.weight"]
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = [begin + 4, end + 4]
    ws.write_header(header, data + b"\0" * 4)


@hostile("shard-header-length-past-end", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    raw = ws.shard().read_bytes()
    ws.shard().write_bytes(struct.pack("<Q", len(raw)) + raw[8:])


@hostile("shard-header-length-absurd", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    raw = ws.shard().read_bytes()
    ws.shard().write_bytes(struct.pack("<Q", 1 << 62) + raw[8:])


@hostile("shard-header-not-json", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    raw = ws.shard().read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    ws.shard().write_bytes(raw[:8] + b"\xff" * n + raw[8 + n :])


@hostile("shard-header-not-an-object", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    ws.shard().write_bytes(struct.pack("<Q", 8) + b"[1, 2]  ")


@hostile("shard-metadata-not-strings", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    header, data = ws.header()
    header["__metadata__"] = {"format": ["pt"]}
    ws.write_header(header, data)


@hostile("shard-truncated", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    ws.shard().write_bytes(ws.shard().read_bytes()[:-1000])


@hostile("shard-trailing-garbage", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    with open(ws.shard(), "ab") as handle:
        handle.write(b"garbage!")


@hostile("shard-empty-file", MODEL_READERS, ".safetensors")
def _(ws: Workspace) -> None:
    ws.shard().write_bytes(b"")


# config.json ------------------------------------------------------------------------------------


@hostile("config-is-a-folder", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    (ws.model / "config.json").unlink()
    (ws.model / "config.json").mkdir()


@hostile("config-not-an-object", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    (ws.model / "config.json").write_text(json.dumps([ws.config()]))


@hostile("config-not-json", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    (ws.model / "config.json").write_text(json.dumps(ws.config())[:-20])


@hostile("config-unsupported-model-type", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, model_type="llama")


@hostile("config-model-type-not-a-string", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, model_type=["mixtral"])


@hostile("config-moe-layer-fields-nonsense", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    """A family whose MoE layers come from config fields, given fields that name no layers sensibly."""
    _edit_config(ws, model_type="qwen3_moe", num_experts=8, decoder_sparse_step="every other", mlp_only_layers=7)


@hostile("config-more-layers-than-weights", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_hidden_layers=5)


@hostile("config-fewer-layers-than-weights", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_hidden_layers=2)


@hostile("config-layer-count-not-a-number", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_hidden_layers="3")


@hostile("config-fewer-experts-than-weights", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_local_experts=6)


@hostile("config-more-experts-than-weights", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_local_experts=12)


@hostile("config-absurd-expert-count", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_local_experts=1 << 40)


@hostile("config-zero-experts", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_local_experts=0)


@hostile("config-expert-count-boolean", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_local_experts=True)


@hostile("top-k-above-expert-count", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    config = ws.config()
    config["num_experts_per_tok"] = config["num_local_experts"] + 1
    ws.write_config(config)


@hostile("top-k-zero", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_experts_per_tok=0)


@hostile("config-vocabulary-disagrees-with-embedding", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, vocab_size=96)


# Weights: completeness --------------------------------------------------------------------------


@hostile("missing-expert-tensor", MODEL_READERS, "model.safetensors")
def _(ws: Workspace) -> None:
    tensors = _tensors(ws)
    del tensors[EXPERT.format(layer=1, expert=5, w="w3")]
    _save(ws, tensors)


@hostile("missing-expert-kind-in-one-layer", MODEL_READERS, "model.safetensors")
def _(ws: Workspace) -> None:
    """Every expert of layer 2 lacks w2: complete within the layer, yet not the model the config describes."""
    tensors = _tensors(ws)
    for expert in range(8):
        del tensors[EXPERT.format(layer=2, expert=expert, w="w2")]
    _save(ws, tensors)


@hostile("missing-router", MODEL_READERS, "model.safetensors")
def _(ws: Workspace) -> None:
    tensors = _tensors(ws)
    del tensors[ROUTER.format(layer=1)]
    _save(ws, tensors)


@hostile("expert-beyond-config-count", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    """Layer 0's expert 7 is stored as expert 9: slot 7 missing, slot 9 beyond the 8 of config.json."""
    tensors = _tensors(ws)
    for w in ("w1", "w2", "w3"):
        tensors[EXPERT.format(layer=0, expert=9, w=w)] = tensors.pop(EXPERT.format(layer=0, expert=7, w=w))
    _save(ws, tensors)


@hostile("router-rows-disagree-with-experts", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    tensors = _tensors(ws)
    name = ROUTER.format(layer=2)
    tensors[name] = np.ascontiguousarray(tensors[name][:7])
    _save(ws, tensors)


# Weights: NaN and Inf ---------------------------------------------------------------------------


def _poison(ws: Workspace, names: list[str], value: float) -> None:
    tensors = _tensors(ws)
    for name in names:
        tensors[name] = tensors[name].copy()
        tensors[name].flat[0] = value
    _save(ws, tensors)


@hostile("nan-in-experts", WEIGHT_READERS, "model.safetensors")
def _(ws: Workspace) -> None:
    """Every expert of layer 0 has one NaN weight, so every token meets one (eval cannot avoid it either)."""
    _poison(ws, [EXPERT.format(layer=0, expert=e, w="w2") for e in range(8)], float("nan"))


@hostile("inf-in-router", ("score-weights",), "model.safetensors")
def _(ws: Workspace) -> None:
    _poison(ws, [ROUTER.format(layer=1)], float("inf"))


@hostile("nan-in-experts-when-run", LOADERS, "/model")
def _(ws: Workspace) -> None:
    """Commands that run the model refuse it: at load (naming the tensor), or eval's non-finite logits (the folder)."""
    _poison(ws, [EXPERT.format(layer=0, expert=e, w="w2") for e in range(8)], float("nan"))


@hostile("inf-in-router-when-run", LOADERS, "/model")
def _(ws: Workspace) -> None:
    _poison(ws, [ROUTER.format(layer=0)], float("inf"))


@hostile("expert-shape-differs-from-its-siblings", MODEL_READERS, "model.safetensors")
def _(ws: Workspace) -> None:
    tensors = _tensors(ws)
    name = EXPERT.format(layer=1, expert=4, w="w1")
    tensors[name] = np.ascontiguousarray(tensors[name][:40])
    _save(ws, tensors)


@hostile("router-hidden-size-disagrees", MODEL_READERS, "model.safetensors")
def _(ws: Workspace) -> None:
    tensors = _tensors(ws)
    name = ROUTER.format(layer=0)
    tensors[name] = np.ascontiguousarray(tensors[name][:, :24])
    _save(ws, tensors)


# Sharded checkpoints: the index must agree with the shards ----------------------------------------

INDEX = "model.safetensors.index.json"


def _shard(ws: Workspace, weight_map_edit=None) -> None:
    """Split the checkpoint into two shards and an index; `weight_map_edit(weight_map)` then damages the index."""
    tensors = _tensors(ws)
    ws.shard().unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, ws.model / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    if weight_map_edit:
        weight_map_edit(weight_map)
    (ws.model / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@hostile("index-lists-a-tensor-no-shard-holds", MODEL_READERS, INDEX)
def _(ws: Workspace) -> None:
    _shard(ws, lambda m: m.update({"model.layers.9.mlp.extra.weight": "model-00001-of-00002.safetensors"}))


@hostile("index-omits-a-tensor", MODEL_READERS, INDEX)
def _(ws: Workspace) -> None:
    _shard(ws, lambda m: m.pop(EXPERT.format(layer=2, expert=1, w="w2")))


@hostile("index-puts-a-tensor-in-the-wrong-shard", MODEL_READERS, INDEX)
def _(ws: Workspace) -> None:
    def swap(weight_map: dict[str, str]) -> None:
        name = ROUTER.format(layer=1)
        first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
        weight_map[name] = second if weight_map[name] == first else first

    _shard(ws, swap)


@hostile("missing-expert-tensor-sharded", MODEL_READERS, INDEX)
def _(ws: Workspace) -> None:
    """A sharded checkpoint whose index and shards agree, but both lack one expert's tensor."""
    tensors = _tensors(ws)
    del tensors[EXPERT.format(layer=0, expert=6, w="w1")]
    _save(ws, tensors)
    _shard(ws)


@hostile("tokenizer-vocabulary-exceeds-the-embedding", LOADERS, "tokenizer")
def _(ws: Workspace) -> None:
    path = ws.model / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    for i in range(ws.config()["vocab_size"] + 8 - len(vocab)):
        vocab[f"<extra_{i}>"] = len(vocab)
    path.write_text(json.dumps(tokenizer))


@hostile("config-is-a-fifo", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    import os

    (ws.model / "config.json").unlink()
    os.mkfifo(ws.model / "config.json")


@hostile("tokenizer-is-a-fifo", LOADERS, "tokenizer.json")
def _(ws: Workspace) -> None:
    import os

    (ws.model / "tokenizer.json").unlink()
    os.mkfifo(ws.model / "tokenizer.json")


# Containment: every entry of the checkpoint tree, whatever its name, must lie inside the folder ---------


def _outside(ws: Workspace, name: str, folder: bool = False) -> Path:
    """A file (or a folder holding `name`) beside the model folder: bytes that are not the checkpoint's."""
    place = ws.root / "elsewhere"
    place.mkdir(exist_ok=True)
    (place / name).write_text("{{ 'not the checkpoint' }}\n")
    return place if folder else place / name


@hostile("chat-template-links-outside", MODEL_READERS, "chat_template.jinja")
def _(ws: Workspace) -> None:
    (ws.model / "chat_template.jinja").symlink_to(_outside(ws, "template.jinja"))


@hostile("chat-template-folder-links-outside", MODEL_READERS, "additional_chat_templates")
def _(ws: Workspace) -> None:
    """transformers 5 reads every `additional_chat_templates/*.jinja` as a named template."""
    (ws.model / "additional_chat_templates").symlink_to(_outside(ws, "tool_use.jinja", folder=True))


@hostile("chat-template-in-folder-links-outside", MODEL_READERS, "additional_chat_templates/tool_use.jinja")
def _(ws: Workspace) -> None:
    (ws.model / "additional_chat_templates").mkdir()
    (ws.model / "additional_chat_templates" / "tool_use.jinja").symlink_to(_outside(ws, "tool_use.jinja"))


@hostile("nested-unknown-file-links-outside", MODEL_READERS, "extras/deeper/notes.dat")
def _(ws: Workspace) -> None:
    """A name no loader reads today: refused all the same (tomorrow's loader may read it)."""
    (ws.model / "extras" / "deeper").mkdir(parents=True)
    (ws.model / "extras" / "deeper" / "notes.dat").symlink_to(_outside(ws, "notes.dat"))


@hostile("nested-link-loop", MODEL_READERS, "extras/loop")
def _(ws: Workspace) -> None:
    (ws.model / "extras").mkdir()
    (ws.model / "extras" / "loop").symlink_to("loop")


@hostile("nested-fifo", MODEL_READERS, "additional_chat_templates/tool_use.jinja")
def _(ws: Workspace) -> None:
    import os

    (ws.model / "additional_chat_templates").mkdir()
    os.mkfifo(ws.model / "additional_chat_templates" / "tool_use.jinja")


# config.json sizes no model can have, or that disagree with the weights ---------------------------


@hostile("config-intermediate-size-absurd", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, intermediate_size=10**9)


@hostile("config-intermediate-size-a-float", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, intermediate_size=48.0)


@hostile("config-max-position-embeddings-zero", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, max_position_embeddings=0)


@hostile("config-attention-heads-zero", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_attention_heads=0)


@hostile("config-hidden-size-a-string", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, hidden_size="32")


@hostile("config-unknown-size-field-negative", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    """A size-like field moe-prune does not know by name (nested, too) is held to the same bounds."""
    config = ws.config()
    config["rope_parameters"]["original_max_position_embeddings"] = -4096
    ws.write_config(config)


@hostile("config-sliding-window-absurd", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, sliding_window=1 << 40)


@hostile("config-intermediate-size-disagrees-with-experts", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, intermediate_size=40)


@hostile("config-hidden-size-disagrees-with-embedding", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, hidden_size=48)


@hostile("config-key-value-heads-disagree-with-weights", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, num_key_value_heads=4)


@hostile("config-head-dim-disagrees-with-weights", MODEL_READERS, "config.json")
def _(ws: Workspace) -> None:
    _edit_config(ws, head_dim=16)


# Non-finite weights through the commands that copy bytes: the router is read whatever they copy ------


@hostile("nan-in-router-copied", ("prune", "merge"), "model.layers.1.block_sparse_moe.gate.weight")
def _(ws: Workspace) -> None:
    """prune and merge (--router anchor) cut router rows as bytes; they read the router first."""
    _poison(ws, [ROUTER.format(layer=1)], float("nan"))


@hostile("inf-in-router-copied", ("prune", "merge"), "model.safetensors")
def _(ws: Workspace) -> None:
    _poison(ws, [ROUTER.format(layer=2)], float("-inf"))


@hostile("nan-in-one-averaged-expert", ("merge",), "model.layers.2.block_sparse_moe.experts.5.w1.weight")
def _(ws: Workspace) -> None:
    """merge --keep 4 averages every expert of every layer: one NaN weight is refused, naming its tensor."""
    _poison(ws, [EXPERT.format(layer=2, expert=5, w="w1")], float("nan"))
