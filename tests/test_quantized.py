"""FP8 block-quantized and MXFP4 checkpoints, end to end: profile, score, merge, prune, eval, finetune.

The quantized checkpoints are built here from tiny float models with quantizers written in this
file (round-to-nearest FP8 e4m3 with per-block scale_inv; MXFP4 with OCP-style shared exponents),
independently of `moe_prune.checkpoint.quantized`, and every result on them is compared with the
same command on their dequantized float copy (dequantized here too).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import checkpoint_tensors
from safetensors.torch import load_file, save_file
from tiny_models import save_char_tokenizer, tiny_config
from transformers import AutoModelForCausalLM

from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.quantized import FP8, Quantization, group, quantize_fp8, read_float
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.scoring.selection import Budget
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, merge, profile, prune
from moe_prune.stages.score import score

SEQ = 16
FP8_MAX = 448.0
FP8_BLOCK = 128
# FP8 checkpoints shaped as Qwen3-FP8 and DeepSeek-V3 ship them: 128x128 blocks with float32
# scale_inv, every tensor that is not quantized (embeddings, norms, router, head) bfloat16, config
# dtype bfloat16. qwen3_moe: every FP8 linear tiles the blocks (transformers' FineGrainedFP8Config
# loads it); deepseek_v3: kv_a_proj_with_mqa has 576 rows (kv_lora_rank 512 + rope 64) as in the
# release, a partial edge block that transformers' loader gets wrong, so moe-prune loads it itself.
FP8_SHAPES = {
    "qwen3_moe": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 128,
        "head_dim": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    },
    "deepseek_v3": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 128,
        "kv_lora_rank": 512,
        "q_lora_rank": 128,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
}
FP8_FAMILIES = list(FP8_SHAPES)
FP8_QUANTIZATION = {
    "quant_method": "fp8",
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
FAMILIES = [*FP8_FAMILIES, "gpt_oss"]
TILING = ["qwen3_moe", "gpt_oss"]  # the quantized families stock transformers' dequantizing loaders read exactly


# -- an independent FP8 quantizer (loops over blocks) ---------------------------------------------


def fp8_quantize(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = weight.shape
    grid = (math.ceil(rows / block), math.ceil(cols / block))
    scale = torch.ones(grid)
    out = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = weight[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            amax = float(tile.abs().max())
            scale[i, j] = amax / FP8_MAX if amax > 0 else 1.0
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return out, scale


def fp8_dequantize(weight: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """In float64 (exact: 4-bit times 24-bit mantissas), rounded once to float32."""
    expanded = scale.double().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return (weight.double() * expanded[: weight.shape[0], : weight.shape[1]]).float()


def fp8_half_step(x: torch.Tensor) -> torch.Tensor:
    """Half the e4m3 spacing at |x| (x in FP8 units): 2^(e-4) for normals, 2^-10 in the subnormal range."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0**-6)))
    return torch.exp2(exponent - 4)


