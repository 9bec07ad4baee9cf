"""The vLLM plugin's parts that need no vLLM: its check of a hostile `moe_prune_ragged` block, the family table it
registers, and the warning `prune` gives for a ragged checkpoint of a family the plugin cannot serve.
tests/test_vllm_serving.py serves checkpoints in vLLM itself (and the same damaged block there)."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hostile_serving import DAMAGED, set_block_field

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.serving import DEFAULT_REASON, SERVED, unserved_reason, vllm_architecture
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.serving.ragged_block import read_block
from moe_prune.stages import prune


def ragged_prune(folder: Path, counts: list[int], out: Path) -> dict:
    """`folder` pruned to the first `counts[i]` experts of its i-th MoE layer; its config.json."""
    ckpt = Checkpoint.open(folder)
    layers = ckpt.identity.moe_layers
    keep = {layer: list(ckpt.identity.original_ids[layer][:n]) for layer, n in zip(layers, counts, strict=True)}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), out)
    return json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def ragged_folder(tmp_path_factory) -> Path:
    from tiny_models import build_tiny

    tmp = tmp_path_factory.mktemp("ragged_block")
    build_tiny("mixtral", tmp / "model")
    ragged_prune(tmp / "model", [6, 3, 5], tmp / "ragged")
    return tmp / "ragged"


def test_sound_block_is_read_as_written(ragged_folder):
    block = read_block(str(ragged_folder), {})
    assert block["experts_per_layer"] == {"0": 6, "1": 3, "2": 5}
    assert block["top_k_per_layer"] == {"0": 2, "1": 2, "2": 2}


@pytest.mark.parametrize("field,value,message", DAMAGED, ids=[f"{f}={v!r}" for f, v, _ in DAMAGED])
def test_damaged_block_is_one_line_naming_config_and_field(ragged_folder, tmp_path, field, value, message):
    config = json.loads((ragged_folder / "config.json").read_text())
    damaged = copy.deepcopy(config)
    set_block_field(damaged[RAGGED_KEY], field, value)
    shutil.copytree(ragged_folder, tmp_path, dirs_exist_ok=True)  # the plugin opens the whole checkpoint
    (tmp_path / "config.json").write_text(json.dumps(damaged))
    with pytest.raises(MoePruneError) as caught:
        read_block(str(tmp_path), {})
    text = str(caught.value)
    assert "\n" not in text and str(tmp_path / "config.json") in text and RAGGED_KEY in text
    assert message in text
    # a hub name (no local folder): the engine's parsed config is checked the same way
    with pytest.raises(MoePruneError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_block(str(tmp_path / "hub-name"), damaged)


def test_no_block_is_named(ragged_folder, tmp_path):
    config = json.loads((ragged_folder / "config.json").read_text())
    del config[RAGGED_KEY]
    shutil.copytree(ragged_folder, tmp_path, dirs_exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match=r"config\.json: says MoE layer 1 has 6 routed experts, but its router"):
        read_block(str(tmp_path), {})  # the checkpoint reader finds the config disagreeing with the weights
    with pytest.raises(MoePruneError, match=f"no {RAGGED_KEY} object"):
        read_block(str(tmp_path / "hub-name"), config)


def test_prune_warns_once_for_a_family_vllm_cannot_serve(tiny_factory, tmp_path):
    """A ragged hunyuan checkpoint (vLLM runs that family through its Transformers backend) gets one warning
    line; a ragged Mixtral (served) gets none."""
    from moe_prune.checkpoint.ragged import causal_lm_class

    assert causal_lm_class("hunyuan_v1_moe") not in SERVED
    assert causal_lm_class("mixtral") in SERVED
    for model_type, served in (("hunyuan_v1_moe", False), ("mixtral", True)):
        folder, _ = tiny_factory(model_type)
        n = len(Checkpoint.open(folder).identity.moe_layers)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MoePruneWarning)
            ragged_prune(folder, [6, 3, 5, 4][:n], tmp_path / model_type)
        lines = [str(w.message) for w in caught if w.category is MoePruneWarning and "vLLM" in str(w.message)]
        assert len(lines) == (0 if served else 1), lines
        if not served:
            assert "vLLM cannot serve this HunYuanMoEV1ForCausalLM checkpoint" in lines[0] and "\n" not in lines[0]


def test_finetune_keeps_the_plugins_architecture_name(ragged_folder, tmp_path):
    """vLLM picks the plugin's class by `architectures`: a finetuned ragged checkpoint must still name
    MoePruneRagged<Base> (transformers' save_pretrained alone writes its class name, Ragged<Base>)."""
    from tiny_models import save_char_tokenizer

    from moe_prune.demo import DEMO_CALIBRATION
    from moe_prune.stages import finetune
    from moe_prune.training.options import FinetuneOptions

    source = tmp_path / "source"
    shutil.copytree(ragged_folder, source)
    save_char_tokenizer(source)
    options = FinetuneOptions(tokens=256, seq_len=32, batch_size=4, eval_tokens=0)
    finetune.run(source, str(DEMO_CALIBRATION), tmp_path / "ft", options)
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["architectures"] == ["MoePruneRaggedMixtralForCausalLM"]
    assert vllm_architecture(config) == "MixtralForCausalLM"
    assert read_block(str(tmp_path / "ft"), {})["experts_per_layer"] == {"0": 6, "1": 3, "2": 5}


def test_a_layer_under_the_familys_minimum_is_named():
    """vLLM's grouped top-k (GLM-4-MoE) sums each group's best two experts: a 1-expert layer is refused by name."""
    limited = {base: s for base, s in SERVED.items() if s.min_experts > 1}
    assert limited, "no family with a minimum: the check is vacuous"
    for base, served in limited.items():
        counts = {0: served.min_experts, 1: served.min_experts - 1}
        assert "layer 1 keeps fewer" in unserved_reason(base, counts)
        assert unserved_reason(base, {0: served.min_experts, 1: served.min_experts + 1}) is None
    assert unserved_reason("MixtralForCausalLM", {0: 1, 1: 5}) is None
    assert unserved_reason("NoSuchForCausalLM", {0: 1, 1: 5}) == DEFAULT_REASON


def test_the_plugin_module_imports_without_vllm():
    """vLLM imports the plugin in each of its processes, moe-prune's CLI never: the module itself imports no vLLM
    (its classes are made on first access), so moe-prune installs and runs where vLLM is absent."""
    code = (
        "import sys, moe_prune.serving.vllm_plugin, moe_prune.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'vllm'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
