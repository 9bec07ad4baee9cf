"""The table's token mixers (`Adapter.runtime_attention`, what `finetune --train attention` trains) are the
decoder layers' real ones, for the hybrid families whose row lists them (Mamba, conv, linear attention).

A path missing from a row leaves that mixer frozen under `--train attention` without a word; a misspelt one
names nothing. The derivation reads the mixers off transformers' own tiny model (`derive_structure.token_mixers`):
every one it finds must be listed, and every listed path beyond the Adapter default must be found. Families
whose row sets the field but that the derivation cannot read are named with the reason (and held to it).
"""

from __future__ import annotations

import dataclasses

import pytest
from test_derived import tiny_overrides

from moe_prune.architectures import ADAPTERS
from moe_prune.architectures.derive import derive
from moe_prune.architectures.derive_models import DerivationError
from moe_prune.architectures.spec import Adapter

DEFAULT = next(f.default for f in dataclasses.fields(Adapter) if f.name == "runtime_attention")
# The derivation cannot read these rows (test_derived.py's TABLE_ONLY and the shrinker's gaps).
NOT_DERIVED = {
    "dbrx": "experts are 2-D blocks, not fused 3-D tensors",
    "inkling_text": "its router weights are not found next to mlp.experts in the shrunk model",
    "jetmoe": "its experts modules sit at differing paths",
}
# Families with token mixers besides self_attn (named here, not read off their rows, so a row that loses one is
# still checked), and the rows that name other paths.
HYBRID = ["granitemoehybrid", "jamba", "lfm2_moe", "qwen3_next", "qwen3_5_moe_text", *NOT_DERIVED]


def test_every_row_naming_its_mixers_is_checked():
    assert {t for t, a in ADAPTERS.items() if a.runtime_attention != DEFAULT} <= set(HYBRID)


@pytest.mark.parametrize("model_type", HYBRID)
def test_token_mixers_of_the_table_are_the_models(model_type):
    listed = set(ADAPTERS[model_type].runtime_attention)
    if model_type in NOT_DERIVED:
        with pytest.raises(DerivationError):
            derive(model_type, tiny_overrides(model_type))
        return
    found = set(derive(model_type, tiny_overrides(model_type)).adapter.runtime_attention)
    assert found - listed == set(), f"{model_type}: token mixers --train attention would leave frozen"
    assert listed - set(DEFAULT) <= found, f"{model_type}: listed paths that name no module"
    assert found != {"self_attn"}, f"{model_type}: not a hybrid; the check is vacuous"