# -- an independent MXFP4 quantizer (OCP: exponent floor(log2 amax) - 2, clamp to 6) --------------
# Every fifth output row gets one more than that: still valid MXFP4, but bytes that a re-quantizer
# would not reproduce, so copying untouched experts is told apart from re-quantizing them.

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float [E, in, out] -> blocks [E, out, in/32, 16] (low nibble = even element), scales [E, out, in/32]."""
    experts, width, out = weight.shape
    blocks = torch.zeros(experts, out, width // 32, 16, dtype=torch.uint8)
    scales = torch.zeros(experts, out, width // 32, dtype=torch.uint8)
    for e in range(experts):
        for o in range(out):
            for g in range(width // 32):
                values = weight[e, g * 32 : (g + 1) * 32, o].tolist()
                amax = max(abs(v) for v in values)
                exponent = math.floor(math.log2(amax)) - 2 if amax > 0 else -127
                exponent += o % 5 == 0  # valid but not the smallest exponent: re-quantizing would change bytes
                scales[e, o, g] = exponent + 127
                codes = []
                for v in values:
                    scaled = min(abs(v) / 2.0**exponent, 6.0)
                    code = min(range(8), key=lambda c: abs(E2M1[c] - scaled))
                    codes.append(code + (8 if v < 0 and code else 0))
                for k in range(16):
                    blocks[e, o, g, k] = codes[2 * k] | (codes[2 * k + 1] << 4)
    return blocks, scales


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1 + [-v for v in E2M1])
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32).long()
    values = lut[codes] * torch.exp2(scales.float() - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1).transpose(-1, -2).contiguous()


def mxfp4_half_step(x: torch.Tensor) -> torch.Tensor:
    """Half the E2M1 spacing at |x| (x in units of the shared scale)."""
    x = x.abs()
    return torch.where(x < 2, 0.25, torch.where(x < 4, 0.5, 1.0))


# -- tiny quantized checkpoints and their dequantized copies --------------------------------------


def _fp8_target(name: str, tensor: torch.Tensor) -> bool:
    """What DeepSeek-V3 / Qwen3-FP8 quantize: 2-D linear weights, not embeddings, head, norms or router."""
    skip = ("embed", "lm_head", "norm", "mlp.gate.weight")
    return tensor.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def _release_shaped(family: str, folder: Path) -> None:
    """A tiny float model with the dims an FP8 release tiles in 128x128 blocks (few layers and experts)."""
    config = tiny_config(family, **FP8_SHAPES[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # as build_tiny: experts and router matter, so tests can fail
        for name, param in model.named_parameters():
            if "experts" in name or "gate" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder)


def _release_dtype(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """What the releases (FP8 and gpt-oss) store for tensors they do not quantize: bfloat16 (DeepSeek-V3's router
    bias: float32)."""
    return tensor if "correction_bias" in name else tensor.to(torch.bfloat16)


def _write(folder: Path, tensors: dict, config: dict) -> None:
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    save_char_tokenizer(folder)


def _gpt_oss(folder: Path) -> None:
    """Tiny gpt_oss whose expert dims are multiples of 32 (MXFP4 blocks)."""
    config = tiny_config("gpt_oss")
    config.hidden_size = config.intermediate_size = 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name or "router" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """`quantized(family)` -> (quantized folder, dequantized float copy folder)."""
    made: dict[str, tuple[Path, Path]] = {}

    def make(family: str) -> tuple[Path, Path]:
        if family in made:
            return made[family]
        root = tmp_path_factory.mktemp(family)
        if family == "gpt_oss":
            _gpt_oss(root / "float")
        else:
            _release_shaped(family, root / "float")
        state = load_file(root / "float" / "model.safetensors")
        config = json.loads((root / "float" / "config.json").read_text())
        stored, plain = {}, {}
        for name, tensor in state.items():
            if family == "gpt_oss" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = mxfp4_quantize(tensor.float())
                stored[name + "_blocks"], stored[name + "_scales"] = blocks, scales
                plain[name] = mxfp4_dequantize(blocks, scales)
            elif family != "gpt_oss" and _fp8_target(name, tensor):
                weight, scale = fp8_quantize(tensor, FP8_BLOCK)
                stored[name], stored[name + "_scale_inv"] = weight, scale
                plain[name] = fp8_dequantize(weight, scale, FP8_BLOCK)
            else:
                stored[name] = plain[name] = _release_dtype(name, tensor)
        if family == "gpt_oss":
            quant = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
        else:
            quant = FP8_QUANTIZATION
        config = {**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
        _write(root / "quantized", stored, {**config, "quantization_config": quant})
        _write(root / "dequantized", plain, config)
        made[family] = (root / "quantized", root / "dequantized")
        return made[family]

    return make


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "cal.jsonl"
    chars = string.ascii_letters + string.digits + ".,;:!?-"
    lines = [json.dumps({"text": "".join(rng.choice(chars) for _ in range(SEQ - 1))}) for _ in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _stats(ckpt: Checkpoint, seed: int = 0, tokens: int = 300) -> Stats:
    """Profile-like statistics from random router logits (same arrays for the same seed)."""
    rng = np.random.default_rng(seed)
    layers, experts, k = len(ckpt.identity.moe_layers), ckpt.config.num_experts, ckpt.config.top_k
    logits = rng.normal(size=(layers, tokens, experts))
    counts = np.stack([np.bincount(np.argsort(-z, axis=1)[:, :k].ravel(), minlength=experts) for z in logits])
    arrays = {"tokens": np.full(layers, tokens), "hard_counts": counts}
    arrays["logit_gram"] = np.einsum("lti,ltj->lij", logits, logits)
    return Stats(ckpt.identity, arrays)


# -- the dequantizing reader ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_read_float_equals_independent_dequantization(family, quantized):
    folder, plain = quantized(family)
    ckpt = Checkpoint.open(folder)
    want = checkpoint_tensors(plain)
    stored = group(ckpt.tensors, Quantization.from_config(ckpt.config.raw))
    assert sum(s.quantized for s in stored) >= 4
    assert {s.name for s in stored} == set(want)
    for s in stored:
        assert torch.equal(read_float(s), want[s.name].float()), s.name


def test_fp8_quantizer_agrees_with_transformers_where_shapes_tile():
    """Our FP8 quantizer is transformers' Fp8Quantize rule; on tiling shapes the bytes agree."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    weight = torch.randn(32, 48) * 0.3
    config = SimpleNamespace(weight_block_size=[16, 16], scale_fmt=None)
    theirs = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("w.weight", weight)
    ours = quantize_fp8(weight, (16, 16))
    assert torch.equal(ours[0].view(torch.uint8), theirs["w.weight"].view(torch.uint8))
    torch.testing.assert_close(ours[1], theirs["w.weight_scale_inv"], rtol=1e-6, atol=0)


