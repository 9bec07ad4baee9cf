"""Weight criteria read in bounded pieces (issue #24): equal to a float64 brute force, and never a layer's stack.

The brute force reads the checkpoint with safetensors (dequantized here for the quantized ones, by
test_quantized's own quantizers) and computes each criterion in float64, expert by expert.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpoint_tensors
from safetensors.torch import save_file
from test_quantized import fp8_dequantize, fp8_quantize, mxfp4_dequantize, mxfp4_quantize, quantized  # noqa: F401

from moe_prune.checkpoint import expert_weights
from moe_prune.checkpoint import quantized as quantized_module
from moe_prune.checkpoint.quantized import FP8, MXFP4, Quantization, group, read_float
from moe_prune.checkpoint.safetensors_io import read_header
from moe_prune.scoring.selection import Budget
from moe_prune.stages.score import score

CRITERIA = ["weight-norm", "weight-similarity", "stable-rank", "router-weight-norm"]
ROUTERS = {
    "mixtral": "block_sparse_moe.gate.weight",
    "qwen3_moe": "mlp.gate.weight",
    "gpt_oss": "mlp.router.weight",
    "llama4_text": "feed_forward.router.weight",
    "dbrx": "ffn.router.layer.weight",
    "deepseek_v3": "mlp.gate.weight",
}
SMALL_BLOCK = 16  # FP8 blocks the tiny DeepSeek-V3's 24 x 32 experts do not tile: partial edge blocks
# Layouts: per-expert float, fused float (gpt-oss with biases, Llama 4), dbrx's blocked [E*I, H], FP8 per-expert
# DeepSeek-V3 (128 and 16-row blocks), MXFP4 gpt-oss.
MODELS = ["mixtral", "qwen3_moe", "gpt_oss", "llama4_text", "dbrx", "fp8-128", "fp8-16", "mxfp4"]


@pytest.fixture(scope="module")
def model(tiny_factory, quantized, tmp_path_factory):  # noqa: F811 (test_quantized's fixture)
    """`model(name)` -> (folder to score, folder of the same weights in float, family)."""

    def make(name: str) -> tuple[Path, Path, str]:
        if name == "fp8-128":
            return (*quantized("deepseek_v3"), "deepseek_v3")
        if name == "mxfp4":
            return (*quantized("gpt_oss"), "gpt_oss")
        if name == "fp8-16":
            return (*_small_block_fp8(tiny_factory("deepseek_v3")[0], tmp_path_factory.mktemp("fp8-16")), "deepseek_v3")
        folder = tiny_factory(name)[0]
        return folder, folder, name

    return make


def _small_block_fp8(source: Path, root: Path) -> tuple[Path, Path]:
    """The tiny DeepSeek-V3 with its routed experts' matrices FP8 in 16 x 16 blocks, and its dequantized copy."""
    stored, plain = {}, {}
    for name, tensor in checkpoint_tensors(source).items():
        if re.search(r"\.experts\.\d+\..*\.weight$", name):
            weight, scale = fp8_quantize(tensor.float(), SMALL_BLOCK)
            stored[name], stored[name + "_scale_inv"] = weight, scale
            plain[name] = fp8_dequantize(weight, scale, SMALL_BLOCK)
        else:
            stored[name] = plain[name] = tensor
    config = json.loads((source / "config.json").read_text())
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [SMALL_BLOCK, SMALL_BLOCK]}
    for folder, tensors, extra in ((root / "q", stored, {"quantization_config": quant}), (root / "f", plain, {})):
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps({**config, **extra}))
    return root / "q", root / "f"


