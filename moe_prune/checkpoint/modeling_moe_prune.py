"""Different numbers of routed experts per MoE layer, for checkpoints written by moe-prune.

Stock transformers sizes every MoE layer from one config field, so a checkpoint pruned or merged
non-uniformly (e.g. by a global criterion) needs this file. It is copied unchanged into such a
checkpoint and loaded with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
It imports only torch (through transformers) and transformers: moe-prune need not be installed.

Everything family-specific is data in config.json, under `moe_prune_ragged`:
    base_class         the transformers class this model extends, e.g. "MixtralForCausalLM"
    layers             module path of the decoder layer list, e.g. "model.layers"
    block              the MoE block inside one decoder layer, e.g. "mlp"; or a list of the modules sized by
                       the expert count where the layer holds them without a block (gemma4: router, experts)
    count_keys         config fields holding the routed-expert count (they hold the largest count)
    top_k_keys         config fields holding top-k
    experts_per_layer  {layer: routed experts}
    top_k_per_layer    {layer: experts per token} (top-k, clipped to the layer's experts)
The stock model is built first; then each MoE layer's block is built again from a copy of the
config that gives that layer's counts, so every weight loads under its usual name.
A multimodal wrapper (Qwen3.5-MoE, Llama 4, Gemma 4: a `text_config`) keeps the block in its text config, the
config its text model's modules are built from; where the class is the text model's causal LM, it is given the
text config, as AutoModelForCausalLM does for transformers' own classes.
`auto_map` names the class as "Ragged" + base_class; this module creates it on first access.

The family's load-balancing loss (`output_router_logits`) concatenates every layer's router logits,
which fails when layers have different widths; creating a class wraps the family module's
`load_balancing_loss_func` so it is computed per group of layers of equal width and averaged over the
layers (each group with its own width and top-k). With equal widths it is the stock call, unchanged.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import transformers
from transformers import GenerationMixin

RAGGED_KEY = "moe_prune_ragged"
CLASS_PREFIX = "Ragged"


def _set(obj: Any, dotted: str, value: int) -> None:
    """Set a possibly nested config field (e.g. dbrx's `ffn_config.moe_num_experts`)."""
    *parents, last = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def text_config(config: Any) -> Any:
    """The config holding the MoE fields and the block: a wrapper's text config, else `config` itself."""
    text = getattr(config, "text_config", None)
    return text if text is not None and hasattr(text, RAGGED_KEY) else config


def layer_config(config: Any, spec: dict[str, Any], layer: int) -> Any:
    """A copy of the (text) `config` whose expert-count and top-k fields describe MoE layer `layer`."""
    layer_cfg = copy.deepcopy(text_config(config))
    for key in spec["count_keys"]:
        _set(layer_cfg, key, int(spec["experts_per_layer"][str(layer)]))
    for key in spec["top_k_keys"]:
        _set(layer_cfg, key, int(spec["top_k_per_layer"][str(layer)]))
    return layer_cfg


def rebuild_moe_blocks(model: Any, config: Any) -> None:
    """Replace each MoE layer's block (or its listed modules) by one of the same class sized for that layer."""
    spec = getattr(text_config(config), RAGGED_KEY)
    layers = model.get_submodule(spec["layers"])
    blocks = spec["block"] if isinstance(spec["block"], list) else [spec["block"]]
    for key in spec["experts_per_layer"]:
        layer = int(key)
        for block in blocks:
            parent_path, _, name = block.rpartition(".")
            owner = layers[layer].get_submodule(parent_path) if parent_path else layers[layer]
            block_class = type(getattr(owner, name))
            kwargs = {"layer_idx": layer} if "layer_idx" in inspect.signature(block_class.__init__).parameters else {}
            setattr(owner, name, block_class(layer_config(config, spec, layer), **kwargs))


class RaggedMixin:
    """Build the stock model, then resize its MoE blocks layer by layer."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        rebuild_moe_blocks(self, config)
        self.post_init()

    @classmethod
    def own_config(cls, config: Any) -> Any:
        """A wrapper's config as the class takes it: its text config where the class is the text model's
        (AutoModelForCausalLM swaps it so for transformers' classes, not for a checkpoint's own)."""
        text = getattr(config, "text_config", None)
        if text is None or isinstance(config, cls.config_class) or not isinstance(text, cls.config_class):
            return config
        quantization = getattr(config, "quantization_config", None)
        if quantization is not None:
            text.quantization_config = quantization
        return text

    @classmethod
    def from_pretrained(cls, *args: Any, config: Any = None, **kwargs: Any) -> Any:
        """transformers' loading, with a wrapper's config swapped for its text config where the class needs it."""
        if hasattr(config, "to_dict"):  # a config object, not a path or None
            config = cls.own_config(config)
        return super().from_pretrained(*args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any) -> Any:
        """transformers' building from a config, with the same swap as `from_pretrained`."""
        return super()._from_config(cls.own_config(config), **kwargs)

    @classmethod
    def is_custom_code(cls) -> bool:
        """The family's own transformers class underneath: its checkpoint key conversion must apply."""
        return False


def per_width(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`loss_fn(gate_logits, num_experts, top_k, attention_mask)` over groups of layers of equal width."""
    if getattr(loss_fn, "_moe_prune_per_width", False):
        return loss_fn

    @functools.wraps(loss_fn)
    def wrapped(gate_logits: Any, num_experts: Any = None, top_k: Any = 2, attention_mask: Any = None) -> Any:
        if not isinstance(gate_logits, (tuple, list)) or len({g.shape[-1] for g in gate_logits}) <= 1:
            return loss_fn(gate_logits, num_experts, top_k, attention_mask)
        groups: dict[int, list[Any]] = {}
        for logits in gate_logits:
            groups.setdefault(logits.shape[-1], []).append(logits)
        total = sum(
            len(group) * loss_fn(tuple(group), width, min(top_k, width), attention_mask)
            for width, group in groups.items()
        )
        return total / len(gate_logits)

    wrapped._moe_prune_per_width = True  # type: ignore[attr-defined]
    return wrapped


def __getattr__(name: str) -> type:
    """`Ragged<BaseClass>`: a subclass of transformers' `<BaseClass>` with per-layer expert counts."""
    if not name.startswith(CLASS_PREFIX) or name.startswith("__"):
        raise AttributeError(name)
    base = getattr(transformers, name[len(CLASS_PREFIX) :])
    family = sys.modules[base.__module__]
    if hasattr(family, "load_balancing_loss_func"):
        family.load_balancing_loss_func = per_width(family.load_balancing_loss_func)
    # GenerationMixin listed directly: transformers then keeps this class as is instead of wrapping it.
    bases = (RaggedMixin, base, GenerationMixin)
    cls = type(name, bases, {"__module__": __name__, "__doc__": RaggedMixin.__doc__})
    globals()[name] = cls
    return cls