# -- profile, score, eval: the quantized checkpoint behaves as its dequantized copy --------------


@pytest.mark.parametrize("sequential", [False, True], ids=["whole", "sequential"])
@pytest.mark.parametrize("family", FAMILIES)
def test_profile_equals_dequantized_copy(family, sequential, quantized, calibration):
    folder, plain = quantized(family)
    settings = profile.Settings(samples=1000, seq_len=SEQ, batch_size=4, sequential=sequential)
    got = profile.run(folder, str(calibration), settings).stats.arrays
    want = profile.run(plain, str(calibration), settings).stats.arrays
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        scale = float(np.abs(value).max()) if value.size else 0.0
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-6 * scale, err_msg=key)


def test_fp8_fixtures_are_shaped_like_the_releases(quantized):
    """bf16 tensors beside quantized ones, bf16 config dtype; FP8: 128x128 blocks, one family tiling them, one
    with a 576-row tensor."""
    for family in FAMILIES:
        folder, _ = quantized(family)
        ckpt = Checkpoint.open(folder)
        config = ckpt.config.raw
        assert config["dtype"] == config["torch_dtype"] == "bfloat16"
        stored = group(ckpt.tensors, Quantization.from_config(config))
        plain = {s.data.dtype for s in stored if not s.quantized and "correction_bias" not in s.name}
        assert plain == {"BF16"}, plain
        if family not in FP8_FAMILIES:
            continue
        assert config["quantization_config"]["weight_block_size"] == [128, 128]
        rows = {s.shape[0] for s in stored if s.quantized}
        assert any(r % 128 for r in rows) == (family not in TILING), rows
    assert 576 in {s.shape[0] for s in group(Checkpoint.open(quantized("deepseek_v3")[0]).tensors, Quantization(FP8))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "auto"])
