"""Config and model code for checkpoints whose MoE layers keep different numbers of experts.

Uniform counts give a stock config (`ModelConfig.with_expert_count`) that plain transformers loads.
Non-uniform ("ragged") counts give a config that keeps the largest count in the expert-count fields,
lists each layer's count under `moe_prune_ragged` with the family facts the model file needs (from
the adapter table), and points `auto_map` at `modeling_moe_prune.py`, a static, self-contained
file copied into the checkpoint. `expert_count_config` is the one entry point for both cases.
Per-layer top-k (`allocate --top-k search`) is written the same way: stock configs hold one top-k, so
counts that are equal but top-ks that differ also give a ragged config (its `top_k_per_layer`).
"""

from __future__ import annotations

import copy
import hashlib
from importlib import resources
from pathlib import Path
from typing import Any

from moe_prune.architectures.config import RAGGED_KEY, ModelConfig
from moe_prune.architectures.spec import Adapter
from moe_prune.checkpoint.serving import warn_if_unserved
from moe_prune.errors import MoePruneError

MODEL_FILE = "modeling_moe_prune.py"
MODEL_MODULE = MODEL_FILE.removesuffix(".py")
AUTO_CLASS = "AutoModelForCausalLM"
CLASS_PREFIX = "Ragged"
# config.json `architectures` of a ragged checkpoint: a name no engine knows unless moe-prune's plugin registers
# it (moe_prune/serving/vllm_plugin.py), so an engine without the plugin refuses the checkpoint instead of
# building every layer at the largest count. transformers ignores it (auto_map names the class).
ARCHITECTURE_PREFIX = f"MoePrune{CLASS_PREFIX}"
RAGGED_FORMAT = 1
# sha256 of the modelling file earlier releases wrote. moe-prune never runs a folder's copy (it imports its own,
# a superset), so a checkpoint carrying exactly one of these still loads without --trust-remote-code.
EARLIER_MODEL_CODE = {"de925ffd46e64ae762ef7be32804bf46d5f54be2171b0b6034f7f4032d95d79b"}  # 0.1.0


def model_code() -> str:
    """The modelling file shipped with moe-prune (it lives in this package)."""
    return resources.files("moe_prune.checkpoint").joinpath(MODEL_FILE).read_text()


def is_shipped_model_code(data: bytes) -> bool:
    """Whether `data` is the modelling file this moe-prune ships, or exactly one an earlier release wrote."""
    return data == model_code().encode() or hashlib.sha256(data).hexdigest() in EARLIER_MODEL_CODE


def ragged_architecture(base_class: str) -> str:
    """The `architectures` entry of a ragged checkpoint whose transformers class is `base_class`."""
    return f"{ARCHITECTURE_PREFIX}{base_class}"


def causal_lm_class(model_type: str) -> str:
    """transformers' ForCausalLM class name for `model_type`, from transformers' own auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None:
        raise MoePruneError(
            f"model_type {model_type!r} has no causal-LM class in transformers; "
            "different expert counts per layer are not supported for it"
        )
    return name


def block_path(adapter: Adapter) -> str | list[str]:
    """The MoE block inside a decoder layer: the module holding both the router and the experts; where the
    decoder layer holds them itself (gemma4), the router's and the experts' modules, rebuilt one by one."""
    router, experts = adapter.runtime_router.split("."), adapter.runtime_experts.split(".")
    common = []
    for a, b in zip(router, experts, strict=False):
        if a != b:
            break
        common.append(a)
    if adapter.ragged_extra_blocks:  # modules beside the block that the expert count sizes too (jetmoe's attention)
        return [".".join(common) or adapter.runtime_router, *adapter.ragged_extra_blocks]
    if not common:
        return [adapter.runtime_router, adapter.runtime_experts]
    if len(common) == min(len(router), len(experts)):
        raise MoePruneError(
            f"{adapter.model_type}: router {adapter.runtime_router!r} and experts {adapter.runtime_experts!r} "
            "are nested in one another; different expert counts per layer are not supported for it"
        )
    return ".".join(common)


def _strip_ragged(raw: dict[str, Any], text: dict[str, Any]) -> None:
    """Remove what an earlier ragged edit added (a uniform result must load with stock transformers and engines)."""
    spec = text.pop(RAGGED_KEY, None)
    base = spec.get("base_class") if isinstance(spec, dict) else None
    original = spec.get("architectures") if isinstance(spec, dict) else None
    if isinstance(base, str) and isinstance(raw.get("architectures"), list):
        ragged_names = {ragged_architecture(base), f"{CLASS_PREFIX}{base}"}  # ours, and what save_pretrained writes
        if isinstance(original, list) and all(isinstance(name, str) for name in original):
            raw["architectures"] = list(original)  # a wrapper's own class (Qwen3_5MoeForConditionalGeneration)
        else:
            raw["architectures"] = [base if name in ragged_names else name for name in raw["architectures"]]
    auto_map = raw.get("auto_map")
    if isinstance(auto_map, dict) and str(auto_map.get(AUTO_CLASS, "")).startswith(f"{MODEL_MODULE}."):
        del auto_map[AUTO_CLASS]
        if not auto_map:
            del raw["auto_map"]


def base_class(model: ModelConfig) -> str:
    """The class AutoModelForCausalLM builds for this config.json: a wrapper's own (top-level model_type)."""
    top = model.raw.get("model_type")
    return causal_lm_class(top if isinstance(top, str) and model.text_key else model.adapter.model_type)


