"""Multi-token-prediction (MTP) layers survive `prune` and `merge`, or leave with `--drop-mtp`.

Every family whose transformers CausalLM names MTP keys in `_keys_to_ignore_on_load_unexpected` is built
tiny (its config class, `from_config`, `save_pretrained`), then gets MTP tensors in the on-disk layout those
keys describe: DeepSeek-V3, GLM-4.5 and the other decoder-numbered families keep MTP layer 0 as decoder
layer `num_hidden_layers` (`model.layers.61.*` in DeepSeek-V3) with `enorm`, `hnorm`, `eh_proj`,
`shared_head.*` and `embed_tokens` beside a full decoder layer; Qwen3-Next, Qwen3.5, Mellum and EXAONE-MoE
keep `mtp.layers.0.*` beside `mtp.fc`, `mtp.pre_fc_norm_*` and `mtp.norm`; HunYuan-V4, MiMo-V2-Flash and
MiniMax-M3 keep layer 0 under `model.mtp_layers.0.`, `model.mtp.layers.0.` and `mtp.layers.0.`; ERNIE 4.5
keeps `model.mtp_block.0.*` beside `model.mtp_emb_norm.0`, `model.mtp_hidden_norm.0`, `model.mtp_linear_proj.0`;
Nemotron-H's one MTP step is two numbered layers (vLLM nemotron_h_mtp, mtp_layers_block_type attention then MoE):
`mtp.layers.0.` an attention block with `enorm`, `hnorm`, `eh_proj`, `mtp.layers.1.` the MoE block with
`final_layernorm`.
The MTP layer's decoder part is a copy of the last decoder layer, so after any edit its MoE tensors must be
byte-equal to that layer's.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from helpers import checkpoint_tensors as all_tensors
from safetensors.torch import load_file, save_file
from test_adapters import random_keep
from test_merge import synthetic_stats
from test_prune import write_mask
from tiny_models import TINY
from typer.testing import CliRunner

from moe_prune.architectures.mtp import DECODER_NUMBERING, MTP_FAMILIES, mtp_family, mtp_layout, set_mtp_count
from moe_prune.architectures.table import REFUSED
from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge, prune

runner = CliRunner()
H, V = 32, 128  # hidden size and vocabulary of tiny_models.COMMON and of derive.shrink_config

# Per-layer extras of DeepSeek-style MTP layers (inside the layer's prefix).
NEXTN_EXTRAS = {
    "enorm.weight": (H,),
    "hnorm.weight": (H,),
    "eh_proj.weight": (H, 2 * H),
    "shared_head.norm.weight": (H,),
    "shared_head.head.weight": (V, H),
    "embed_tokens.weight": (V, H),
}
QWEN_EXTRAS = {
    "mtp.fc.weight": (H, 2 * H),
    "mtp.pre_fc_norm_embedding.weight": (H,),
    "mtp.pre_fc_norm_hidden.weight": (H,),
    "mtp.norm.weight": (H,),
}
ERNIE_EXTRAS = {
    "model.mtp_emb_norm.0.weight": (H,),
    "model.mtp_hidden_norm.0.weight": (H,),
    "model.mtp_linear_proj.0.weight": (H, 2 * H),
}
# Nemotron-H's MTP step (tiny shrink sizes: 4 query and 2 key/value heads of 8): layer 0 attention, layer 1 MoE.
NEMOTRON_EXTRAS = {
    "mtp.layers.0.enorm.weight": (H,),
    "mtp.layers.0.hnorm.weight": (H,),
    "mtp.layers.0.eh_proj.weight": (H, 2 * H),
    "mtp.layers.0.norm.weight": (H,),
    "mtp.layers.0.mixer.q_proj.weight": (H, H),
    "mtp.layers.0.mixer.k_proj.weight": (16, H),
    "mtp.layers.0.mixer.v_proj.weight": (16, H),
    "mtp.layers.0.mixer.o_proj.weight": (H, H),
    "mtp.layers.1.final_layernorm.weight": (H,),
}
# family -> (prefix of the MTP MoE layer, or None for decoder numbering; extra tensors outside it and their shapes)
PLACES: dict[str, tuple[str | None, dict]] = {
    **dict.fromkeys(
        ("deepseek_v3", "glm4_moe", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "hy_v3", "bailing_hybrid"),
        (None, {}),
    ),
    **dict.fromkeys(("qwen3_next", "qwen3_5_moe_text", "mellum", "exaone_moe"), ("mtp.layers.0.", QWEN_EXTRAS)),
    "hy_v4": ("model.mtp_layers.0.", {}),
    "mimo_v2_flash": ("model.mtp.layers.0.", {}),
    "minimax_m3_vl_text": ("mtp.layers.0.", {}),
    "ernie4_5_moe": ("model.mtp_block.0.", ERNIE_EXTRAS),
    "dots3_note_text": (None, {"model.mtp.norm.weight": (H,)}),  # decoder numbering and an mtp subtree
    "qwen4_exp_text": ("mtp.layers.0.", QWEN_EXTRAS),
    "nemotron_h": ("mtp.layers.1.", NEMOTRON_EXTRAS),
}
FAMILIES = [t for t in PLACES if t not in REFUSED]
MOE_INDEX = {"nemotron_h": 1}  # the MTP layer holding the MoE block where it is not layer 0
_BUILT: dict[str, object] = {}


@pytest.fixture(scope="module")
def family_factory(tiny_factory, tmp_path_factory):
    """`family_factory(model_type)` -> a tiny model's folder: tiny_models.py's config, else class defaults shrunk."""

    def make(model_type: str):
        if model_type in TINY:
            return tiny_factory(model_type)[0]
        if model_type not in _BUILT:
            from transformers import AutoModelForCausalLM

            from moe_prune.architectures.derive_shrink import shrink_config

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(shrink_config(model_type))
            with torch.no_grad():  # default init is tiny; make experts and routers matter
                for name, param in model.named_parameters():
                    if any(part in name for part in ("experts", "router", "gate")):
                        param.normal_(0.0, 0.3)
            folder = tmp_path_factory.mktemp(model_type) / "model"
            model.save_pretrained(folder)
            _BUILT[model_type] = folder
        return _BUILT[model_type]

    return make


def layout_of(model_type: str, folder) -> tuple[str, str, dict]:
    """(config key of the MTP count, prefix of MTP layer 0, every MTP tensor outside the copied layer: shape)."""
    own, extras = PLACES[model_type]
    prefix = own or f"model.layers.{Checkpoint.open(folder).config.num_layers}."
    if own is None or not extras:  # DeepSeek-style extras inside the layer
        extras = {**extras, **{prefix + k: s for k, s in NEXTN_EXTRAS.items()}}
    return mtp_family(model_type).count_key, prefix, extras


def with_mtp(factory, model_type: str, tmp_path):
    """(tiny model copy WITH one MTP layer, the model's folder without, MTP prefix, last MoE layer's prefix)."""
    plain = factory(model_type)
    folder = tmp_path / f"{model_type}-mtp"
    shutil.copytree(plain, folder)
    key, prefix, extras = layout_of(model_type, plain)
    config = json.loads((folder / "config.json").read_text())
    config[key] = 1
    (folder / "config.json").write_text(json.dumps(config))
    config_of = Checkpoint.open(plain).config
    last = config_of.adapter.layer_prefix.format(L=config_of.moe_layers[-1])
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for name in [n for n in tensors if n.startswith(last)]:
        tensors[prefix + name[len(last) :]] = tensors[name].clone()
    for name, shape in extras.items():
        tensors[name] = torch.randn(shape, generator=generator).to(tensors[next(iter(tensors))].dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, plain, prefix, last


def mtp_names(tensors: dict, folder, model_type: str) -> set[str]:
    """The MTP tensors among `tensors` (`folder`: the model without MTP, for the layer count)."""
    _, prefix, extras = layout_of(model_type, folder)
    return {n for n in tensors if n.startswith(prefix) or n in extras}


def experts_of(tensors: dict, prefix: str, experts: str = "mlp.experts.") -> set[int]:
    """Expert ids under `prefix` + `experts`: per-expert keys, else the leading axis of fused expert tensors."""
    pattern = re.compile(re.escape(prefix + experts) + r"(\d+)\.")
    ids = {int(m[1]) for name in tensors if (m := pattern.match(name))}
    fused = {t.shape[0] for name, t in tensors.items() if name.startswith(prefix + experts) and t.dim() == 3}
    assert not (ids and fused) and len(fused) <= 1, fused
    return ids or set(range(fused.pop() if fused else 0))


def assert_mirrors_last_layer(out: dict, prefix: str, last: str) -> None:
    """Every MTP decoder tensor equals the last decoder layer's (both were copies before the edit)."""
    layer = {name[len(last) :] for name in out if name.startswith(last)}
    mirrored = {name[len(prefix) :] for name in out if name.startswith(prefix)}
    assert layer <= mirrored, sorted(layer - mirrored)[:3]
    for rest in layer:
        assert torch.equal(out[prefix + rest], out[last + rest]), rest


