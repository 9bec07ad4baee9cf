"""Multi-token-prediction (MTP) layers: where each family keeps them on disk, as plain data.

transformers' CausalLM never loads MTP weights: it lists their keys in `_keys_to_ignore_on_load_unexpected`
(so they load silently), and vLLM and SGLang load them for speculative decoding, sizing their MoE from
the same expert-count field as the decoder's. Those ignore patterns are where each row below comes from
(`tests/test_mtp.py` checks the table against the installed transformers):

- decoder numbering (`model\\.layers\\.61.*` in DeepSeek-V3: the pattern names layer num_hidden_layers):
  MTP layer i is decoder layer `num_hidden_layers + i`, a full decoder layer plus `enorm`, `hnorm`,
  `eh_proj`, `shared_head.*` and `embed_tokens`;
- an MTP subtree (`^mtp.*`, `^model\\.mtp\\.`, `model\\.mtp_layers\\..*`, `mtp`): every tensor the pattern
  matches is MTP; layer i's decoder block sits under `layer_prefix` with `{i}`, the rest of the subtree
  (Qwen3-Next and Mellum `mtp.fc`, `mtp.pre_fc_norm_*`, `mtp.norm`; ERNIE `model.mtp_linear_proj.0`)
  travels with the layers. The block's own layout: transformers' `MtpModel` conversion (`layers.{k}.` after
  removing `model.` and `mtp.`) for Mellum; vLLM's MTP model files for the others (qwen3_next_mtp,
  exaone_moe_mtp: `mtp.layers.{i}`; ernie_mtp: `model.mtp_block.{i}`; nemotron_h_mtp: `mtp.layers.{i}`,
  where one MTP step is `len(mtp_layers_block_type)` numbered layers, attention then MoE by default).

Inside an MTP layer the MoE keys are those of a decoder layer, so an MTP layer is classified as the virtual
decoder layer `num_hidden_layers + i`. A tensor that looks like MTP (a name part mentioning mtp or nextn, or
the family's pattern) but that the layout cannot place is refused by `checkpoint.mtp_tensors.MtpTensors.split`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_prune.architectures.spec import Adapter

# `layer_prefix` value meaning: numbered like a decoder layer, from num_hidden_layers on.
DECODER_NUMBERING = "{decoder}"
# Config keys releases use for the MTP layer count (the family's own first); --drop-mtp zeroes every one present.
COUNT_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers", "num_mtp_modules")
# A name part mentioning mtp or nextn: an MTP tensor in any family's naming.
MTP_LIKE = re.compile(r"(?:^|\.)[^.]*(?:mtp|nextn)[^.]*\.", re.IGNORECASE)


@dataclass(frozen=True)
class MtpFamily:
    """Where a family's MTP layers live: the config key of their count and their on-disk keys.

    `layer_prefix` None: no MTP layer is placed; tensors matching `ignore` are then extras, copied whole or
    dropped, and prune and merge refuse any of them naming experts or a router unless it is dropped.
    """

    count_key: str  # in the text config
    layer_prefix: str | None = DECODER_NUMBERING  # or MTP layer i's prefix with `{i}`, e.g. "mtp.layers.{i}."
    ignore: str | None = None  # transformers' pattern matching every MTP tensor (searched like transformers does)
    # Config keys listing the sublayers of one MTP step (a list, or a pattern string with one character each),
    # for families whose step is several numbered layers (Nemotron-H: attention, then MoE); none: one layer a step.
    step_keys: tuple[str, ...] = ()

    @property
    def known(self) -> bool:
        """Does the family have MTP tensors moe-prune recognises (placed in layers or not)?"""
        return self.layer_prefix is not None or self.ignore is not None


NEXTN = MtpFamily("num_nextn_predict_layers")
QWEN_MTP = MtpFamily("mtp_num_hidden_layers", "mtp.layers.{i}.", r"^mtp.*")
NO_MTP = MtpFamily("num_nextn_predict_layers", None)

MTP_FAMILIES: dict[str, MtpFamily] = {
    "deepseek_v3": NEXTN,  # model\.layers\.61.*; count key: transformers' attribute_map (num_mtp_layers)
    "deepseek_v32": NEXTN,  # model\.layers\.61.*
    "glm4_moe": NEXTN,  # model\.layers\.92.*, model\.layers\.46.*; attribute_map
    "glm4_moe_lite": NEXTN,  # model\.layers\.47.*
    "glm_moe_dsa": NEXTN,  # model\.layers\.78.*
    "hy_v3": NEXTN,  # model\.layers\.80.*
    "bailing_hybrid": NEXTN,  # model\.layers\.42\..*; attribute_map
    # ^model\.(language_model\.)?layers\.46\. and ^model\.(language_model\.)?mtp\.: both numbering and a subtree
    "dots3_note_text": MtpFamily("num_nextn_predict_layers", DECODER_NUMBERING, r"^model\.(language_model\.)?mtp\."),
    "qwen4_exp_text": QWEN_MTP,  # ^mtp.*
    "qwen3_next": QWEN_MTP,  # ^mtp.*; count key as in the released config.json and vLLM qwen3_next_mtp
    "qwen3_5_moe_text": QWEN_MTP,  # ^mtp.*
    # ^mtp\.; attribute_map num_mtp_layers -> num_nextn_predict_layers; MtpModel: mtp.layers.0 + mtp.fc/norm
    "mellum": MtpFamily("num_nextn_predict_layers", "mtp.layers.{i}.", r"^mtp\."),
    "exaone_moe": MtpFamily("num_nextn_predict_layers", "mtp.layers.{i}.", r"mtp.*"),  # vLLM exaone_moe_mtp
    "hy_v4": MtpFamily("num_nextn_predict_layers", "model.mtp_layers.{i}.", r"model\.mtp_layers\..*"),
    "mimo_v2_flash": MtpFamily("num_nextn_predict_layers", "model.mtp.layers.{i}.", r"^model\.mtp\."),
    "minimax_m3_vl_text": MtpFamily("num_mtp_modules", "mtp.layers.{i}.", r"(^|\.)mtp\..*"),
    "ernie4_5_moe": MtpFamily("num_nextn_predict_layers", "model.mtp_block.{i}.", r"mtp"),  # vLLM ernie_mtp
    # mtp.*; vLLM nemotron_h_mtp: one step is len(mtp_layers_block_type) numbered layers `mtp.layers.{i}` (default
    # attention, then MoE; releases may carry the legacy pattern string, "*E"), each a decoder block of its type,
    # the first with enorm/hnorm/eh_proj and the last with final_layernorm; the MoE one sized by n_routed_experts
    "nemotron_h": MtpFamily(
        "num_nextn_predict_layers",
        "mtp.layers.{i}.",
        r"mtp.*",
        ("mtp_layers_block_type", "mtp_hybrid_override_pattern"),
    ),
    # model\.mtp\..*; count key num_mtp_layers (no alias); its MTP layers are always dense (transformers'
    # mtp_mlp_layer_types): no MTP MoE to edit, so they are copied whole (ragged results too) or dropped; an MTP
    # tensor naming routed experts is no layout transformers knows, and is refused unless --drop-mtp
    "inkling_text": MtpFamily("num_mtp_layers", None, r"model\.mtp\..*"),
    # model\.mtp.*; no count key (vLLM longcat_flash_mtp: always one layer) and a dense MTP layer (vLLM sets
    # n_routed_experts None for it): nothing to place or edit, its tensors are copied whole or dropped
    "longcat_flash": MtpFamily("num_nextn_predict_layers", None, r"model\.mtp.*"),
}


def mtp_family(model_type: str) -> MtpFamily:
    """The family's MTP layout; NO_MTP for families transformers names no MTP tensors for."""
    return MTP_FAMILIES.get(model_type, NO_MTP)


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
    declared: int | None  # the config's count (None when no count key is set to an integer)
    step_layers: int = 1  # numbered layers per MTP step (Nemotron-H: len(mtp_layers_block_type))

    @property
    def declared_layers(self) -> int | None:
        """How many numbered MTP layers the config allows (steps times layers a step)."""
        return None if self.declared is None else self.declared * self.step_layers

    def layer(self, index: int) -> MtpLayer:
        virtual = self.adapter.layer_prefix.format(L=self.num_layers + index)
        own = self.family.layer_prefix
        prefix = virtual if own == DECODER_NUMBERING or own is None else own.format(i=index)
        return MtpLayer(index, prefix, virtual, self.num_layers + index)

    def _pattern(self) -> re.Pattern[str]:
        own = self.family.layer_prefix
        if own == DECODER_NUMBERING:
            head = re.escape(self.adapter.layer_prefix).replace(r"\{L\}", r"(?P<n>\d+)")
        else:
            head = re.escape(str(own)).replace(r"\{i\}", r"(?P<n>\d+)")
        return re.compile(r"^(?P<wrapper>(?:.*\.)?)" + head + r"(?P<rest>.+)$")

    def locate(self, name: str) -> tuple[MtpLayer, str] | None:
        """(MTP layer, wrapper before its prefix) holding tensor `name`, or None for other tensors."""
        own = self.family.layer_prefix
        if own is None or (own != DECODER_NUMBERING and not self.is_extra(name)):
            return None  # outside transformers' pattern: not where the family keeps MTP layers
        m = self._pattern().match(name)
        if m is None:
            return None
        n = int(m["n"])
        index = n - self.num_layers if self.family.layer_prefix == DECODER_NUMBERING else n
        if index < 0:
            return None
        return self.layer(index), m["wrapper"]

    def is_extra(self, name: str) -> bool:
        """MTP tensors outside the layers (Qwen3-Next `mtp.fc`, `mtp.norm`...): the family's pattern matches."""
        return bool(self.family.ignore and re.search(self.family.ignore, name))

    def looks_mtp(self, name: str) -> bool:
        """A tensor named like an MTP one, placed or not (what must never be copied unedited by accident)."""
        return bool(MTP_LIKE.search(name)) or self.is_extra(name)

    def describe(self) -> str:
        """The layout in words, for refusals."""
        own = self.family.layer_prefix
        if own is None and self.family.ignore:
            return (
                f"{self.adapter.model_type} keeps multi-token-prediction tensors under keys matching "
                f"{self.family.ignore}, in layers moe-prune does not place"
            )
        if own is None:
            return f"{self.adapter.model_type} has no known multi-token-prediction layout"
        if own == DECODER_NUMBERING:
            where = f"decoder layers from {self.num_layers} on"
        else:
            where = f"{own.replace('{i}', '<i>')}*"
            if self.family.ignore:
                where += f" and keys matching {self.family.ignore}"
        return f"{self.adapter.model_type} keeps multi-token-prediction layers as {where}"