def test_quantized_loads_as_dequantized_copy(dtype, quantized):
    """Whichever loader a quantized checkpoint takes, its weights are its dequantized copy's: values and dtypes."""
    for family in FAMILIES:
        folder, plain = quantized(family)
        got, want = load_model(folder, dtype), load_model(plain, dtype)
        got = {**dict(got.named_parameters()), **dict(got.named_buffers())}
        want = {**dict(want.named_parameters()), **dict(want.named_buffers())}
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype, (family, name, got[name].dtype, tensor.dtype)
            assert torch.equal(got[name], tensor), (family, name)


@pytest.mark.parametrize("family", FP8_FAMILIES)
def test_cli_runs_release_shaped_fp8_with_default_options(family, quantized, calibration, tmp_path):
    """The issue's commands with their default options (--dtype float32), as a user types them: exit 0 each,
    and the statistics (whole and --sequential) equal those of the dequantized copy."""
    from typer.testing import CliRunner

    from moe_prune.cli import app

    folder, plain = quantized(family)

    def cli(*args: object) -> None:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (args, result.stderr)

    cli("profile", plain, "--data", calibration, "--out", tmp_path / "plain.npz")
    cli("profile", folder, "--data", calibration, "--out", tmp_path / "whole.npz")
    cli("profile", folder, "--data", calibration, "--sequential", "--out", tmp_path / "sequential.npz")
    want = Stats.load(tmp_path / "plain.npz").arrays
    for name in ("whole", "sequential"):
        got = Stats.load(tmp_path / f"{name}.npz").arrays
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            scale = float(np.abs(value).max()) if value.size else 0.0
            np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-6 * scale, err_msg=f"{name} {key}")
    stats, mask = tmp_path / "whole.npz", tmp_path / "mask.json"
    cli("score", stats, "--model", folder, "--criterion", "reap", "--drop", 2, "--out", mask)
    cli("prune", folder, "--mask", mask, "--out", tmp_path / "pruned")
    cli("merge", folder, "--stats", stats, "--keep", 6, "--out", tmp_path / "merged")
    for model in (folder, tmp_path / "pruned", tmp_path / "merged"):
        cli("eval", model, "--data", calibration)
    tokens = ("--tokens", 2 * SEQ, "--seq-len", SEQ, "--batch-size", 2, "--eval-tokens", 0)  # the data is tiny
    cli("finetune", tmp_path / "pruned", "--data", calibration, *tokens, "--out", tmp_path / "finetuned")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("criterion", ["weight-norm", "weight-similarity", "stable-rank", "router-weight-norm"])
def test_weight_criteria_rank_the_same(family, criterion, quantized):
    folder, plain = quantized(family)
    _, got = score(None, folder, criterion, budget=Budget(drop=2))
    _, want = score(None, plain, criterion, budget=Budget(drop=2))
    assert got.dropped == want.dropped
    for layer, values in want.scores.items():
        np.testing.assert_allclose(got.scores[layer], values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_equals_dequantized_copy(family, quantized, calibration):
    folder, plain = quantized(family)
    got = evaluate.run(folder, EvalSpec(data=str(calibration), seq_len=SEQ, batch_size=4)).model.perplexity
    want = evaluate.run(plain, EvalSpec(data=str(calibration), seq_len=SEQ, batch_size=4)).model.perplexity
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-6)


# -- merge: float merge of the dequantized experts, written back quantized ------------------------


