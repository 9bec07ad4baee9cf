"""Per-expert checkpoint tensors read straight into transformers' fused expert parameters (runtime/fused.py).

`--sequential` loads each decoder layer this way (issue #24's memory contract, measured in
tests/test_memory_contract.py); here: the loaded layer equals what transformers builds, bit for bit,
the fused path is the one taken, and damage (a missing expert, a wrong shape, NaN) is one line.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from moe_prune.checkpoint.quantized import Stored, read_expert_tensor
from moe_prune.checkpoint.safetensors_io import TensorInfo
from moe_prune.errors import MoePruneError
from moe_prune.runtime import fused
from moe_prune.runtime.sequential import LayerwiseModel
from moe_prune.runtime.skeleton import finite


def _layerwise(folder: Path, dtype: str = "float32") -> LayerwiseModel:
    return LayerwiseModel(folder, "model.layers", dtype, "cpu", False)


@pytest.fixture
def filled(monkeypatch) -> list[str]:
    """Names of the parameters `fused.fill` allocated and filled."""
    names: list[str] = []
    original = fused.fill
    monkeypatch.setattr(fused, "fill", lambda model, name, *rest: (names.append(name), original(model, name, *rest)))
    return names


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe"])
def test_layer_equals_transformers_load(model_type, tiny_factory, filled):
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_factory(model_type)  # (the session's model object may have been changed by other tests)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    runtime = _layerwise(folder)
    for index in range(len(runtime.layers)):
        layer = runtime.load_layer(index)
        expected = dict(model.model.layers[index].named_parameters())
        loaded = dict(layer.named_parameters())
        assert sorted(loaded) == sorted(expected)
        for name, param in loaded.items():
            assert param.dtype == expected[name].dtype and torch.equal(param, expected[name]), name
        runtime.free_layer(index)
    moe = [n for n, _ in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert moe and sorted(filled) == sorted(moe)  # every fused expert parameter came through fused.fill


def test_bfloat16_checkpoint_casts_on_copy(tiny_factory, tmp_path):
    """A bf16 checkpoint loaded as float32: each expert read in bf16 and widened into its slot, as transformers does."""
    from transformers import AutoModelForCausalLM

    source, _ = tiny_factory("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    folder = tmp_path / "bf16"
    model.save_pretrained(folder)
    layer = _layerwise(folder).load_layer(0)
    expected = model.model.layers[0].mlp.experts.gate_up_proj.to(torch.float32)
    assert torch.equal(layer.mlp.experts.gate_up_proj, expected)


def _damaged(folder: Path, tmp_path: Path, change) -> Path:
    """A copy of `folder` whose layer-0 tensors pass through `change(dict)`."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "damaged"
    shutil.copytree(folder, copy)
    shard = copy / "model.safetensors"
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return copy


def _set_nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.0.mlp.experts.5.up_proj.weight"][3, 1] = float("nan")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("model.layers.0.mlp.experts.7.gate_proj.weight"), r"lacks .*experts\.7\.gate_proj\.weight"),
        (_set_nan, r"experts\.5\.up_proj\.weight holds NaN or Inf values; refusing to load it"),
    ],
    ids=["missing-expert", "nan"],
)
def test_damaged_expert_is_one_line(change, message, tiny_factory, tmp_path):
    folder, _ = tiny_factory("qwen3_moe")
    with pytest.raises(MoePruneError, match=message) as caught:
        _layerwise(_damaged(folder, tmp_path, change)).load_layer(0)
    assert "\n" not in str(caught.value)


def test_slots_refuse_what_the_checkpoint_checks_let_through(tiny_factory):
    """Checkpoint.open refuses missing experts and wrong shapes first; the fused reader checks its slots anyway."""
    folder, _ = tiny_factory("qwen3_moe")
    runtime = _layerwise(folder)
    runtime._keys[0].pop("model.layers.0.mlp.experts.7.gate_proj.weight")
    with pytest.raises(MoePruneError, match=r"mismatched weight model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        runtime.load_layer(0)
    runtime = _layerwise(folder)
    name = "model.layers.0.mlp.experts.2.down_proj.weight"
    info = runtime._infos[name]
    runtime._infos[name] = replace(info, shape=(32, 23), end=info.start + 32 * 23 * 4)
    with pytest.raises(
        MoePruneError, match=r"experts\.2\.down_proj\.weight has shape \(32, 23\), its slot .*\(32, 24\)"
    ):
        runtime.load_layer(0)


def test_reader_fills_a_slot_in_its_dtype(tmp_path):
    from safetensors.torch import save_file

    from moe_prune.checkpoint.safetensors_io import read_header

    value = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    save_file({"w": value}, tmp_path / "t.safetensors")
    info: TensorInfo = read_header(tmp_path / "t.safetensors")[0][0]
    slot = torch.zeros(4, 2, 3)
    read_expert_tensor(Stored("w", info), "test", out=slot[1])
    assert torch.equal(slot[1], value.float()) and slot[0].abs().sum() == 0 and slot[2:].abs().sum() == 0
    with pytest.raises(MoePruneError, match=r"t\.safetensors: w has shape \(2, 3\), its slot .* \(3, 2\)"):
        read_expert_tensor(Stored("w", info), "test", out=torch.zeros(3, 2))


@pytest.mark.parametrize("where", [0, -1])
def test_finite_checks_every_chunk(monkeypatch, where):
    """The NaN check runs in chunks (no bool tensor as large as a weight): the last chunk counts too."""
    import moe_prune.runtime.skeleton as skeleton

    monkeypatch.setattr(skeleton, "FINITE_CHUNK", 7)
    tensor = torch.zeros(10, 6)
    assert finite(tensor) and finite(tensor.t())
    tensor.view(-1)[where] = float("inf")
    assert not finite(tensor)
    assert not finite(tensor.t())  # a non-contiguous view: row chunks
