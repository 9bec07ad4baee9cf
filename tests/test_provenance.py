"""artifacts.provenance: what a resumed lottery, finetune or sweep must match changes with every input.

The resume tests (test_lottery, test_sweep) change the data; these change one weight byte, one tensor
header and the config, on a copy of the demo model, and compare with the fingerprint of the original.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moe_prune.artifacts.provenance import data_fingerprint, fingerprint_json, model_fingerprint
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_MODEL_DIR


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, out)
    return out


def test_one_weight_byte_changes_the_model_fingerprint(tmp_path):
    folder = _copy(tmp_path)
    before = model_fingerprint(Checkpoint.open(folder))
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: headers unchanged
    shard.write_bytes(bytes(data))
    after = model_fingerprint(Checkpoint.open(folder))
    assert after["weights"] != before["weights"]
    assert after["tensors"] == before["tensors"] and after["config"] == before["config"]
    assert model_fingerprint(Checkpoint.open(DEMO_MODEL_DIR)) == before


def test_the_config_and_the_data_bytes_change_their_fingerprints(tmp_path):
    folder = _copy(tmp_path)
    before = model_fingerprint(Checkpoint.open(folder))
    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (folder / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(Checkpoint.open(folder))["config"] != before["config"]

    text = tmp_path / "data.txt"
    text.write_text("one")
    first = data_fingerprint(str(text))
    text.write_text("two")
    assert data_fingerprint(str(text))["sha256"] != first["sha256"]
    assert data_fingerprint("org/dataset") == {"source": "org/dataset", "sha256": None}


def test_fingerprint_json_is_what_reads_back_from_json():
    obj = {"shape": (1, 2), "nested": {"pair": ("a", 3)}}
    assert fingerprint_json(obj) == json.loads(json.dumps(obj)) == {"shape": [1, 2], "nested": {"pair": ["a", 3]}}
