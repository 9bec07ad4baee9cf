"""A random checkpoint with a preset's exact on-disk layout, written one shard at a time (never the whole model).

    python -m benchmarks.checkpoint_writer PRESET MOE_LAYERS FOLDER

Tensor names, shapes and dtypes: transformers' model class of the preset built on the meta device (no
memory), turned into the on-disk layout by transformers' `revert_weight_conversion`, the step
`save_pretrained` runs (per-expert tensors for Qwen3-MoE, DeepSeek-V3 and Mixtral; fused for gpt-oss).
Values: weights normal(0, 0.02) in bfloat16, norms one, biases zero; FP8 (DeepSeek-V3) every 2-D linear
weight but embeddings, head, norms and router as float8_e4m3fn with float32 `weight_scale_inv` per 128x128
block (edge blocks partial, as kv_a_proj_with_mqa's 576 rows are in the release); MXFP4 (gpt-oss) the
experts' `gate_up_proj`/`down_proj` as `_blocks` [E, out, in/32, 16] and `_scales` [E, out, in/32] uint8.
Written here rather than through moe-prune's writer: this builds the benchmark's input, and must not depend
on the code it measures. The folder appears whole (written under a temporary name, then renamed).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from benchmarks.real_presets import PRESETS, Preset

SHARD_BYTES = 2 * 10**9
BLOCK = 128
STD = 0.02
FP8_SKIP = ("embed", "lm_head", "norm", "mlp.gate.weight")


def on_disk_layout(preset: Preset, config: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the float checkpoint `save_pretrained` would write for `config`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    raw = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type", "architectures")}
    hf_config = AutoConfig.for_model(preset.model_type, **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    state = revert_weight_conversion(model, model.state_dict())
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _float(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if "correction_bias" in name:
        return torch.zeros(shape, dtype=torch.float32)
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith(("bias", "sinks")):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, STD)


def _fp8(name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """FP8 weight whose values dequantize to about normal(0, STD), with one float32 scale per 128x128 block."""
    codes = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 64.0).clamp_(-448, 448).to(torch.float8_e4m3fn)
    scales = torch.full((math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK)), STD / 64.0, dtype=torch.float32)
    return {name: codes, name + "_scale_inv": scales}


def _mxfp4(name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """[E, in, out] experts as MXFP4: random E2M1 codes, exponents about 2^-7 (largest value about 0.05)."""
    experts, width, out = shape
    blocks = torch.randint(0, 256, (experts, out, width // 32, 16), dtype=torch.uint8)
    scales = torch.randint(119, 122, (experts, out, width // 32), dtype=torch.uint8)
    return {name + "_blocks": blocks, name + "_scales": scales}


def tensors(preset: Preset, name: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The stored tensor(s) of one float tensor of the model, in the preset's quantization."""
    quant = preset.quantization
    if quant == "fp8" and len(shape) == 2 and name.endswith(".weight") and not any(s in name for s in FP8_SKIP):
        return _fp8(name, shape)
    if quant == "mxfp4" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return _mxfp4(name, shape)
    return {name: _float(name, shape)}


def build_checkpoint(preset: Preset, moe_layers: int, folder: Path) -> Path:
    """Write the random checkpoint shard by shard (at most SHARD_BYTES held), then its index and config."""
    config = preset.config(moe_layers)
    layout = on_disk_layout(preset, config)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    held = 0
    names = sorted(layout, key=_natural)
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        nonlocal held
        if not shards[-1]:
            return
        files.append(f"model-{len(files) + 1:05d}.safetensors")
        save_file(shards[-1], tmp / files[-1], metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], files[-1]))
        shards[-1], held = {}, 0

    for name in names:
        for key, tensor in tensors(preset, name, layout[name][0]).items():
            size = tensor.numel() * tensor.element_size()
            if held and held + size > SHARD_BYTES:
                flush()
            shards[-1][key] = tensor
            held += size
            total += size
    flush()
    count = len(files)
    renamed = {f: f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        (tmp / old).rename(tmp / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(folder)
    return folder


def layer_bytes(preset: Preset, folder: Path, dtype: str) -> int:
    """Bytes of the last (an MoE) decoder layer dequantized to `dtype` (scales not counted)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    prefix = f"model.layers.{config['num_hidden_layers'] - 1}."
    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    values = 0
    for name, file in index["weight_map"].items():
        if not name.startswith(prefix) or name.endswith(("_scale_inv", "_scales")):
            continue
        with safe_open(folder / file, "pt") as handle:
            numel = math.prod(handle.get_slice(name).get_shape())
        values += numel * (2 if name.endswith("_blocks") else 1)
    return values * width


if __name__ == "__main__":
    build_checkpoint(PRESETS[sys.argv[1]], int(sys.argv[2]), Path(sys.argv[3]))
