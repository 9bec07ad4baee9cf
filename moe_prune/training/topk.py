"""Change top-k on a loaded model: transformers reads it into module attributes at construction.

`Adapter.runtime_top_k_attrs` names those attributes; they are set on every MoE layer's router, on the
MoE block that holds the router, and on the CausalLM itself (its load-balancing loss reads top-k there).
The saved config gets the final k through `ModelConfig.with_expert_count`.
"""

from __future__ import annotations

from typing import Any

from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError


def max_top_k(config: ModelConfig) -> int:
    """The largest k routing can serve: every expert, or only those of the allowed groups."""
    experts = config.num_experts
    groups = config.n_group
    if groups > 1:
        allowed = int(config.get("topk_group") or groups)
        return allowed * (experts // groups)
    return experts


def check_top_k(config: ModelConfig, k: int, option: str) -> None:
    """Refuse a k that routing cannot serve, naming the limit."""
    limit = max_top_k(config)
    if k < 1:
        raise MoePruneError(f"{option} {k}: top-k must be at least 1")
    if k > limit:
        what = (
            f"the {limit} experts its {config.get('topk_group')} allowed groups hold"
            if limit < config.num_experts
            else f"the {config.num_experts} experts per layer"
        )
        raise MoePruneError(f"{option} {k}: larger than {what} of {config.source}")


def set_top_k(model: Any, config: ModelConfig, k: int) -> None:
    """Make every MoE layer route each token to `k` experts from the next forward on."""
    adapter = config.adapter
    attrs = adapter.runtime_top_k_attrs
    for layer in config.moe_layers:
        router_path = f"{adapter.runtime_layers}.{layer}.{adapter.runtime_router}"
        block_path = router_path.rpartition(".")[0]
        changed = 0
        for module in (model.get_submodule(router_path), model.get_submodule(block_path)):
            changed += _set_attrs(module, attrs, k)
        if not changed:
            raise MoePruneError(
                f"{config.model_type}: no top-k attribute ({', '.join(attrs)}) on the router or MoE block of layer "
                f"{layer}; add the attribute name to runtime_top_k_attrs in moe_prune/architectures/table.py"
            )
    _set_attrs(model, attrs, k)


def _set_attrs(module: Any, attrs: tuple[str, ...], k: int) -> int:
    count = 0
    for attr in attrs:
        value = module.__dict__.get(attr)
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(module, attr, k)
            count += 1
    return count


def top_k_at(step: int, total: int, start: int, end: int) -> int:
    """Linear annealing from `start` (first step) to `end` (last step), rounded to the nearest integer."""
    if total <= 1:
        return end
    return round(start + (end - start) * step / (total - 1))