def _requantization_error(family: str, got: torch.Tensor, want: torch.Tensor, out: dict, name: str) -> torch.Tensor:
    """|got - want| in units of half a quantization step at `want` under the scales `got` was written with."""
    if family == "gpt_oss":
        scale = torch.exp2(out[name + "_scales"].float() - 127)  # [E, out, in/32]
        per_value = scale.repeat_interleave(32, -1).transpose(-1, -2)  # [E, in, out]
        units = want / per_value
        assert (units.abs() <= 6 + 1e-6).all(), "a shared exponent too small for its block (clipping)"
        group_max = units.transpose(-1, -2).unflatten(-1, (-1, 32)).abs().amax(-1)
        assert (group_max > 3).all(), "a shared exponent larger than its block needs (stale, not fresh)"
        return (got - want).abs() / (mxfp4_half_step(units) * per_value)
    block = FP8_BLOCK
    scale = out[name + "_scale_inv"]
    per_value = scale.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., : want.shape[-2], : want.shape[-1]]
    units = want / per_value
    assert (units.abs() <= FP8_MAX * (1 + 1e-6)).all(), "a block scale too small for its block"
    for i in range(scale.shape[-2]):
        for j in range(scale.shape[-1]):
            tile = units[..., i * block : (i + 1) * block, j * block : (j + 1) * block]
            assert float(tile.abs().max()) > FP8_MAX * 0.99, "a block scale larger than its block needs (not fresh)"
    return (got - want).abs() / (fp8_half_step(units) * per_value)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_quantized_experts_equal_float_merge_up_to_quantization(family, quantized, tmp_path):
    folder, plain = quantized(family)
    ckpt = Checkpoint.open(folder)
    keep = ckpt.config.num_experts - 2  # 6 clusters of 8 experts (3 per routing group): merged and untouched
    result = merge.run(folder, _stats(ckpt), tmp_path / "q", keep)
    merge.run(plain, _stats(Checkpoint.open(plain)), tmp_path / "f", keep)
    out_ckpt = Checkpoint.open(tmp_path / "q")
    assert out_ckpt.config.raw["quantization_config"] == ckpt.config.raw["quantization_config"]
    source, out, float_out = (
        checkpoint_tensors(folder),
        checkpoint_tensors(tmp_path / "q"),
        checkpoint_tensors(tmp_path / "f"),
    )
    assert {k: v.dtype for k, v in out.items() if k in source} == {k: source[k].dtype for k in out if k in source}
    stored = group(out_ckpt.tensors, Quantization.from_config(out_ckpt.config.raw))
    merged_experts = untouched = 0
    worst = []
    for report in result.layers:
        for slot, cluster in enumerate(report.clusters):
            names = [s for s in stored if s.quantized and f"layers.{report.layer}." in s.name]
            for s in names:
                per_expert = ".experts.gate_up_proj" not in s.name and ".experts.down_proj" not in s.name
                if per_expert and f".experts.{slot}." not in s.name:
                    continue
                got, want = read_float(s), float_out[s.name].float()
                parts = [p.name for p in s.infos]
                if not per_expert:
                    got, want = got[slot], want[slot]
                if len(cluster.members) == 1:  # untouched: the input's own bytes
                    untouched += 1
                    old = s.name.replace(f".experts.{slot}.", f".experts.{cluster.anchor}.")
                    for part, old_part in zip(parts, [p.replace(s.name, old) for p in parts], strict=True):
                        a, b = out[part], source[old_part]
                        a, b = (a, b) if per_expert else (a[slot], b[cluster.anchor])
                        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), part
                    continue
                merged_experts += 1
                index = (slot,) if not per_expert else ()
                scales = {p: out[p][index] if index else out[p] for p in parts}
                error = _requantization_error(family, got, want, scales, s.name)
                assert float(error.max()) <= 1.0 + 1e-4, (s.name, float(error.max()))
                worst.append(float((got - want).abs().max() / want.abs().max()))
    assert merged_experts and untouched
    assert max(worst) > 0  # re-quantized, not copied


def readme_cpu_load(folder: Path):
    """The README's way to run a quantized output in stock transformers on CPU, exactly as written there.

    transformers dequantizes the FP8 linears to float32 but leaves what is stored bfloat16 so: `.float()`.
    """
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).float().eval()


