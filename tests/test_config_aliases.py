"""A hub config.json may name the routed-expert count by its config class's `attribute_map` alias
(transformers reads either name): every derived family (no table row) reads and rewrites the count under the alias.

Table rows list their aliases by hand (architectures/table.py); this checks the derivation's own list."""

from __future__ import annotations

import pytest
from test_derived import DERIVED, _text_type, tiny_overrides

from moe_prune.architectures import ADAPTERS, get_adapter
from moe_prune.architectures.config import ModelConfig
from moe_prune.architectures.derive_models import config_class
from moe_prune.architectures.derive_shrink import shrink_config

COUNT_NAMES = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}


def _alias_of(model_type: str, canonical: str) -> str | None:
    """The attribute_map name transformers reads as `canonical`, if it has one."""
    return next((a for a, c in getattr(config_class(model_type), "attribute_map", {}).items() if c == canonical), None)


ALIASED = sorted(
    {
        t
        for t in map(_text_type, DERIVED)
        if COUNT_NAMES & set(getattr(config_class(t), "attribute_map", {}).values()) and t not in ADAPTERS
    }
)


@pytest.mark.parametrize("model_type", ALIASED)
def test_expert_count_read_and_rewritten_under_its_alias(model_type):
    cls = config_class(model_type)
    raw = shrink_config(model_type, tiny_overrides(model_type)).to_dict()
    canonical = get_adapter(model_type).expert_count_keys[0]
    alias = _alias_of(model_type, canonical)
    assert alias is not None, f"{canonical} has no attribute_map alias: ALIASED should not list {model_type}"
    n = raw[canonical]
    raw[alias] = raw.pop(canonical)  # the file names the count as a hub checkpoint may
    assert getattr(cls.from_dict(raw), canonical) == n  # transformers reads it
    config = ModelConfig.from_dict(raw)
    assert config.num_experts == n
    shrunk = config.with_expert_count(n // 2, 1).raw
    assert getattr(cls.from_dict(shrunk), canonical) == n // 2