def layer_top_k(counts: dict[int, int], top_k: int | dict[int, int]) -> dict[int, int]:
    """Experts per token of every layer: `top_k` (one for all, or per layer) clipped to the layer's count."""
    return {layer: min(top_k if isinstance(top_k, int) else top_k[layer], n) for layer, n in counts.items()}


def source_top_k(model: ModelConfig) -> int | dict[int, int]:
    """The top-k a checkpoint's layers use: a ragged block's `top_k_per_layer` when it lists every MoE layer with
    a count (an earlier `--top-k search`), else the config's one top-k (`ModelConfig.top_k`)."""
    listed = model.ragged.get("top_k_per_layer") if model.ragged is not None else None
    if isinstance(listed, dict):
        try:
            values = {int(k): v for k, v in listed.items()}
        except ValueError:
            values = {}
        if sorted(values) == model.moe_layers and all(isinstance(v, int) and v >= 1 for v in values.values()):
            return {layer: min(v, model.top_k) for layer, v in values.items()}
    return model.top_k


def ragged_config(
    config: dict[str, Any], adapter: Adapter, counts: dict[int, int], top_k: int | dict[int, int]
) -> tuple[dict[str, Any], dict[str, str]]:
    """config.json for per-layer expert `counts` (layer -> routed experts) and the files to write beside it.

    Expert-count fields hold the largest count (so configs stay valid); top-k fields hold the config's
    top-k (or `top_k` when it is one for all layers), clipped to that largest count, so layers outside the
    block (multi-token prediction) keep theirs; each layer uses its top-k (`top_k`: one for all layers, or
    per layer), clipped to its count, experts per token.
    """
    model = ModelConfig.from_dict(config)
    if model.adapter.model_type != adapter.model_type:
        raise MoePruneError(f"config.json is a {model.model_type} config, not {adapter.model_type}")
    if sorted(counts) != model.moe_layers:
        raise MoePruneError(f"expert counts given for layers {sorted(counts)}, the MoE layers are {model.moe_layers}")
    if any(n < 1 for n in counts.values()):
        raise MoePruneError("every MoE layer must keep at least one expert")
    largest = max(counts.values())
    per_layer = layer_top_k(counts, top_k)
    global_top_k = min(top_k if isinstance(top_k, int) else model.top_k, largest)
    raw = copy.deepcopy(model.with_expert_count(largest, global_top_k).raw)
    text = raw[model.text_key] if model.text_key else raw
    _strip_ragged(raw, text)
    present = [key for key in (*adapter.expert_count_keys, *adapter.top_k_keys) if model.get(key) is not None]
    base = base_class(model)
    # A wrapper's block sits in its text config, beside the counts it overrides: that is the config the text
    # model's modules are built from (and the one transformers hands the causal LM of Qwen3.5-MoE or Llama 4).
    text[RAGGED_KEY] = {
        "format": RAGGED_FORMAT,
        "base_class": base,
        "architectures": raw.get("architectures") or [base],
        "layers": adapter.runtime_layers,
        "block": block_path(adapter),
        "count_keys": [key for key in adapter.expert_count_keys if key in present],
        "top_k_keys": [key for key in adapter.top_k_keys if key in present],
        "experts_per_layer": {str(layer): counts[layer] for layer in sorted(counts)},
        "top_k_per_layer": {str(layer): per_layer[layer] for layer in sorted(counts)},
    }
    # The model class extends transformers' own class, so it needs transformers' config class too; auto_map names
    # nothing else, since moe-prune loads such a folder without the user's --trust-remote-code only when it does.
    raw["auto_map"] = {AUTO_CLASS: f"{MODEL_MODULE}.{CLASS_PREFIX}{base}"}
    raw["architectures"] = [ragged_architecture(base)]
    warn_if_unserved(base, counts)
    return raw, {MODEL_FILE: model_code()}


def expert_count_config(
    config: dict[str, Any], adapter: Adapter, counts: dict[int, int], top_k: int | dict[int, int]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The one entry point: a stock config and no files when every layer has the same count and top-k is
    the config's, else ragged (`top_k`: one for all layers, or per layer, e.g. from `allocate --top-k search`).

    Uniform: every expert-count field is set to the count and top-k is clipped to it (stock loadable). Per-layer
    top-ks other than the config's are written ragged even at equal counts: a stock config holds one top-k,
    which layers outside the block (multi-token prediction) would take too.
    """
    model = ModelConfig.from_dict(config)
    if isinstance(top_k, dict) and layer_top_k(counts, top_k) == layer_top_k(counts, model.top_k):
        top_k = model.top_k
    if len(set(counts.values())) > 1 or isinstance(top_k, dict):
        return ragged_config(config, adapter, counts, top_k)
    count = next(iter(counts.values()))
    raw = copy.deepcopy(model.with_expert_count(count, min(top_k, count)).raw)
    _strip_ragged(raw, raw[model.text_key] if model.text_key else raw)
    return raw, {}


def write_model_files(folder: Path, files: dict[str, str]) -> None:
    """Write the extra files of an output checkpoint; drop a modelling file copied from a ragged input."""
    if MODEL_FILE not in files and (folder / MODEL_FILE).exists():
        (folder / MODEL_FILE).unlink()
    for name, text in files.items():
        (folder / name).write_text(text)