def test_stock_transformers_misloads_a_partial_fp8_block(quantized):
    """Why the README sends DeepSeek-V3-shaped outputs (576 rows in 128-row blocks) to moe-prune's loader on CPU.

    transformers' dequantizing loader infers the block from the scale grid: it raises or loads wrong
    weights. Once a transformers release loads it exactly, this fails and the README can drop the exception.
    """
    folder, plain = quantized("deepseek_v3")
    ids = torch.randint(0, 100, (2, 9))
    try:
        stock = readme_cpu_load(folder)
    except RuntimeError:
        return
    with torch.no_grad():
        assert not torch.allclose(stock(ids).logits, load_model(plain)(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", TILING)
def test_merged_quantized_checkpoint_reloads_in_stock_transformers(family, quantized, tmp_path):
    folder, _ = quantized(family)
    ckpt = Checkpoint.open(folder)
    merge.run(folder, _stats(ckpt), tmp_path / "q", 4)
    model = readme_cpu_load(tmp_path / "q")
    ours = load_model(tmp_path / "q")
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


# -- prune: bytes copied, the pruned checkpoint runs as the pruned dequantized copy ---------------


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_quantized_checkpoint_runs_as_pruned_copy(family, quantized, tmp_path):
    folder, plain = quantized(family)
    outputs = []
    for source, name in ((folder, "q"), (plain, "f")):
        identity = Checkpoint.open(source).identity
        keep = {layer: (0, 2, 3, 5, 6, 7) for layer in identity.moe_layers}
        prune.run(source, DropMask(identity, keep), tmp_path / name, max_shard_size="40KB")  # weights, scales apart
        outputs.append(tmp_path / name)
    pruned = Checkpoint.open(outputs[0])
    assert pruned.config.raw["quantization_config"] and len(pruned.shard_files) > 1
    _, got_scores = score(None, outputs[0], "weight-norm", budget=Budget(drop=2))
    _, want_scores = score(None, outputs[1], "weight-norm", budget=Budget(drop=2))
    for layer, values in want_scores.scores.items():
        np.testing.assert_allclose(got_scores.scores[layer], values, rtol=1e-5)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        got, want = load_model(outputs[0])(ids).logits, load_model(outputs[1])(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if family in TILING:  # transformers' own FP8 loader is exact only where shapes tile the blocks
            stock = readme_cpu_load(outputs[0])
            torch.testing.assert_close(stock(ids).logits, want, rtol=1e-5, atol=1e-5)


# -- finetune: written dequantized, said so -------------------------------------------------------


def test_finetune_writes_dequantized_checkpoint(quantized, calibration, tmp_path):
    from moe_prune.stages import finetune
    from moe_prune.training.options import FinetuneOptions

    folder, _ = quantized("deepseek_v3")
    options = FinetuneOptions(tokens=2 * SEQ, seq_len=SEQ, batch_size=2, eval_tokens=0)
    result = finetune.run(folder, str(calibration), tmp_path / "ft", options)
    assert any("quantized" in w and "dequantized" in w for w in result.warnings), result.warnings
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(v.dtype != torch.float8_e4m3fn for v in checkpoint_tensors(tmp_path / "ft").values())
    load_model(tmp_path / "ft")


def test_fp8_scales_moe_prune_cannot_read_are_refused(quantized, tmp_path):
    """ue8m0 scales stored as bytes are not multiplied in as if they were float scales."""
    folder, _ = quantized("qwen3_moe")
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    state = {
        k: (v.log2().round() + 127).to(torch.uint8) if k.endswith("_scale_inv") else v
        for k, v in checkpoint_tensors(copy).items()
    }
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match="FP8 scales of dtype U8"):
        score(None, copy, "weight-norm", budget=Budget(drop=1))


def test_fp8_without_quantization_config_is_still_refused(quantized, tmp_path):
    """FP8 tensors are dequantized only when config.json says how: otherwise their raw values are not weights."""
    folder, _ = quantized("qwen3_moe")
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError, match=r"F8_E4M3 \(quantised\)"):
        score(None, copy, "weight-norm", budget=Budget(drop=1))
    with pytest.raises(MoePruneError, match="F8_E4M3"):
        merge.run(copy, _stats(Checkpoint.open(copy)), tmp_path / "out", 6)


# -- the README's FP8 loading code, run as written ------------------------------------------------


def readme_fp8_loading_blocks() -> list[str]:
    """The python blocks of the README's "Loading an FP8 output outside moe-prune" paragraph, in order."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("**Loading an FP8 output outside moe-prune.**")
    end = text.index("\n## ", start)
    section = text[start:end]
    return [block.split("\n", 1)[1] for block in section.split("```python")[1:]]


@pytest.mark.parametrize(
    ("family", "folder_name", "block"), [("qwen3_moe", "q-pruned", 0), ("deepseek_v3", "ds-pruned", 1)]
)
def test_readme_fp8_loading_code_runs_as_written(family, folder_name, block, quantized, tmp_path):
    """Each README block, its folder name swapped for a pruned FP8 fixture, gives the pruned dequantized copy's
    logits (the CPU route the README names for each family)."""
    code = readme_fp8_loading_blocks()[block].split("```")[0]
    assert f'"{folder_name}"' in code
    folder, plain = quantized(family)
    outputs = {}
    for source, name in ((folder, folder_name), (plain, "plain")):
        identity = Checkpoint.open(source).identity
        prune.run(
            source, DropMask(identity, {layer: (0, 2, 3, 5, 6, 7) for layer in identity.moe_layers}), tmp_path / name
        )
        outputs[name] = tmp_path / name
    scope: dict = {}
    exec(code.replace(f'"{folder_name}"', repr(str(outputs[folder_name]))), scope)  # the README's own code
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(
            scope["model"](ids).logits, load_model(outputs["plain"])(ids).logits, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("block", [None, (128, 128)])
def test_fp8_per_tensor_scale_multiplies_every_element(block):
    """One scale for the whole tensor (per-tensor FP8, with or without a block size in the config): the weight
    times that scale, element by element, whatever the tensor's shape (a hand computation in float64)."""
    from moe_prune.checkpoint.quantized import dequantize_fp8

    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(3, 200, 130, generator=generator) * 20).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.037], dtype=torch.float32)
    got = dequantize_fp8(weight, scale, block)
    want = weight.to(torch.float64) * 0.037
    assert got.dtype == torch.float32 and got.shape == weight.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_fp8_block_scales_of_the_wrong_grid_are_one_error():
    from moe_prune.checkpoint.quantized import dequantize_fp8

    weight = torch.zeros(256, 200).to(torch.float8_e4m3fn)
    with pytest.raises(
        ValueError, match=r"scale_inv has shape \(2, 1\), but \(256, 200\) in \[128, 128\] blocks needs \(2, 2\)"
    ):
        dequantize_fp8(weight, torch.ones(2, 1), (128, 128))


