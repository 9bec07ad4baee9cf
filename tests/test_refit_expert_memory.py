"""`merge --refit --expert-memory`: the layer-by-layer refit with a layer's experts read a chunk at a time
(runtime/expert_chunks.py) and each slot's expert read alone for its sums (issue #24: refit on DeepSeek-V3
shapes, whose MoE layer's experts are 22.5 GB in bf16, within a 24 GB machine).

Checked against the same pass with whole layers (itself checked against the two-step refit and a float64
brute force in test_refit_pass): the written down projections agree to float rounding (the chunked forward
adds a token's experts in another order), the chunked path was taken, and every slot's expert was read.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_profile import settings, write_docs
from test_refit_pass import downs
from tiny_models import save_char_tokenizer
from typer.testing import CliRunner

from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.runtime import expert_chunks
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge
from moe_prune.stages import profile as profile_stage

runner = CliRunner()


def _written(folder, suffix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(file).items() if k.endswith(suffix)})
    return out


def _chunk_reads(monkeypatch) -> list[tuple[int, int, int]]:
    """(chunk size, reads, experts read alone) of every chunked experts module, recorded as its layer is freed."""
    seen: list[tuple[int, int, int]] = []
    original_remove, original_expert = expert_chunks.remove, expert_chunks.ChunkedExperts.expert
    alone: dict[int, set[int]] = {}

    def expert(self, attr, index):
        if self.loaded is None or not self.loaded[0] <= index < self.loaded[1]:
            alone.setdefault(id(self), set()).add(index)
        return original_expert(self, attr, index)

    def remove(layer):
        seen.extend((c.chunk, c.reads, len(alone.pop(id(c), ()))) for c in expert_chunks.chunked(layer))
        original_remove(layer)

    monkeypatch.setattr(expert_chunks.ChunkedExperts, "expert", expert)
    monkeypatch.setattr(expert_chunks, "remove", remove)
    return seen


def test_demo_refit_with_expert_memory_equals_whole_layers(tmp_path, monkeypatch):
    """Demo (8 experts of 3 x 224 x 128 float32 per layer), 4 slots, experts 3 at a time: the same down
    projections as with whole layers (1e-5 of each tensor's largest value), ridges and ranges alike."""
    from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR

    stats = profile_stage.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), profile_stage.Settings(samples=8, seq_len=64))
    per_expert = 3 * 224 * 128 * 4
    whole = merge.run(DEMO_MODEL_DIR, stats.stats, tmp_path / "whole", 4, MergeSpec(refit=True))
    seen = _chunk_reads(monkeypatch)
    spec = MergeSpec(refit=True, expert_memory=3 * per_expert)
    chunked = merge.run(DEMO_MODEL_DIR, stats.stats, tmp_path / "chunked", 4, spec)
    assert [chunk for chunk, _, _ in seen] == [3] * 4  # every MoE layer ran its experts 3 at a time
    assert all(reads > 3 and alone > 0 for _, reads, alone in seen), seen  # chunks per batch, slots alone
    want, got = downs(tmp_path / "whole"), downs(tmp_path / "chunked")
    assert len(want) == 16 and sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5 * float(value.abs().max()), msg=name)
    for a, b in zip(chunked.refit_fits, whole.refit_fits, strict=True):
        assert a.ridges == b.ridges and a.original_max_abs == b.original_max_abs
        assert a.original_max_norm == pytest.approx(b.original_max_norm, rel=1e-12)
        assert a.max_abs == pytest.approx(b.max_abs, rel=1e-4)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_tiny_families_refit_with_expert_memory(model_type, tiny_factory, tmp_path, monkeypatch):
    """Softmax (Qwen3-MoE) and sigmoid routers with shared experts (DeepSeek-V3): chunked equals whole."""
    folder, model = tiny_factory(model_type)
    if not (folder / "tokenizer.json").exists():
        save_char_tokenizer(folder)
    write_docs(tmp_path / "cal.jsonl", 8, seed=4)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    layer = next(i for i, block in enumerate(model.model.layers) if hasattr(block.mlp, "experts"))
    experts = model.model.layers[layer].mlp.experts
    per_expert = sum(p[0].numel() * p.element_size() for p in experts.parameters(recurse=False))
    keep = experts.num_experts // 2
    merge.run(folder, stats, tmp_path / "whole", keep, MergeSpec(refit=True))
    seen = _chunk_reads(monkeypatch)
    merge.run(folder, stats, tmp_path / "chunked", keep, MergeSpec(refit=True, expert_memory=2 * per_expert))
    assert seen and all(chunk == 2 and alone > 0 for chunk, _, alone in seen), seen
    want, got = _written(tmp_path / "whole", "down_proj.weight"), _written(tmp_path / "chunked", "down_proj.weight")
    assert want and sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5 * float(value.abs().max()), msg=name)


def test_expert_memory_refusals(tiny_factory, tmp_path):
    """Without --refit, with stored refit sums, below one expert: one line each, nothing written."""
    folder, _ = tiny_factory("qwen3_moe")
    if not (folder / "tokenizer.json").exists():
        save_char_tokenizer(folder)
    write_docs(tmp_path / "cal.jsonl", 4, seed=4)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    summed = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings(refit_stats=True)).stats
    cases = [
        (stats, MergeSpec(expert_memory=10**9), "--expert-memory applies to --refit only"),
        (summed, MergeSpec(refit=True, expert_memory=10**9), "so --expert-memory does not apply"),
        (stats, MergeSpec(refit=True, expert_memory=16), r"--expert-memory 16 bytes holds no expert of model\.layers"),
    ]
    for given, spec, message in cases:
        with pytest.raises(MoePruneError, match=message if "\\" in message else re.escape(message)):
            merge.run(folder, given, tmp_path / "out", 2, spec)
        assert not (tmp_path / "out").exists()


def test_cli_takes_expert_memory_as_a_size(tiny_factory, tmp_path):
    folder, _ = tiny_factory("qwen3_moe")
    if not (folder / "tokenizer.json").exists():
        save_char_tokenizer(folder)
    write_docs(tmp_path / "cal.jsonl", 4, seed=4)
    stats, out = tmp_path / "s.npz", tmp_path / "out"
    args = ["profile", str(folder), "-d", str(tmp_path / "cal.jsonl"), "--seq-len", "16", "-o", str(stats)]
    assert runner.invoke(app, args).exit_code == 0
    merge_args = ["merge", str(folder), "-s", str(stats), "-k", "2", "-o", str(out), "--refit"]
    result = runner.invoke(app, [*merge_args, "--expert-memory", "lots"])
    assert result.exit_code == 1 and "--expert-memory" in result.output and "lots" in result.output, result.output
    result = runner.invoke(app, [*merge_args, "--expert-memory", "20KB"])
    assert result.exit_code == 0, result.output
