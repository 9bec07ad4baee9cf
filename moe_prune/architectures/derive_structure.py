"""Structure of a built model: decoder layer list, router, experts, MoE layers, token mixers.

Read off the modules themselves: an `*Experts` module holds fused parameters with a leading expert
axis, next to a router module holding an [E, H] weight. The MoE layers of a user's config come from
that config built on the meta device (layer rule "derived").
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from moe_prune.architectures.derive_models import DerivationError, build, config_class, first_line
from moe_prune.artifacts.common import parse_json

ROUTER_CLASS = re.compile(r"(Router|TopkRouter|TopKRouter|Gate|Gating)$")
TOKEN_MIXER_CLASS = re.compile(r"(Attention|Mamba|Mixer|DeltaNet|Conv)", re.IGNORECASE)


def _leading_experts(module: torch.nn.Module) -> int | None:
    """The expert count of an experts module: the common leading dimension of its 3-D parameters."""
    dims = {p.shape[0] for p in module.parameters() if p.dim() == 3}
    return dims.pop() if len(dims) == 1 else None


def _is_experts(name: str, module: torch.nn.Module) -> bool:
    """An `*Experts` module with a leading expert axis that is not the always-on shared experts."""
    cls = type(module).__name__
    shared = "shared" in name.rsplit(".", 1)[-1].lower()  # by path: GraniteMoeSharedExperts is routed
    return cls.endswith("Experts") and not shared and _leading_experts(module) is not None


@dataclass(frozen=True)
class Structure:
    """Where the MoE pieces of one model live in memory."""

    layers: str  # module path of the decoder layer list
    moe_layers: tuple[int, ...]
    experts: str  # path inside one decoder layer
    router: str  # the router module (its output carries the logits)
    router_weight: str  # the [E, H] parameter, path inside one decoder layer
    n_experts: int


def find_structure(model: torch.nn.Module, hidden: int) -> Structure:
    """Decoder layer list, experts and router of a built model; DerivationError if there is none."""
    experts = [(n, m) for n, m in model.named_modules() if _is_experts(n, m)]
    if not experts:
        raise DerivationError("no *Experts module with fused 3-D expert parameters")
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    owner = next(((n, m) for n, m in lists if experts[0][0].startswith(n + ".")), None)
    if owner is None:
        raise DerivationError("experts module outside any decoder layer list")
    layers_path, layer_list = owner
    moe, inner = [], set()
    for name, _module in experts:
        match = re.match(re.escape(layers_path) + r"\.(\d+)\.(.+)$", name)
        if match:
            moe.append(int(match[1]))
            inner.add(match[2])
    if len(inner) != 1:
        raise DerivationError(f"experts modules at differing paths {sorted(inner)}")
    experts_path = inner.pop()
    layer = layer_list[moe[0]]
    n = _leading_experts(layer.get_submodule(experts_path))
    router, weight = _find_router(layer, experts_path, n, hidden)
    return Structure(layers_path, tuple(sorted(set(moe))), experts_path, router, weight, n)


def _find_router(layer: torch.nn.Module, experts: str, n: int, hidden: int) -> tuple[str, str]:
    """The router module next to the experts and its [E, H] weight, both relative to the layer."""
    block = experts.rsplit(".", 1)[0] if "." in experts else ""
    scope = layer.get_submodule(block) if block else layer
    prefix = f"{block}." if block else ""
    weights = [
        f"{prefix}{n_}"
        for n_, p in scope.named_parameters()
        if p.dim() == 2 and tuple(p.shape) == (n, hidden) and not f"{prefix}{n_}".startswith(experts + ".")
    ]
    if len(weights) != 1:
        raise DerivationError(f"{len(weights)} router weights of shape [{n}, {hidden}] next to {experts}")
    weight = weights[0]
    parts = weight.split(".")[:-1]
    candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    named = [c for c in candidates if ROUTER_CLASS.search(type(layer.get_submodule(c)).__name__)]
    return (named[0] if named else ".".join(parts)), weight


def token_mixers(model: torch.nn.Module, structure: Structure) -> tuple[str, ...]:
    """Children of decoder layers that mix tokens (attention, SSM, conv), for `finetune --train attention`."""
    names: list[str] = []
    for layer in model.get_submodule(structure.layers):
        for name, child in layer.named_children():
            if TOKEN_MIXER_CLASS.search(type(child).__name__) and name not in names:
                names.append(name)
    return tuple(names) or ("self_attn",)


def moe_layers_of(config: dict[str, Any]) -> list[int]:
    """MoE layer indices of a (text) config dict: the layers that get an experts module on the meta device."""
    return list(_moe_layers_cached(json.dumps(config, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=64)
def _moe_layers_cached(blob: str) -> tuple[int, ...]:
    raw = parse_json(blob, "config.json", "config")  # our own dump of a config already read by parse_json
    cls = config_class(raw["model_type"])
    try:
        model = build(cls.from_dict(cls._decode_special_floats(raw)))  # {"__float__": "Infinity"} as from_pretrained
    except Exception as exc:
        raise ValueError(first_line(exc)) from exc
    moe = []
    for name, module in model.named_modules():
        if _is_experts(name, module) and (m := re.match(r"^(.*?)\.(\d+)\.", name)):
            moe.append(int(m[2]))
    return tuple(sorted(set(moe)))