# transformers' NemotronHConfig default for mtp_layers_block_type (a release config without the key gets it).
_DEFAULT_STEP = ("full_attention", "moe")


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def mtp_layout(adapter: Adapter, text_config: dict, num_layers: int) -> MtpLayout:
    """The MTP layout of a config (`text_config`: the dict holding the MoE fields)."""
    family = mtp_family(adapter.model_type)
    keys = (family.count_key, *COUNT_KEYS)
    declared = next((c for key in keys if (c := _count(text_config.get(key))) is not None), None)
    steps = [len(v) for key in family.step_keys if isinstance(v := text_config.get(key), (list, str)) and v]
    step = steps[0] if steps else len(_DEFAULT_STEP) if family.step_keys else 1
    return MtpLayout(family, adapter, num_layers, declared, step)


def set_mtp_count(raw: dict, text_key: str | None, family: MtpFamily, count: int) -> dict:
    """`raw` (a config dict, edited in place and returned) with the MTP layer count set to `count`.

    Every count key present is set (releases differ in which they carry), and the family's own key always
    for families with MTP layers: transformers defaults it to 1 where it is absent (DeepSeek-V3, GLM-4.5).
    """
    text = raw[text_key] if text_key else raw
    keys = [key for key in dict.fromkeys((family.count_key, *COUNT_KEYS)) if key in text]
    if family.known and family.count_key not in keys:
        keys.append(family.count_key)
    for key in keys:
        text[key] = count
    return raw