def brute_force(folder: Path, family: str, criterion: str) -> dict[int, np.ndarray]:
    """Each MoE layer's scores in float64, from every expert's tensors read whole with safetensors."""
    experts: dict[int, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    routers: dict[int, torch.Tensor] = {}
    for name, tensor in sorted(checkpoint_tensors(folder).items()):
        found = re.search(r"\.(?:layers|blocks)\.(\d+)\.", name)
        if found is None:
            continue
        layer, tensor = int(found[1]), tensor.double()
        if name.endswith(ROUTERS[family]):
            routers[layer] = tensor
        elif ".experts." in name and "shared" not in name:
            if slot := re.search(r"\.experts\.(\d+)\.", name):
                experts[layer][int(slot[1])].append(tensor)
                continue
            n = routers[layer].shape[0] if layer in routers else 8
            for e, part in enumerate(tensor.reshape(n, -1, *tensor.shape[1:]) if tensor.shape[0] != n else tensor):
                experts[layer][e].append(part)
    return {layer: _scores(experts[layer], routers[layer], criterion) for layer in sorted(routers)}


def _scores(experts: dict[int, list[torch.Tensor]], router: torch.Tensor, criterion: str) -> np.ndarray:
    flat = torch.stack([torch.cat([t.reshape(-1) for t in experts[e]]) for e in range(len(experts))])
    if criterion == "weight-norm":
        return flat.norm(dim=1).numpy()
    if criterion == "router-weight-norm":
        return router.norm(dim=1).numpy()
    if criterion == "weight-similarity":
        unit = flat / flat.norm(dim=1, keepdim=True)
        return ((unit @ unit.T).sum(dim=1) - 1.0).numpy()
    ranks = []
    for e in range(len(experts)):
        sigmas = [torch.linalg.svdvals(t) for t in experts[e] if t.dim() == 2]
        ranks.append(np.mean([float((s**2).sum() / s[0] ** 2) for s in sigmas]))
    return np.asarray(ranks)


@pytest.mark.parametrize("bound", [None, 1000])
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", MODELS)
def test_weight_criteria_equal_a_float64_brute_force(model, name, criterion, bound, monkeypatch):
    """Whatever the bound (1000 bytes: one row of every expert at a time, row parts crossing FP8 blocks)."""
    folder, plain, family = model(name)
    if bound is not None:
        monkeypatch.setattr(expert_weights, "CHUNK_BYTES", bound)
    _, report = score(None, folder, criterion, budget=Budget(drop=2))
    want = brute_force(plain, family, criterion)
    assert sorted(report.scores) == sorted(want)
    for layer, values in want.items():
        np.testing.assert_allclose(report.scores[layer], values, rtol=2e-6, atol=1e-7, err_msg=f"layer {layer}")


@pytest.mark.parametrize("criterion", ["weight-similarity", "weight-norm", "stable-rank"])
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "dbrx", "fp8-16", "mxfp4"])
def test_no_read_is_larger_than_the_bound(model, name, criterion, monkeypatch):
    """Each tensor the reader returns (and each byte range it reads) fits the bound: similarity holds one such
    read per expert, so a read is at most bound / E; stable-rank reads one expert's matrix, never a layer's."""
    folder, _, family = model(name)
    _, whole = score(None, folder, criterion, budget=Budget(drop=2))
    bound, n = (1024 if criterion == "weight-norm" else 4096), 8  # rows are at most 512 bytes
    returned: list[tuple[str, int, object]] = []
    raw: list[int] = []
    reader, read_tensor = expert_weights.read_expert_tensor, quantized_module.read_tensor

    def recorded(stored, purpose, out=None, part=None):
        tensor = reader(stored, purpose, out, part)
        returned.append((stored.name, tensor.numel() * 4, part))
        return tensor

    def raw_recorded(info):
        raw.append(info.nbytes)
        return read_tensor(info)

    monkeypatch.setattr(expert_weights, "CHUNK_BYTES", bound)
    monkeypatch.setattr(expert_weights, "read_expert_tensor", recorded)
    monkeypatch.setattr(quantized_module, "read_tensor", raw_recorded)
    _, chunked = score(None, folder, criterion, budget=Budget(drop=2))
    experts = [(size, part) for stored, size, part in returned if not stored.endswith(ROUTERS[family])]
    sizes = [size for size, _ in experts]
    limit = {"weight-similarity": bound // n, "weight-norm": bound}.get(criterion)
    if limit is None:  # stable-rank: one expert's matrix (the largest of the tiny models is 128 x 64)
        limit = bound = max(sizes)
        assert limit <= 128 * 64 * 4 and all(part is None for _, part in experts)
    else:
        assert any(part is not None and part[0] > 0 for _, part in experts), "nothing was read in parts"
    assert max(sizes) <= limit and max(raw) <= bound
    for layer, values in whole.scores.items():
        np.testing.assert_allclose(chunked.scores[layer], values, rtol=1e-6, atol=1e-7)


def _stored(tmp_path: Path, tensors: dict[str, torch.Tensor], quant: Quantization):
    save_file(tensors, tmp_path / "t.safetensors")
    infos, _ = read_header(tmp_path / "t.safetensors")
    (stored,) = group(infos, quant)
    return stored


@pytest.mark.parametrize("shape", [(300, 200), (4, 150, 70)])
def test_a_row_part_of_an_fp8_tensor_equals_those_rows_of_the_whole(shape, tmp_path):
    """Rows read alone (with their block scales) are bit-equal to the same rows of the whole dequantized tensor,
    for parts that start and stop inside 128-row blocks, on them, and at the partial edge block."""
    torch.manual_seed(0)
    weight = torch.randn(shape)
    if len(shape) == 2:
        data, scale = fp8_quantize(weight, 128)
        want = fp8_dequantize(data, scale, 128)
    else:  # fused [E, rows, cols]: the leading axis is the experts', the scales have it too
        pairs = [fp8_quantize(w, 128) for w in weight]
        data, scale = torch.stack([d for d, _ in pairs]), torch.stack([s for _, s in pairs])
        want = torch.stack([fp8_dequantize(d, s, 128) for d, s in pairs])
    stored = _stored(tmp_path, {"w.weight": data, "w.weight_scale_inv": scale}, Quantization(FP8, (128, 128)))
    assert torch.equal(read_float(stored), want)
    count = shape[0]
    for part in [(0, count), (0, 1), (1, 3), (count - 1, count), (100, 260), (127, 129), (128, 256), (256, 300)]:
        if part[1] <= count:
            assert torch.equal(read_float(stored, part), want[part[0] : part[1]]), part


def test_a_row_part_of_an_mxfp4_tensor_is_those_output_columns(tmp_path):
    """MXFP4 stores `[E, out, in/32, 16]`: stored rows of one expert are output columns of its float `[in, out]`."""
    torch.manual_seed(0)
    blocks, scales = mxfp4_quantize(torch.randn(2, 64, 40))
    want = mxfp4_dequantize(blocks, scales)
    fused = _stored(tmp_path, {"x_blocks": blocks, "x_scales": scales}, Quantization(MXFP4))
    assert torch.equal(read_float(fused, (1, 2)), want[1:2])
    one = tmp_path / "one"
    one.mkdir()
    expert = _stored(one, {"x_blocks": blocks[1].clone(), "x_scales": scales[1].clone()}, Quantization(MXFP4))
    for part in [(0, 40), (3, 17), (39, 40)]:
        assert torch.equal(read_float(expert, part), want[1][:, part[0] : part[1]]), part


def test_an_expert_shaped_unlike_expert_0_is_refused(tiny_factory):
    """Checkpoint.open refuses wrong shapes first; the weight reader checks anyway (its chunks are one shape)."""
    from dataclasses import replace

    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.errors import MoePruneError

    folder, _ = tiny_factory("mixtral")
    weights = expert_weights.ExpertWeights(Checkpoint.open(folder))
    entries = weights._experts[0]
    index = next(i for i, (s, _) in enumerate(entries) if s.name.endswith("experts.3.w2.weight"))
    stored, key = entries[index]
    data = replace(stored.data, shape=(32, 47), end=stored.data.start + 32 * 47 * 4)
    entries[index] = (replace(stored, data=data), key)
    with pytest.raises(MoePruneError, match=r"experts\.3\.w2\.weight has shape \(32, 47\), expert 0's w2\.weight"):
        weights.load(0)
