"""The size bounds of config.json (`check_sizes`) hold every real family's config and refuse nonsense in any field.

Real configs come from transformers itself: the default config of every family of the table.
"""

from __future__ import annotations

import pytest

from moe_prune.architectures import ADAPTERS
from moe_prune.architectures.config import TEXT_CONFIG_KEYS
from moe_prune.architectures.config_checks import MAX_SIZE, POSITIVE_SIZES, check_sizes
from moe_prune.errors import MoePruneError


def _default_text_config(model_type: str) -> dict:
    from transformers import AutoConfig

    raw = AutoConfig.for_model(model_type).to_dict()
    return next((raw[k] for k in TEXT_CONFIG_KEYS if isinstance(raw.get(k), dict)), raw)


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_transformers_default_config_of_every_family_passes(model_type):
    check_sizes(_default_text_config(model_type), "config.json")


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "qwen3_moe", "gpt_oss"])
def test_each_positive_size_at_zero_and_beyond_the_bound_is_refused_naming_the_field(model_type):
    text = _default_text_config(model_type)
    present = [key for key in POSITIVE_SIZES if isinstance(text.get(key), int)]
    assert "hidden_size" in present and "max_position_embeddings" in present
    for key in present:
        for value in (0, MAX_SIZE + 1, float(text[key]), str(text[key])):
            with pytest.raises(MoePruneError, match=rf"^config.json: {key} is {value!r}; expected a whole number"):
                check_sizes({**text, key: value}, "config.json")


@pytest.mark.parametrize(
    ("field", "value"),
    [("sliding_window", -1), ("kv_lora_rank", 1 << 40), ("num_nextn_predict_layers", float("nan"))],
)
def test_any_size_like_field_is_bounded_nested_too(field, value):
    with pytest.raises(MoePruneError, match=rf"^config.json: {field} is"):
        check_sizes({field: value}, "config.json")
    with pytest.raises(MoePruneError, match=rf"^config.json: text_config.rope_scaling.{field} is"):
        check_sizes({"rope_scaling": {field: value}}, "config.json", "text_config.")
    check_sizes({field: None, "rope_theta": -1.0, "tie_word_embeddings": True}, "config.json")  # null: the default