def stock_logits(folder) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(torch.arange(3, 30).reshape(1, -1)).logits


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prune_gives_mtp_the_last_layers_experts(model_type, family_factory, tmp_path):
    folder, plain, prefix, last = with_mtp(family_factory, model_type, tmp_path)
    ckpt = Checkpoint.open(folder)
    assert ckpt.identity.moe_layers == Checkpoint.open(plain).identity.moe_layers  # MTP is no decoder MoE layer
    keep = random_keep(ckpt, 4, seed=1)
    result = prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    plain_keep = DropMask.create(Checkpoint.open(plain).identity, keep, "test")
    prune.run(plain, plain_keep, tmp_path / "plain")

    src, out, reference = all_tensors(folder), all_tensors(tmp_path / "out"), all_tensors(tmp_path / "plain")
    pruned = Checkpoint.open(tmp_path / "out")  # validates the MTP MoE against the config
    adapter = ckpt.config.adapter
    assert pruned.config.num_experts == 4 and experts_of(out, prefix, adapter.experts) == set(range(4))
    assert_mirrors_last_layer(out, prefix, last)
    layer = ckpt.config.moe_layers[-1]
    rows = sorted(keep[layer])  # original ids are the input's slots
    assert out[prefix + adapter.router].shape[0] == 4
    assert torch.equal(out[prefix + adapter.router], src[prefix + adapter.router][rows])
    if adapter.selection_bias and prefix + adapter.selection_bias in src:
        assert torch.equal(out[prefix + adapter.selection_bias], src[prefix + adapter.selection_bias][..., rows])
    for name in layout_of(model_type, plain)[2]:
        assert torch.equal(out[name], src[name]), name
    rest = {n: t for n, t in out.items() if n not in mtp_names(out, plain, model_type)}
    assert rest.keys() == reference.keys() and all(torch.equal(t, reference[n]) for n, t in rest.items())
    assert torch.equal(stock_logits(tmp_path / "out"), stock_logits(tmp_path / "plain"))  # transformers skips MTP

    manifest = json.loads((tmp_path / "out" / "moe_prune.json").read_text())
    index = str(MOE_INDEX.get(model_type, 0))
    assert manifest["mtp"] == {"layers": {index: {"prefix": prefix, "follows": layer, "slots": rows}}, "dropped": 0}
    assert result.mtp == [f"multi-token-prediction layer {prefix}: experts of layer {layer} kept"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())[mtp_family(model_type).count_key] == 1


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_applies_the_last_layers_plan_to_mtp(model_type, family_factory, tmp_path):
    folder, _, prefix, last = with_mtp(family_factory, model_type, tmp_path)
    ckpt = Checkpoint.open(folder)
    result = merge.run(folder, synthetic_stats(ckpt), tmp_path / "out", 4)
    out = all_tensors(tmp_path / "out")
    merged = Checkpoint.open(tmp_path / "out")
    assert merged.config.num_experts == 4 and experts_of(out, prefix, ckpt.config.adapter.experts) == set(range(4))
    assert out[prefix + ckpt.config.adapter.router].shape[0] == 4
    assert_mirrors_last_layer(out, prefix, last)
    layer = ckpt.config.moe_layers[-1]
    report = next(r for r in result.layers if r.layer == layer)
    assert any(len(c.members) > 1 for c in report.clusters)  # really merged, not only sliced
    manifest = Manifest.read(tmp_path / "out")
    assert manifest is not None
    record = manifest.mtp[MOE_INDEX.get(model_type, 0)]
    assert (record.prefix, record.follows) == (prefix, layer)
    assert record.slots == manifest.slots[layer] and record.members == manifest.merged[layer]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_drop_mtp_removes_every_mtp_tensor(model_type, family_factory, tmp_path):
    folder, plain, _, _ = with_mtp(family_factory, model_type, tmp_path)
    ckpt = Checkpoint.open(folder)
    keep = random_keep(ckpt, 4, seed=2)
    args = ["prune", str(folder), "--mask", write_mask(tmp_path / "mask.json", ckpt, keep)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--drop-mtp"])
    assert result.exit_code == 0, result.output
    prune.run(plain, DropMask.create(Checkpoint.open(plain).identity, keep, "test"), tmp_path / "plain")
    out, reference = all_tensors(tmp_path / "out"), all_tensors(tmp_path / "plain")
    src = all_tensors(folder)
    n_mtp = len(src) - len(all_tensors(plain))
    assert len(mtp_names(src, plain, model_type)) == n_mtp  # the names below cover every MTP tensor
    assert f"--drop-mtp: removed 1 multi-token-prediction layer(s) ({n_mtp} tensors)" in result.output
    assert not mtp_names(out, plain, model_type) and out.keys() == reference.keys()
    key = mtp_family(model_type).count_key
    assert json.loads((tmp_path / "out" / "config.json").read_text())[key] == 0
    assert json.loads((tmp_path / "out" / "moe_prune.json").read_text())["mtp"] == {"layers": {}, "dropped": 1}

    merge.run(folder, synthetic_stats(ckpt), tmp_path / "merged", 4, MergeSpec(drop_mtp=True))
    merged = all_tensors(tmp_path / "merged")
    assert not mtp_names(merged, plain, model_type) and merged.keys() == reference.keys()
    assert json.loads((tmp_path / "merged" / "config.json").read_text())[key] == 0


# families whose vLLM MTP class moe-prune's plugin does not size (checkpoint/serving.py Served.mtp; GLM-4-MoE,
# GLM-4-MoE-Lite and DeepSeek-V3 keep theirs: tests/test_ragged_mtp.py), or builds dense (ERNIE-4.5: mtp_moe False;
# its dense MTP layer is kept, tests/test_ragged_mtp.py)
@pytest.mark.parametrize("model_type", ["qwen3_next", "mellum", "ernie4_5_moe"])
def test_ragged_result_with_mtp_is_refused_unless_dropped(model_type, family_factory, tmp_path):
    folder, plain, prefix, _ = with_mtp(family_factory, model_type, tmp_path)
    ckpt = Checkpoint.open(folder)
    first, second = ckpt.identity.moe_layers[-2:]
    keep = {layer: list(range(8)) for layer in ckpt.identity.moe_layers}
    keep |= {first: [0, 1, 4, 5], second: [0, 1, 2, 4, 5, 6]}
    mask = DropMask.create(ckpt.identity, keep, "test")
    with pytest.raises(MoePruneError, match=rf"different expert counts.*{re.escape(prefix)}.*--drop-mtp"):
        prune.run(folder, mask, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MoePruneError, match="--drop-mtp"):
        merge.run(folder, synthetic_stats(ckpt), tmp_path / "out", 4, keep_overrides={first: 6})
    prune.run(folder, mask, tmp_path / "out", drop_mtp=True)
    assert not mtp_names(all_tensors(tmp_path / "out"), plain, model_type)


def test_second_prune_follows_and_a_foreign_record_is_refused(family_factory, tmp_path):
    folder, _, prefix, last = with_mtp(family_factory, "glm4_moe", tmp_path)
    ckpt = Checkpoint.open(folder)
    prune.run(folder, DropMask.create(ckpt.identity, random_keep(ckpt, 2, seed=3), "test"), tmp_path / "once")
    once = Checkpoint.open(tmp_path / "once")
    keep = random_keep(once, 3, seed=4)
    prune.run(tmp_path / "once", DropMask.create(once.identity, keep, "test"), tmp_path / "twice")
    out = all_tensors(tmp_path / "twice")
    assert experts_of(out, prefix) == set(range(3))
    assert_mirrors_last_layer(out, prefix, last)
    layer = ckpt.config.moe_layers[-1]
    assert Manifest.read(tmp_path / "twice").mtp[0].slots == tuple(sorted(keep[layer]))

    path = tmp_path / "once" / "moe_prune.json"
    manifest = json.loads(path.read_text())
    manifest["mtp"]["layers"]["0"]["slots"] = manifest["layers"][str(ckpt.config.moe_layers[0])]["slots"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(MoePruneError, match="MTP layer 0 does not hold the experts"):
        Checkpoint.open(tmp_path / "once").manifest  # noqa: B018 (reading it is the check)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_next"])
def test_mtp_moe_that_disagrees_with_the_config_is_refused(model_type, family_factory, tmp_path):
    folder, _, prefix, _ = with_mtp(family_factory, model_type, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors[f"{prefix}mlp.experts.7.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=rf"lacks {re.escape(prefix)}mlp\.experts\.7\.up_proj\.weight"):
        Checkpoint.open(folder)
    tensors[f"{prefix}mlp.experts.7.up_proj.weight"] = tensors[f"{prefix}mlp.experts.6.up_proj.weight"].clone()
    tensors[f"{prefix}mlp.gate.weight"] = tensors[f"{prefix}mlp.gate.weight"][:6].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=rf"multi-token-prediction layer {re.escape(prefix)} has 8"):
        Checkpoint.open(folder)


def test_deepseek_mtp_layer_loads_in_stock_transformers_after_prune(family_factory, tmp_path):
    """transformers' own MtpModel (generate(use_mtp=True)) loads the pruned MTP layer: no missing or mis-sized key."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    folder, _, prefix, _ = with_mtp(family_factory, "deepseek_v3", tmp_path)
    ckpt = Checkpoint.open(folder)
    prune.run(folder, DropMask.create(ckpt.identity, random_keep(ckpt, 4, seed=5), "test"), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    # DeepSeek-V3 registers its MTP keys as model.layers.61.*; the tiny model's MTP layer is layer 3.
    model._keys_to_ignore_on_load_unexpected = [re.escape(prefix) + ".*"]
    mtp = MtpModel.from_pretrained(model)
    experts = mtp.layers[0].mtp_block.mlp.experts
    assert experts.gate_up_proj.shape[0] == 4 and mtp.layers[0].mtp_block.mlp.gate.weight.shape[0] == 4
    out = all_tensors(tmp_path / "out")
    assert torch.equal(mtp.layers[0].mtp_block.mlp.gate.weight.detach(), out[f"{prefix}mlp.gate.weight"])


def test_mellum_mtp_layer_loads_in_stock_transformers_after_prune(family_factory, tmp_path):
    """transformers' MtpModel reads the pruned Mellum MTP layer through Mellum's own ignore pattern (no override):
    an independent check of the `mtp.layers.0.` + `mtp.fc` layout and of its pruned MoE."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    folder, _, prefix, _ = with_mtp(family_factory, "mellum", tmp_path)
    ckpt = Checkpoint.open(folder)
    prune.run(folder, DropMask.create(ckpt.identity, random_keep(ckpt, 4, seed=5), "test"), tmp_path / "out")
    mtp = MtpModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval())
    out = all_tensors(tmp_path / "out")
    gate = mtp.layers[0].mtp_block.mlp.gate.weight.detach()
    assert gate.shape[0] == 4 and torch.equal(gate, out[f"{prefix}mlp.gate.weight"])
    assert torch.equal(mtp.layers[0].eh_proj.weight.detach(), out["mtp.fc.weight"])


# -- the table agrees with transformers; what it cannot place is refused ---------------------------------------


def _transformers_mtp_patterns(model_type: str) -> list[str]:
    """The MTP entries of the causal LM's `_keys_to_ignore_on_load_unexpected` (subtrees, layers past the decoder)."""
    from moe_prune.architectures.derive_models import causal_lm_class, config_class

    patterns = causal_lm_class(config_class(model_type)())._keys_to_ignore_on_load_unexpected or []
    return [p for p in patterns if "mtp" in p or re.search(r"layers\\\.\d+", p)]


def test_every_mtp_family_of_transformers_has_its_layout():
    """Derived from transformers: a layout per family whose CausalLM ignores MTP keys, none for the others;
    decoder numbering where the pattern names layer num_hidden_layers, else the very pattern; the count key
    transformers maps `num_mtp_layers` to."""
    from moe_prune.architectures.derive_models import config_class, moe_causal_lm_types, text_model_type

    covered = set()
    for model_type in moe_causal_lm_types():
        text = text_model_type(model_type)
        if model_type in REFUSED or text in REFUSED:
            continue
        patterns, family = _transformers_mtp_patterns(model_type), mtp_family(text)
        if not patterns:
            assert not family.known, model_type
            continue
        covered.add(text)
        numbered = [int(m[1]) for p in patterns if (m := re.search(r"layers\\\.(\d+)", p))]
        subtrees = [p for p in patterns if not re.search(r"layers\\\.\d+", p)]
        assert (family.layer_prefix == DECODER_NUMBERING) == bool(numbered), model_type
        if numbered:
            assert config_class(text)().num_hidden_layers in numbered, (model_type, numbered)
        assert family.ignore in (subtrees or [None]), (model_type, patterns)
        if family.layer_prefix not in (None, DECODER_NUMBERING):
            assert re.search(family.ignore, family.layer_prefix.format(i=0) + "mlp.gate.weight"), model_type
        aliases = getattr(config_class(text), "attribute_map", {})
        assert aliases.get("num_mtp_layers", family.count_key) == family.count_key, model_type
    supported = {t for t in MTP_FAMILIES if t not in REFUSED}
    assert covered == supported, sorted(covered ^ supported)
    assert {t for t in covered if mtp_family(t).layer_prefix} <= set(PLACES)  # each placed layout is exercised


# (family, tensor added, refused on opening: True for an unknown place; False for the family's own MTP subtree,
# which transformers skips, so only prune and merge refuse it unless --drop-mtp removes it)
UNPLACEABLE = [
    ("deepseek_v3", "mtp.layers.0.mlp.gate.weight", True),  # a Qwen-style MTP key in a decoder-numbered family
    ("mixtral", "model.mtp.fc.weight", True),  # MTP in a family transformers names no MTP keys for
    ("qwen3_next", "mtp.layers.0.transformer_block.mlp.experts.0.up_proj.weight", True),  # experts nested unknown
    ("mellum", "model.mtp.layers.0.mlp.gate.weight", True),  # MiMo's place, not Mellum's
    ("qwen3_next", "mtp.mlp.experts.0.up_proj.weight", False),  # experts outside any MTP layer
]


@pytest.mark.parametrize(("model_type", "name", "at_open"), UNPLACEABLE)
def test_mtp_tensors_the_layout_cannot_place_are_refused(model_type, name, at_open, family_factory, tmp_path):
    folder = tmp_path / "model"
    plain = family_factory(model_type)
    shutil.copytree(plain, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = torch.zeros(8, H)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    shard = folder / "model.safetensors"
    line = rf"^{re.escape(str(shard))}: holds {re.escape(name)}, a multi-token-prediction tensor moe-prune cannot"
    if at_open:
        with pytest.raises(MoePruneError, match=line):
            Checkpoint.open(folder)
    else:
        Checkpoint.open(folder)
    keep = {layer: [0, 1, 2, 3] for layer in Checkpoint.open(plain).identity.moe_layers}
    mask = write_mask(tmp_path / "mask.json", Checkpoint.open(plain), keep)
    args = ["prune", str(folder), "--mask", mask, "--out", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert name in result.output and str(shard) in result.output and not (tmp_path / "out").exists()
    with pytest.raises(MoePruneError, match=line):
        merge.run(folder, synthetic_stats(Checkpoint.open(plain)), tmp_path / "out", 4)
    if not at_open:  # the family's own MTP tensors can always be dropped
        result = runner.invoke(app, [*args, "--drop-mtp"])
        assert result.exit_code == 0, result.output
        prune.run(plain, DropMask.create(Checkpoint.open(plain).identity, keep, "test"), tmp_path / "plain")
        assert all_tensors(tmp_path / "out").keys() == all_tensors(tmp_path / "plain").keys()


def test_drop_zeroes_every_count_key_present_and_the_familys_own(family_factory):
    """Releases differ in which count key they carry; transformers defaults DeepSeek-V3's to 1 when absent."""
    raw = {"text_config": {"num_mtp_layers": 2, "mtp_num_hidden_layers": 2, "hidden_size": H}}
    set_mtp_count(raw, "text_config", mtp_family("deepseek_v3"), 0)
    expected = {"num_mtp_layers": 0, "mtp_num_hidden_layers": 0, "hidden_size": H, "num_nextn_predict_layers": 0}
    assert raw == {"text_config": expected}
    adapter = Checkpoint.open(family_factory("mixtral")).config.adapter
    assert mtp_layout(adapter, {"num_mtp_modules": 3, "num_nextn_predict_layers": None}, 3).declared == 3
    raw = {"hidden_size": H}
    set_mtp_count(raw, None, mtp_family("mixtral"), 0)  # no MTP layout and no count key: nothing to say
    assert raw == {"hidden_size": H}


def test_nemotron_h_mtp_step_counts_its_sublayers(family_factory, tmp_path):
    """Nemotron-H's count is of MTP steps, each len(mtp_layers_block_type) numbered layers (releases may carry the
    legacy pattern string instead, "*E"): two layers for one step open, a third is refused, and a step of
    three sublayers allows it. The pruned MoE sublayer keeps the last MoE layer's experts, sliced from its own."""
    folder, _, prefix, _ = with_mtp(family_factory, "nemotron_h", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["mtp_layers_block_type"] == ["full_attention", "moe"]
    del config["mtp_layers_block_type"]
    config["mtp_hybrid_override_pattern"] = "*E"
    (folder / "config.json").write_text(json.dumps(config))
    ckpt = Checkpoint.open(folder)
    keep = random_keep(ckpt, 3, seed=8)  # drops 3 of 8
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    src, out = all_tensors(folder), all_tensors(tmp_path / "out")
    rows = sorted(keep[ckpt.config.moe_layers[-1]])
    for new, old in enumerate(rows):
        for part in ("up_proj.weight", "down_proj.weight"):
            name = f"{prefix}mixer.experts.{{}}.{part}"
            assert torch.equal(out[name.format(new)], src[name.format(old)]), (new, old, part)
    assert torch.equal(
        out[f"{prefix}mixer.gate.e_score_correction_bias"], src[f"{prefix}mixer.gate.e_score_correction_bias"][rows]
    )
    assert experts_of(out, prefix, "mixer.experts.") == set(range(5))

    tensors = load_file(folder / "model.safetensors")
    tensors["mtp.layers.2.norm.weight"] = torch.ones(H)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        MoePruneError, match=r"num_nextn_predict_layers is 1 steps of 2 layers, but .* layer 2 \(mtp\.layers\.2\.\*\)"
    ):
        Checkpoint.open(folder)
    config["mtp_hybrid_override_pattern"] = "*E*"
    (folder / "config.json").write_text(json.dumps(config))
    assert Checkpoint.open(folder).config.num_experts == 8


def test_inkling_dense_mtp_is_copied_whole_and_its_experts_refused(family_factory, tmp_path):
    """inkling_text's MTP layers are always dense (transformers: `mtp_mlp_layer_types` is "dense" for each), so
    there is no MTP MoE to keep consistent: prune (uniform and ragged) copies `model.mtp.*` byte for byte. A tensor
    there that names routed experts is not a layout transformers knows: refused in one line unless --drop-mtp."""
    from test_ragged import ragged_mask
    from transformers import AutoConfig

    def _shard_tensors(out):
        return {k: v for shard in sorted(out.glob("*.safetensors")) for k, v in load_file(shard).items()}

    plain = family_factory("inkling_text")
    assert AutoConfig.for_model("inkling_text", num_mtp_layers=2).mtp_mlp_layer_types == ["dense", "dense"]
    folder = tmp_path / "inkling-mtp"
    shutil.copytree(plain, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_mtp_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    dtype = tensors[next(iter(tensors))].dtype
    dense = {
        "model.mtp.layers.0.mlp.gate_proj.weight": (2 * H, H),
        "model.mtp.layers.0.mlp.up_proj.weight": (2 * H, H),
        "model.mtp.layers.0.mlp.down_proj.weight": (H, 2 * H),
        "model.mtp.eh_proj.weight": (H, 2 * H),
        "model.mtp.norm.weight": (H,),
    }
    mtp = {name: torch.randn(shape).to(dtype) for name, shape in dense.items()}
    save_file({**tensors, **mtp}, folder / "model.safetensors", metadata={"format": "pt"})
    opened = Checkpoint.open(folder)
    uniform = DropMask.create(opened.identity, random_keep(opened, 2, seed=1), "test")
    for name, mask in (("uniform", uniform), ("ragged", ragged_mask(opened)[0])):
        prune.run(folder, mask, tmp_path / name)
        out = _shard_tensors(tmp_path / name)
        assert all(torch.equal(out[n], t) for n, t in mtp.items()), name
        assert json.loads((tmp_path / name / "config.json").read_text())["num_mtp_layers"] == 1

    experts = "model.mtp.layers.0.mlp.experts.0.gate_proj.weight"
    save_file({**tensors, **mtp, experts: torch.ones(2, H).to(dtype)}, folder / "model.safetensors")
    mask = write_mask(tmp_path / "mask.json", Checkpoint.open(folder), random_keep(opened, 2, seed=1))
    args = ["prune", str(folder), "--mask", mask, "--out", str(tmp_path / "refused")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert experts in result.output and "--drop-mtp" in result.output and not (tmp_path / "refused").exists()
    assert runner.invoke(app, [*args, "--drop-mtp"]).exit_code == 0
    assert not any(n.startswith("model.mtp.") for n in _shard_tensors(tmp_path / "refused"))
