"""Multi-token-prediction (MTP) layers survive `prune` and `merge`, or leave with `--drop-mtp`.

The tiny checkpoints get MTP tensors in the on-disk layout of their family: DeepSeek-V3 and GLM-4.5
keep MTP layer 0 as decoder layer `num_hidden_layers` (`model.layers.61.*` in DeepSeek-V3) with
`enorm`, `hnorm`, `eh_proj`, `shared_head.*` and `embed_tokens` beside a full decoder layer;
Qwen3-Next keeps `mtp.layers.0.*` beside `mtp.fc`, `mtp.pre_fc_norm_*` and `mtp.norm`. The MTP
layer's decoder part is a copy of the last decoder layer, so after any edit its MoE tensors must be
byte-equal to that layer's.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapters import random_keep
from test_merge import synthetic_stats
from test_prune import all_tensors, write_mask
from typer.testing import CliRunner

from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.stages import merge, prune

runner = CliRunner()
H, V = 32, 128  # tiny_models.COMMON hidden size and vocabulary

# family -> (config key of the MTP count, prefix of MTP layer 0 in a 3-layer model, extra tensors and shapes)
NEXTN_EXTRAS = {
    "enorm.weight": (H,),
    "hnorm.weight": (H,),
    "eh_proj.weight": (H, 2 * H),
    "shared_head.norm.weight": (H,),
    "shared_head.head.weight": (V, H),
    "embed_tokens.weight": (V, H),
}
LAYOUTS = {
    "deepseek_v3": (
        "num_nextn_predict_layers",
        "model.layers.3.",
        {f"model.layers.3.{k}": s for k, s in NEXTN_EXTRAS.items()},
    ),
    "glm4_moe": (
        "num_nextn_predict_layers",
        "model.layers.3.",
        {f"model.layers.3.{k}": s for k, s in NEXTN_EXTRAS.items()},
    ),
    "qwen3_next": (
        "mtp_num_hidden_layers",
        "mtp.layers.0.",
        {
            "mtp.fc.weight": (H, 2 * H),
            "mtp.pre_fc_norm_embedding.weight": (H,),
            "mtp.pre_fc_norm_hidden.weight": (H,),
            "mtp.norm.weight": (H,),
        },
    ),
}
FAMILIES = list(LAYOUTS)


def with_mtp(tiny_factory, model_type: str, tmp_path):
    """(tiny model copy WITH one MTP layer, the model's folder without, MTP prefix, last MoE layer's prefix)."""
    plain, _ = tiny_factory(model_type)
    folder = tmp_path / f"{model_type}-mtp"
    shutil.copytree(plain, folder)
    key, prefix, extras = LAYOUTS[model_type]
    config = json.loads((folder / "config.json").read_text())
    config[key] = 1
    (folder / "config.json").write_text(json.dumps(config))
    last = f"model.layers.{Checkpoint.open(plain).config.moe_layers[-1]}."
    tensors = load_file(folder / "model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for name in [n for n in tensors if n.startswith(last)]:
        tensors[prefix + name[len(last) :]] = tensors[name].clone()
    for name, shape in extras.items():
        tensors[name] = torch.randn(shape, generator=generator).to(tensors[next(iter(tensors))].dtype)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, plain, prefix, last


def mtp_names(tensors: dict, prefix: str, model_type: str) -> set[str]:
    extras = set(LAYOUTS[model_type][2])
    return {n for n in tensors if n.startswith(prefix) or n in extras}


def experts_of(tensors: dict, prefix: str) -> set[int]:
    pattern = re.compile(re.escape(prefix) + r"mlp\.experts\.(\d+)\.")
    return {int(m[1]) for name in tensors if (m := pattern.match(name))}


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
def test_prune_gives_mtp_the_last_layers_experts(model_type, tiny_factory, tmp_path):
    folder, plain, prefix, last = with_mtp(tiny_factory, model_type, tmp_path)
    ckpt = Checkpoint.open(folder)
    assert ckpt.identity.moe_layers == Checkpoint.open(plain).identity.moe_layers  # MTP is no decoder MoE layer
    keep = random_keep(ckpt, 4, seed=1)
    result = prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    plain_keep = DropMask.create(Checkpoint.open(plain).identity, keep, "test")
    prune.run(plain, plain_keep, tmp_path / "plain")

    src, out, reference = all_tensors(folder), all_tensors(tmp_path / "out"), all_tensors(tmp_path / "plain")
    pruned = Checkpoint.open(tmp_path / "out")  # validates the MTP MoE against the config
    assert pruned.config.num_experts == 4 and experts_of(out, prefix) == set(range(4))
    assert_mirrors_last_layer(out, prefix, last)
    layer = ckpt.config.moe_layers[-1]
    rows = sorted(keep[layer])  # original ids are the input's slots
    for rest in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias"):
        if prefix + rest in src:
            assert out[prefix + rest].shape[0] == 4
            assert torch.equal(out[prefix + rest], src[prefix + rest][rows])
    for name in LAYOUTS[model_type][2]:
        assert torch.equal(out[name], src[name]), name
    rest = {n: t for n, t in out.items() if n not in mtp_names(out, prefix, model_type)}
    assert rest.keys() == reference.keys() and all(torch.equal(t, reference[n]) for n, t in rest.items())
    assert torch.equal(stock_logits(tmp_path / "out"), stock_logits(tmp_path / "plain"))

    manifest = json.loads((tmp_path / "out" / "moe_prune.json").read_text())
    assert manifest["mtp"] == {"layers": {"0": {"prefix": prefix, "follows": layer, "slots": rows}}, "dropped": 0}
    assert result.mtp == [f"multi-token-prediction layer {prefix}: experts of layer {layer} kept"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())[LAYOUTS[model_type][0]] == 1


@pytest.mark.parametrize("model_type", FAMILIES)
def test_merge_applies_the_last_layers_plan_to_mtp(model_type, tiny_factory, tmp_path):
    folder, _, prefix, last = with_mtp(tiny_factory, model_type, tmp_path)
    ckpt = Checkpoint.open(folder)
    result = merge.run(folder, synthetic_stats(ckpt), tmp_path / "out", 4)
    out = all_tensors(tmp_path / "out")
    merged = Checkpoint.open(tmp_path / "out")
    assert merged.config.num_experts == 4 and experts_of(out, prefix) == set(range(4))
    assert_mirrors_last_layer(out, prefix, last)
    layer = ckpt.config.moe_layers[-1]
    report = next(r for r in result.layers if r.layer == layer)
    assert any(len(c.members) > 1 for c in report.clusters)  # really merged, not only sliced
    manifest = Manifest.read(tmp_path / "out")
    assert manifest is not None
    record = manifest.mtp[0]
    assert (record.prefix, record.follows) == (prefix, layer)
    assert record.slots == manifest.slots[layer] and record.members == manifest.merged[layer]


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_next"])
def test_drop_mtp_removes_every_mtp_tensor(model_type, tiny_factory, tmp_path):
    folder, plain, prefix, _ = with_mtp(tiny_factory, model_type, tmp_path)
    ckpt = Checkpoint.open(folder)
    keep = random_keep(ckpt, 4, seed=2)
    args = ["prune", str(folder), "--mask", write_mask(tmp_path / "mask.json", ckpt, keep)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out"), "--drop-mtp"])
    assert result.exit_code == 0, result.output
    assert "--drop-mtp: removed 1 multi-token-prediction layer(s)" in result.output
    prune.run(plain, DropMask.create(Checkpoint.open(plain).identity, keep, "test"), tmp_path / "plain")
    out, reference = all_tensors(tmp_path / "out"), all_tensors(tmp_path / "plain")
    assert not mtp_names(out, prefix, model_type) and out.keys() == reference.keys()
    key = LAYOUTS[model_type][0]
    assert json.loads((tmp_path / "out" / "config.json").read_text())[key] == 0
    assert json.loads((tmp_path / "out" / "moe_prune.json").read_text())["mtp"] == {"layers": {}, "dropped": 1}

    merge.run(folder, synthetic_stats(ckpt), tmp_path / "merged", 4, drop_mtp=True)
    merged = all_tensors(tmp_path / "merged")
    assert not mtp_names(merged, prefix, model_type)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())[key] == 0


def test_ragged_result_with_mtp_is_refused_unless_dropped(tiny_factory, tmp_path):
    folder, _, prefix, _ = with_mtp(tiny_factory, "deepseek_v3", tmp_path)
    ckpt = Checkpoint.open(folder)
    first, second = ckpt.identity.moe_layers
    mask = DropMask.create(ckpt.identity, {first: [0, 1, 4, 5], second: [0, 1, 2, 4, 5, 6]}, "test")
    with pytest.raises(MoePruneError, match=rf"different expert counts.*{re.escape(prefix)}.*--drop-mtp"):
        prune.run(folder, mask, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MoePruneError, match="--drop-mtp"):
        merge.run(folder, synthetic_stats(ckpt), tmp_path / "out", 4, keep_overrides={first: 6})
    prune.run(folder, mask, tmp_path / "out", drop_mtp=True)
    assert not mtp_names(all_tensors(tmp_path / "out"), prefix, "deepseek_v3")


def test_second_prune_follows_and_a_foreign_record_is_refused(tiny_factory, tmp_path):
    folder, _, prefix, last = with_mtp(tiny_factory, "glm4_moe", tmp_path)
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
def test_mtp_moe_that_disagrees_with_the_config_is_refused(model_type, tiny_factory, tmp_path):
    folder, _, prefix, _ = with_mtp(tiny_factory, model_type, tmp_path)
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


def test_deepseek_mtp_layer_loads_in_stock_transformers_after_prune(tiny_factory, tmp_path):
    """transformers' own MtpModel (generate(use_mtp=True)) loads the pruned MTP layer: no missing or mis-sized key."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel

    folder, _, prefix, _ = with_mtp(tiny_factory, "deepseek_v3", tmp_path)
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
