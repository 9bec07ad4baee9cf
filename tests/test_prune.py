"""`prune` beyond the per-family equivalence: resharding, streaming layout, CLI errors, atomic output."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from helpers import checkpoint_tensors
from safetensors import safe_open
from safetensors.torch import save_file
from test_adapters import random_keep
from typer.testing import CliRunner

from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.safetensors_io import read_header
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.stages import prune

runner = CliRunner()


def folder_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def mixtral(tiny_factory, tmp_path):
    """A private copy of the tiny Mixtral (tests may damage it)."""
    folder, model = tiny_factory("mixtral")
    copy = tmp_path / "mixtral"
    shutil.copytree(folder, copy)
    return copy, model


def write_mask(path, ckpt, keep) -> str:
    path.write_text(DropMask.create(ckpt.identity, keep, "test").dumps())
    return str(path)


def test_keep_everything_is_tensor_identical_and_input_untouched(mixtral, tmp_path):
    folder, _ = mixtral
    before = folder_digest(folder)
    ckpt = Checkpoint.open(folder)
    keep = {layer: list(ids) for layer, ids in ckpt.identity.original_ids.items()}
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    src, out = checkpoint_tensors(folder), checkpoint_tensors(tmp_path / "out")
    assert src.keys() == out.keys()
    assert all(torch.equal(src[k], out[k]) for k in src)
    assert folder_digest(folder) == before


def test_resharding_many_shards_in_other_size_out(mixtral, tmp_path):
    _folder, model = mixtral
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 3
    ckpt = Checkpoint.open(sharded)
    keep = {layer: list(ids) for layer, ids in ckpt.identity.original_ids.items()}
    out = tmp_path / "out"
    result = prune.run(sharded, DropMask.create(ckpt.identity, keep, "test"), out, max_shard_size="60KB")
    assert 1 < len(result.shards) < len(list(sharded.glob("*.safetensors")))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.shards)
    src, dst = checkpoint_tensors(sharded), checkpoint_tensors(out)
    assert src.keys() == dst.keys() == set(index["weight_map"])
    assert all(torch.equal(src[k], dst[k]) for k in src)
    for shard in result.shards:
        tensors, _ = read_header(out / shard)
        assert sum(t.nbytes for t in tensors) <= 60_000 or len(tensors) == 1


def test_companion_tensors_travel_with_their_expert_untouched(mixtral, tmp_path):
    """FP8 scales of per-expert tensors and MXFP4-style fused blocks are sliced as raw bytes."""
    folder, _ = mixtral
    shard = folder / "model.safetensors"
    with safe_open(shard, "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for e in range(8):
        tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight_scale_inv"] = torch.full((2, 2), float(e))
    blocks = torch.arange(8 * 3 * 4, dtype=torch.uint8).reshape(8, 3, 4)
    tensors["model.layers.0.block_sparse_moe.experts.gate_up_proj_blocks"] = blocks
    save_file(tensors, shard, metadata={"format": "pt"})
    ckpt = Checkpoint.open(folder)
    keep = random_keep(ckpt, 3, seed=5)
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    out = checkpoint_tensors(tmp_path / "out")
    for new, orig in enumerate(keep[0]):
        assert torch.equal(
            out[f"model.layers.0.block_sparse_moe.experts.{new}.w1.weight_scale_inv"], torch.full((2, 2), float(orig))
        )
    assert torch.equal(out["model.layers.0.block_sparse_moe.experts.gate_up_proj_blocks"], blocks[keep[0]])
    assert "model.layers.0.block_sparse_moe.experts.5.w1.weight_scale_inv" not in out


def test_top_k_is_clipped_with_a_warning(mixtral, tmp_path):
    folder, _ = mixtral
    ckpt = Checkpoint.open(folder)
    keep = {layer: [3] for layer in ckpt.identity.moe_layers}
    result = prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    assert result.top_k == 1 and result.warnings
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 1


def test_grouped_router_masks_are_validated(tiny_factory, tmp_path):
    folder, _ = tiny_factory("deepseek_v3")  # n_group = 2: experts 0-3 and 4-7
    ckpt = Checkpoint.open(folder)
    unbalanced = {layer: [2, 3, 4, 5, 6, 7] for layer in ckpt.identity.moe_layers}
    with pytest.raises(MoePruneError, match="routing groups"):
        prune.run(folder, DropMask.create(ckpt.identity, unbalanced, "test"), tmp_path / "out")
    too_few = {layer: [0, 4] for layer in ckpt.identity.moe_layers}
    with pytest.raises(MoePruneError, match="at least 2 per group"):
        prune.run(folder, DropMask.create(ckpt.identity, too_few, "test"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_prune_with_mask_on_stdin_and_json(mixtral, tmp_path):
    folder, _ = mixtral
    ckpt = Checkpoint.open(folder)
    mask = DropMask.create(ckpt.identity, random_keep(ckpt, 4, seed=0), "test").dumps()
    result = runner.invoke(
        app, ["prune", str(folder), "--mask", "-", "--out", str(tmp_path / "o"), "--json"], input=mask
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["experts_after"] == 4
    manifest = json.loads((tmp_path / "o" / "moe_prune.json").read_text())
    assert manifest["layers"]["0"]["slots"] == report["kept"]["0"]


def _truncate(folder):
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])


def _corrupt_header(folder):
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    shard.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def _unknown_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: shutil.rmtree(f), "model folder not found"),
        (_truncate, "truncated safetensors"),
        (_corrupt_header, "corrupt safetensors header"),
        (_unknown_type, "unsupported model_type 'llama'.*supported: .*mixtral"),
    ],
    ids=["missing", "truncated", "corrupt", "unknown-type"],
)
def test_bad_checkpoint_is_one_line_error(mixtral, tmp_path, damage, message):
    folder, _ = mixtral
    mask = write_mask(tmp_path / "mask.json", Checkpoint.open(folder), random_keep(Checkpoint.open(folder), 2, 0))
    damage(folder)
    result = runner.invoke(app, ["prune", str(folder), "--mask", mask, "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.stderr.strip().splitlines()) == 1 and "error:" in result.stderr
    assert __import__("re").search(message, result.stderr.replace("\n", "")), result.stderr
    assert not (tmp_path / "o").exists()


def test_bad_masks_are_refused(mixtral, tiny_factory, tmp_path):
    folder, _ = mixtral
    ckpt = Checkpoint.open(folder)
    other = Checkpoint.open(tiny_factory("olmoe")[0])
    cases = {
        "other-model": (write_mask(tmp_path / "a.json", other, random_keep(other, 2, 0)), "is for a olmoe model"),
        "empties-layer": (None, "drops every expert"),
        "not-json": (None, "not valid JSON"),
    }
    bad = DropMask.create(ckpt.identity, random_keep(ckpt, 2, 0), "test").to_dict()
    bad["layers"]["1"] = {"keep": [], "drop": list(range(8))}
    (tmp_path / "b.json").write_text(json.dumps(bad))
    cases["empties-layer"] = (str(tmp_path / "b.json"), "drops every expert")
    (tmp_path / "c.json").write_text("{nope")
    cases["not-json"] = (str(tmp_path / "c.json"), "not valid JSON")
    for mask, message in cases.values():
        result = runner.invoke(app, ["prune", str(folder), "--mask", mask, "--out", str(tmp_path / "o")])
        assert result.exit_code == 1 and message in result.stderr, result.stderr
        assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(mixtral, tmp_path):
    folder, _ = mixtral
    ckpt = Checkpoint.open(folder)
    mask = write_mask(tmp_path / "m.json", ckpt, random_keep(ckpt, 2, 0))
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["prune", str(folder), "--mask", mask, "--out", str(out)])
    assert result.exit_code == 1 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = runner.invoke(app, ["prune", str(folder), "--mask", mask, "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")], "temporary folders left behind"
    result = runner.invoke(app, ["prune", str(folder), "--mask", mask, "--out", str(folder), "--force"])
    assert result.exit_code == 1 and "lies inside the input" in result.stderr


def test_wrapper_prefix_does_not_matter(mixtral, tmp_path):
    """A multimodal wrapper's `language_model.` prefix: keys still classify, slice and renumber."""
    folder, _ = mixtral
    shard = folder / "model.safetensors"
    with safe_open(shard, "pt") as handle:
        tensors = {f"language_model.{k}": handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, shard, metadata={"format": "pt"})
    ckpt = Checkpoint.open(folder)
    keep = random_keep(ckpt, 4, seed=7)
    prune.run(folder, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "out")
    out = checkpoint_tensors(tmp_path / "out")
    router = "language_model.model.layers.2.block_sparse_moe.gate.weight"
    assert torch.equal(out[router], tensors[router][keep[2]])
    for new, orig in enumerate(keep[2]):
        key = "language_model.model.layers.2.block_sparse_moe.experts.{}.w2.weight"
        assert torch.equal(out[key.format(new)], tensors[key.format(orig)])
    assert "language_model.model.layers.2.block_sparse_moe.experts.4.w2.weight" not in out
