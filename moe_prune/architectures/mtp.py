"""Multi-token-prediction (MTP) layers: where each family keeps them on disk, as plain data.

DeepSeek-V3 and GLM-4.5 store MTP layer i as decoder layer `num_hidden_layers + i`
(`model.layers.61.*` in DeepSeek-V3: a full decoder layer with an MoE block, plus `enorm`,
`hnorm`, `eh_proj`, `shared_head.*` and `embed_tokens`). Qwen3-Next and Qwen3.5 store them as
`mtp.layers.{i}.*` beside `mtp.fc`, `mtp.pre_fc_norm_*` and `mtp.norm`. transformers' CausalLM
skips these keys on load, vLLM and SGLang load them for speculative decoding and size their MoE
from the same expert-count field as the decoder's. Inside an MTP layer the MoE keys are those of
a decoder layer, so an MTP layer is classified as the virtual decoder layer `num_hidden_layers + i`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_prune.architectures.spec import Adapter

# `layer_prefix` value meaning: numbered like a decoder layer, from num_hidden_layers on.
DECODER_NUMBERING = "{decoder}"


@dataclass(frozen=True)
class MtpFamily:
    """Where a family's MTP layers live: the config key of their count and their on-disk key prefix."""

    count_key: str  # in the text config
    layer_prefix: str = DECODER_NUMBERING  # or a pattern with `{i}`: MTP layer i's prefix, e.g. "mtp.layers.{i}."
    extras: tuple[str, ...] = ()  # key prefixes of MTP tensors outside the layers (dropped with them)


NEXTN = MtpFamily("num_nextn_predict_layers")
QWEN_MTP = MtpFamily("mtp_num_hidden_layers", "mtp.layers.{i}.", ("mtp.",))

MTP_FAMILIES: dict[str, MtpFamily] = {
    "deepseek_v3": NEXTN,
    "glm4_moe": NEXTN,
    "qwen3_next": QWEN_MTP,
    "qwen3_5_moe_text": QWEN_MTP,
}
# Other families: a positive num_nextn_predict_layers means DeepSeek-style layers after the decoder's.
DEFAULT_FAMILY = NEXTN


def mtp_family(model_type: str) -> MtpFamily:
    return MTP_FAMILIES.get(model_type, DEFAULT_FAMILY)


@dataclass(frozen=True)
class MtpLayer:
    """One MTP layer of a checkpoint: its index, on-disk key prefix and virtual decoder prefix."""

    index: int
    prefix: str  # on disk, e.g. "model.layers.61." or "mtp.layers.0."
    virtual: str  # the same layer named as decoder layer num_hidden_layers + index
    layer: int  # num_hidden_layers + index


@dataclass(frozen=True)
class MtpLayout:
    """The MTP facts of one config: the count key, its value and how to name the layers."""

    family: MtpFamily
    adapter: Adapter
    num_layers: int
    declared: int | None  # the config's count (None when the key is absent or not an integer)

    def layer(self, index: int) -> MtpLayer:
        virtual = self.adapter.layer_prefix.format(L=self.num_layers + index)
        own = self.family.layer_prefix
        prefix = virtual if own == DECODER_NUMBERING else own.format(i=index)
        return MtpLayer(index, prefix, virtual, self.num_layers + index)

    def _pattern(self) -> re.Pattern[str]:
        if self.family.layer_prefix == DECODER_NUMBERING:
            head = re.escape(self.adapter.layer_prefix).replace(r"\{L\}", r"(?P<n>\d+)")
        else:
            head = re.escape(self.family.layer_prefix).replace(r"\{i\}", r"(?P<n>\d+)")
        return re.compile(r"^(?P<wrapper>(?:.*\.)?)" + head + r"(?P<rest>.+)$")

    def locate(self, name: str) -> tuple[MtpLayer, str] | None:
        """(MTP layer, wrapper before its prefix) holding tensor `name`, or None for other tensors."""
        m = self._pattern().match(name)
        if m is None:
            return None
        n = int(m["n"])
        index = n - self.num_layers if self.family.layer_prefix == DECODER_NUMBERING else n
        if index < 0:
            return None
        return self.layer(index), m["wrapper"]

    def is_extra(self, name: str) -> bool:
        """MTP tensors outside the layers (Qwen3-Next `mtp.fc`, `mtp.norm`...)."""
        return name.startswith(self.family.extras) if self.family.extras else False


def mtp_layout(adapter: Adapter, text_config: dict, num_layers: int) -> MtpLayout:
    """The MTP layout of a config (`text_config`: the dict holding the MoE fields)."""
    family = mtp_family(adapter.model_type)
    value = text_config.get(family.count_key)
    declared = value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    return MtpLayout(family, adapter, num_layers, declared)


def set_mtp_count(raw: dict, text_key: str | None, family: MtpFamily, count: int) -> dict:
    """`raw` (a config dict, edited in place and returned) with the MTP layer count set to `count`."""
    text = raw[text_key] if text_key else raw
    text[family.count_key] = count
    return raw
