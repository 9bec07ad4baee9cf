"""The one shrink pipeline (stages/shrink.py): a prune is the merge whose clusters each hold one expert.

What the pipeline promises beyond each command's own tests: a prune copies every tensor it keeps byte for
byte, in the input's order, quantized checkpoints included (checked against the input's own safetensors
headers, read here); its manifest composes with the input's, so pruning a merged checkpoint keeps what
each kept slot holds; and both commands report a ragged result the same way.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_tensors, tensor_bytes
from test_merge import synthetic_stats
from test_quantized import quantized  # noqa: F401 (the fixture)
from typer.testing import CliRunner

from moe_prune.artifacts.manifest import Manifest
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.stages import merge, prune

KEEP = (0, 2, 3, 5, 6, 7)


def file_order(folder: Path) -> list[str]:
    """Tensor names of a folder's shards in shard order, then byte order inside each (headers read here)."""
    names = []
    for shard in sorted(folder.glob("*.safetensors")):
        with shard.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        names += sorted(header, key=lambda name: header[name]["data_offsets"])
    return names


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))
    )


def renamed(name: str) -> str | None:
    """The output name of input tensor `name` after keeping KEEP (per-expert keys renumbered; None: dropped)."""
    m = re.search(r"\.experts\.(\d+)\.", name)
    if m is None:
        return name
    expert = int(m[1])
    return None if expert not in KEEP else name[: m.start(1)] + str(KEEP.index(expert)) + name[m.end(1) :]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_prune_copies_quantized_tensors_byte_for_byte_in_input_order(family, quantized, tmp_path):  # noqa: F811
    folder, _ = quantized(family)
    identity = Checkpoint.open(folder).identity
    prune.run(folder, DropMask(identity, dict.fromkeys(identity.moe_layers, KEEP)), tmp_path / "out", "40KB")
    want = [new for name in file_order(folder) if (new := renamed(name)) is not None]
    assert file_order(tmp_path / "out") == want  # scales stay where the input had them, not beside their data
    before, after = tensor_bytes(folder), tensor_bytes(tmp_path / "out")
    source = {renamed(name): name for name in before}
    per_expert = [name for name in want if re.search(r"\.experts\.\d+\.", name)]
    assert all(after[name] == before[source[name]] for name in per_expert)
    fused_in, fused_out = checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "out")
    fused = [name for name in want if ".experts." in name and name not in per_expert]
    assert all(same_bits(fused_out[name], fused_in[name][list(KEEP)]) for name in fused)  # the kept experts' rows
    assert len(per_expert + fused) >= 2 * len(identity.moe_layers)  # every layer's experts were compared


def test_pruning_a_merged_checkpoint_keeps_what_its_slots_hold(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    ckpt = Checkpoint.open(folder)
    merge.run(folder, synthetic_stats(ckpt, seed=7), tmp_path / "merged", 4)
    merged = Manifest.read(tmp_path / "merged")
    identity = Checkpoint.open(tmp_path / "merged").identity
    keep = {layer: [ids[1], ids[3]] for layer, ids in identity.original_ids.items()}
    prune.run(tmp_path / "merged", DropMask.create(identity, keep, "test"), tmp_path / "pruned")
    pruned = Manifest.read(tmp_path / "pruned")
    assert pruned is not None and merged is not None
    for layer, ids in identity.original_ids.items():
        assert pruned.slots[layer] == (ids[1], ids[3])
        assert pruned.members(layer) == (merged.members(layer)[1], merged.members(layer)[3])
        assert any(len(slot) > 1 for slot in pruned.members(layer))  # really merged slots, not plain experts
    assert json.loads((tmp_path / "pruned" / "moe_prune.json").read_text())["version"] == 2
    Checkpoint.open(tmp_path / "pruned")  # reads and validates the manifest


def test_merge_reports_a_ragged_result_as_prune_does(tiny_factory, tmp_path):
    folder, _ = tiny_factory("mixtral")
    synthetic_stats(Checkpoint.open(folder)).save(tmp_path / "stats.npz")
    args = ["merge", str(folder), "--stats", str(tmp_path / "stats.npz"), "--keep", "4", "--skip-layers", "0"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "load with trust_remote_code=True (modeling_moe_prune.py)" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "json"), "--json"])
    report = json.loads(result.stdout)
    assert report["ragged"] and report["model_code"] == ["modeling_moe_prune.py"]
    assert report["experts_after_per_layer"] == {"0": 8, "1": 4, "2": 4} == report["experts_after"]