def test_fp8_finite_on_stored_bytes_equals_isfinite_of_the_dequantized_tensor():
    """`fp8_finite` (read_expert_tensor's check of FP8 tensors, on the stored bytes) against `isfinite` over the
    dequantized float32: clean tensors, a NaN code (0x7F / 0xFF) anywhere, NaN/Inf scales, and scales whose product
    with 448 passes float32's largest value (and one just within it)."""
    from moe_prune.checkpoint.quantized import dequantize_fp8, fp8_finite

    generator = torch.Generator().manual_seed(4)
    big = torch.finfo(torch.float32).max
    for case in range(40):
        weight = (torch.randn(256, 384, generator=generator) * 100).to(torch.float8_e4m3fn)
        scale = torch.rand(2, 3, generator=generator) + 0.01
        if case % 5 == 1:
            raw = weight.view(torch.uint8)
            raw.view(-1)[int(torch.randint(0, raw.numel(), (1,), generator=generator))] = 0x7F | (0x80 * (case % 2))
        elif case % 5 == 2:
            scale[case % 2, case % 3] = float("nan") if case % 2 else float("inf")
        elif case % 5 == 3:
            scale[1, 2] = big / 448 * (1.5 if case % 2 else 0.999)
            weight.view(torch.uint8)[200, 300] = 0x7E  # 448, in the block of the large scale
        want = bool(torch.isfinite(dequantize_fp8(weight, scale, (128, 128))).all())
        assert fp8_finite(weight, scale) == want, case
