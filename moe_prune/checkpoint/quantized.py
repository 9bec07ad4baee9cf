"""Stored tensors of a checkpoint as float32, and float32 written back in the checkpoint's own format.

The one place a stored (possibly quantized) tensor becomes float32 is `read_float`; score's weight
criteria, merge, `profile --sequential` and `load_model`'s fallback all call it, one tensor at a
time, so dequantizing never needs the whole model in memory. `group` pairs a quantized tensor with
its scales into one logical `Stored` tensor named as the float tensor would be.

Formats (from `quantization_config.quant_method` in config.json):
  fp8    DeepSeek-V3 / Qwen3-FP8: `F8_E4M3` `X.weight` with a float `X.weight_scale_inv` holding one
         scale per `weight_block_size` block (edge blocks may be partial), w = fp8 * scale_inv.
         Fused expert tensors are `X` + `X_scale_inv`, as transformers names them.
  mxfp4  gpt-oss experts: `X_blocks` (U8, two FP4 E2M1 codes a byte, low nibble first, 32 values a
         block) and `X_scales` (U8 E8M0 exponents, bias 127); the float tensor is `[E, in, out]`,
         the blocks `[E, out, in / 32, 16]`.

What comes from transformers, what is our own, and why:
- FP8 dequantizing: transformers' `_dequantize_fp8_weight` (finegrained_fp8), which handles partial
  edge blocks. The loader's `Fp8Dequantize` (what `FineGrainedFP8Config(dequantize=True)` runs)
  infers the block from the scale grid, which is wrong (silently) or raises when a dimension is not
  a multiple of the block, so `load_model` uses it only when every FP8 tensor tiles exactly.
- MXFP4 dequantizing: transformers' `convert_moe_packed_tensors` (mxfp4), as `Mxfp4Config(dequantize=True)`.
- FP8 quantizing (merge writes merged experts back): our own, same rule as transformers'
  `Fp8Quantize` (scale_inv = block amax / 448, round-to-nearest cast) because that op needs a
  quantizer object and leaves tensors whose shape is not a multiple of the block unquantized.
- MXFP4 quantizing: our own; transformers quantizes MXFP4 only through triton kernels (GPU). The
  shared exponent is the smallest that fits the block's amax under 6 (no clipping), nearest code.

One file over 300 lines (a quarter of it this docstring): reading a format (whole or a row part) and writing it
back share its block grid, scale names and code tables, so each format's rules stay in one place.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_prune.checkpoint.safetensors_io import FLOAT_DTYPES, TensorInfo, read_tensor, rows
from moe_prune.errors import MoePruneError

FP8 = "fp8"
MXFP4 = "mxfp4"
FP8_DTYPES = {"F8_E4M3"}
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
FP8_SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
MXFP4_BLOCK = 32


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's `quantization_config`, as far as moe-prune reads it."""

    method: str
    block: tuple[int, int] | None = None  # fp8 weight_block_size; None: one scale per tensor

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> Quantization | None:
        """None for float checkpoints and for methods moe-prune cannot dequantize (their tensors stay refused)."""
        config = raw.get("quantization_config")
        if not isinstance(config, dict):
            text = raw.get("text_config")
            config = text.get("quantization_config") if isinstance(text, dict) else None
        if not isinstance(config, dict):
            return None
        method = config.get("quant_method")
        if method == MXFP4:
            return cls(MXFP4)
        if method != FP8:
            return None
        block = config.get("weight_block_size")
        if block is None:
            return cls(FP8)
        valid = isinstance(block, list | tuple) and len(block) == 2
        if not (valid and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise MoePruneError(f"config.json: quantization_config.weight_block_size {block!r}: need two positive ints")
        return cls(FP8, (block[0], block[1]))


@dataclass(frozen=True)
class Stored:
    """One logical tensor: a plain tensor, or quantized data with its scales (`name` is the float tensor's)."""

    name: str
    data: TensorInfo
    scale: TensorInfo | None = None
    method: str | None = None
    block: tuple[int, int] | None = None

    @property
    def file(self) -> Path:
        return self.data.file

    @property
    def quantized(self) -> bool:
        return self.method is not None

    @property
    def infos(self) -> tuple[TensorInfo, ...]:
        return (self.data,) if self.scale is None else (self.data, self.scale)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the float tensor."""
        if self.method == MXFP4:
            *lead, out, groups, half = self.data.shape
            return (*lead, groups * half * 2, out)
        return self.data.shape

    def names(self, name: str) -> tuple[str, ...]:
        """On-disk names of the tensors that store logical tensor `name` in this format (data first)."""
        if self.method == FP8:
            return (name, fp8_scale_name(name))
        if self.method == MXFP4:
            return (name + "_blocks", name + "_scales")
        return (name,)


def fp8_scale_name(name: str) -> str:
    """`X.weight` -> `X.weight_scale_inv`; fused `X` -> `X_scale_inv` (transformers' names)."""
    return name + "_scale_inv"


def group(tensors: Iterable[TensorInfo], quant: Quantization | None) -> list[Stored]:
    """The tensors as logical tensors, in order of their data tensor; scale companions are folded in."""
    tensors = list(tensors)
    index = {info.name: info for info in tensors}
    companions: set[str] = set()
    out: list[Stored] = []
    for info in tensors:
        if quant is not None and quant.method == FP8 and info.dtype in FP8_DTYPES:
            scale = index.get(fp8_scale_name(info.name))
            if scale is not None:
                companions.add(scale.name)
                out.append(Stored(info.name, info, scale, FP8, quant.block))
                continue
        if quant is not None and quant.method == MXFP4 and info.name.endswith("_blocks"):
            base = info.name.removesuffix("_blocks")
            scale = index.get(base + "_scales")
            if scale is not None:
                companions.add(scale.name)
                out.append(Stored(base, info, scale, MXFP4))
                continue
        out.append(Stored(info.name, info))
    return [s for s in out if s.name not in companions]


def read_float(stored: Stored, part: tuple[int, int] | None = None) -> torch.Tensor:
    """The logical tensor as float32 (dequantized when stored quantized); refuses other non-float dtypes.

    `part` = (start, stop) reads only rows start:stop of the stored data's leading axis (with the scales of
    those rows): the same values as those rows of the whole tensor, for readers that bound their memory.
    For MXFP4 the stored rows are the float tensor's last axis (`[..., out, in/32, 16]` -> `[..., in, out]`).
    """
    return _read(stored, part)[0]


def _read(stored: Stored, part: tuple[int, int] | None) -> tuple[torch.Tensor, bool | None]:
    """`read_float`'s tensor, and for FP8 whether it is finite (`fp8_finite`, judged on the stored bytes)."""
    if stored.method is None:
        if stored.data.dtype not in FLOAT_DTYPES:
            raise MoePruneError(
                f"{stored.file}: {stored.name} is {stored.data.dtype}, and moe-prune dequantizes only FP8 "
                "(quant_method fp8, with weight_scale_inv) and MXFP4 (_blocks/_scales) checkpoints"
            )
        return read_tensor(_part(stored.data, part)).to(torch.float32), None
    assert stored.scale is not None
    if stored.method == FP8 and stored.scale.dtype not in FP8_SCALE_DTYPES:
        raise MoePruneError(
            f"{stored.file}: {stored.name} has FP8 scales of dtype {stored.scale.dtype} (e.g. ue8m0); moe-prune reads "
            f"float scales ({', '.join(FP8_SCALE_DTYPES)})"
        )
    try:
        if stored.method == FP8:
            data, scale, block = _fp8_parts(stored, part)
            return dequantize_fp8(data, scale, block), fp8_finite(data, scale)
        if problem := _mxfp4_problem(stored.data.shape, stored.scale.shape):
            raise ValueError(problem)
        data, scale = read_tensor(_part(stored.data, part)), read_tensor(_part(stored.scale, part))
        return dequantize_mxfp4(data, scale), None
    except ValueError as exc:
        raise MoePruneError(f"{stored.file}: {stored.name}: {exc}") from exc


def fp8_finite(data: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether FP8 (e4m3fn) `data` times its `scale` is finite, judged on the stored tensors: no NaN code in the
    data (e4m3fn's only non-finite values, S.1111.111), finite scales, and 448 (its largest value) times the
    largest scale within float32 (a scale past 7.6e35 is refused even where its block's values stay small). A
    fifth of the cost of `isfinite` over the dequantized float32 tensor, which was half of reading an FP8
    expert (DeepSeek-V3's layers are read once per batch under --expert-memory)."""
    if bool(((data.view(torch.uint8) & 0x7F) == 0x7F).any()):
        return False
    scales = scale.to(torch.float32).abs()
    return bool(torch.isfinite(scales).all()) and float(scales.max()) * FP8_MAX <= torch.finfo(torch.float32).max


def _part(info: TensorInfo, part: tuple[int, int] | None) -> TensorInfo:
    """Rows part[0]:part[1] of `info` (all of it for None)."""
    if part is None:
        return info
    return rows(info, part[0], part[1], (part[1] - part[0], *info.shape[1:]))


def _fp8_parts(
    stored: Stored, part: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """(FP8 data, scale_inv, block) to dequantize; a row part of a block-scaled matrix gets its rows' scales, one
    row a block."""
    assert stored.scale is not None
    block, scale_info = stored.block, stored.scale
    per_tensor = block is None or scale_info.numel == 1
    if not per_tensor and (problem := _fp8_problem(stored.data.shape, scale_info.shape, block)):
        raise ValueError(problem)
    data = read_tensor(_part(stored.data, part))
    if part is None or per_tensor:
        return data, read_tensor(scale_info), block
    assert block is not None
    if len(stored.data.shape) != 2:  # a leading expert axis: scales have it too
        return data, read_tensor(_part(scale_info, part)), block
    first, last = part[0] // block[0], -(-part[1] // block[0])
    scale = read_tensor(_part(scale_info, (first, last))).repeat_interleave(block[0], 0)
    offset = first * block[0]
    return data, scale[part[0] - offset : part[1] - offset], (1, block[1])


def read_expert_tensor(
    stored: Stored, purpose: str, out: torch.Tensor | None = None, part: tuple[int, int] | None = None
) -> torch.Tensor:
    """The one reader of expert and router tensors for scoring, merging and loading: dequantized, finite.

    `purpose` ends the NaN/Inf refusal ("its experts cannot be scored by their weights"). Without `out`:
    float32. With `out` (an expert's slot in a fused parameter allocated once, see `runtime.fused`): the
    tensor is copied into it in out's dtype and `out` returned; a float tensor is read in its stored dtype,
    so the only temporary is this one tensor, never a stack of a layer's experts. `part`: only those stored
    rows (see `read_float`), so a reader can hold a bounded slice of many experts at once. FP8 is checked on
    its stored bytes (`fp8_finite`), everything else on the float tensor.
    """
    plain = out is not None and stored.method is None and stored.data.dtype in FLOAT_DTYPES
    tensor, finite = (read_tensor(_part(stored.data, part)), None) if plain else _read(stored, part)
    if not (bool(torch.isfinite(tensor).all()) if finite is None else finite):
        raise MoePruneError(f"{stored.file}: {stored.name} holds NaN or Inf values; {purpose}")
    if out is None:
        return tensor
    if tuple(out.shape) != tuple(tensor.shape):
        raise MoePruneError(
            f"{stored.file}: {stored.name} has shape {tuple(tensor.shape)}, its slot in the model's parameter "
            f"{tuple(out.shape)} (the checkpoint does not match its config)"
        )
    return out.copy_(tensor)


def _fp8_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def _fp8_problem(shape: tuple[int, ...], scale: tuple[int, ...], block: tuple[int, int]) -> str | None:
    """Why block scales of shape `scale` do not fit a weight of `shape` (None when they do)."""
    if len(shape) >= 2 and tuple(scale) == _fp8_grid(shape, block):
        return None
    need = _fp8_grid(shape, block) if len(shape) >= 2 else "a 2-D weight"
    return f"scale_inv has shape {tuple(scale)}, but {tuple(shape)} in {list(block)} blocks needs {need}"


def _mxfp4_problem(blocks: tuple[int, ...], scales: tuple[int, ...]) -> str | None:
    """Why MXFP4 blocks and scales of these shapes do not pair up (None when they do)."""
    if len(blocks) >= 3 and blocks[-1] == MXFP4_BLOCK // 2 and tuple(blocks[:-1]) == tuple(scales):
        return None
    return (
        f"MXFP4 blocks {tuple(blocks)} and scales {tuple(scales)} are not [..., out, in/32, 16] and [..., out, in/32]"
    )


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """FP8 `[..., rows, cols]` times its per-block scale_inv, as float32 (transformers' own routine)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    if block is None or scale_inv.numel() == 1:
        return weight.to(torch.float32) * scale_inv.to(torch.float32).reshape(())
    if problem := _fp8_problem(tuple(weight.shape), tuple(scale_inv.shape), block):
        raise ValueError(problem)
    return _dequantize_fp8_weight(weight, scale_inv.to(torch.float32), list(block), torch.float32)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 `[E, out, in/32, 16]` blocks and `[E, out, in/32]` exponents as float32 `[E, in, out]` (transformers)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    if problem := _mxfp4_problem(tuple(blocks.shape), tuple(scales.shape)):
        raise ValueError(problem)
    if blocks.dim() == 3:  # one expert: transformers wants a leading axis
        return convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)[0]
    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)


def quantize(stored: Stored, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float tensor in `stored`'s format: (data, scale) with the stored dtypes and fresh scales."""
    if stored.method == FP8:
        assert stored.scale is not None
        return quantize_fp8(tensor, stored.block, FP8_SCALE_DTYPES[stored.scale.dtype])
    if stored.method == MXFP4:
        return quantize_mxfp4(tensor)
    raise AssertionError(f"{stored.name} is not quantized")


def check_requantizable(stored: Stored) -> None:
    """Merge writes this tensor back quantized: refuse, before writing, what cannot be."""
    if stored.method == FP8 and (stored.scale is None or stored.scale.dtype not in FP8_SCALE_DTYPES):
        dtype = stored.scale.dtype if stored.scale is not None else "none"
        raise MoePruneError(
            f"{stored.file}: {stored.name}: FP8 scales of dtype {dtype} (e.g. ue8m0) cannot be written back by "
            "merge; use --method prune"
        )


def quantize_fp8(
    weight: torch.Tensor, block: tuple[int, int] | None, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, scale_inv per block): scale_inv = block amax / 448, round to nearest, clamped."""
    weight = weight.to(torch.float32)
    if block is None:
        amax = weight.abs().amax()
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype).to(torch.float32)
        quantized = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return quantized, scale.to(scale_dtype)
    rows, cols = weight.shape[-2:]
    grid = _fp8_grid(tuple(weight.shape), block)
    pad_r, pad_c = grid[-2] * block[0] - rows, grid[-1] * block[1] - cols
    padded = torch.nn.functional.pad(weight, (0, pad_c, 0, pad_r))
    tiles = padded.reshape(*grid[:-2], grid[-2], block[0], grid[-1], block[1])
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype).to(torch.float32)
    scaled = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    quantized = scaled.reshape(padded.shape)[..., :rows, :cols].to(torch.float8_e4m3fn)
    return quantized.contiguous(), scale.to(scale_dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float `[..., in, out]` as MXFP4 (blocks `[..., out, in/32, 16]` U8, scales `[..., out, in/32]` U8 E8M0)."""
    weight = weight.to(torch.float32).transpose(-1, -2)
    *lead, out, width = weight.shape
    if width % MXFP4_BLOCK:
        raise MoePruneError(f"MXFP4 needs the input dimension to be a multiple of 32, not {width}")
    groups = weight.reshape(*lead, out, width // MXFP4_BLOCK, MXFP4_BLOCK)
    amax = groups.abs().amax(-1)
    exponent = torch.ceil(torch.log2(amax.clamp(min=2.0**-127) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - FP4_VALUES).abs().argmin(-1)
    code = (magnitude + 8 * (scaled < 0)).to(torch.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), (exponent + 127).to(torch.uint8)


def fp8_tiles_exactly(stored: Iterable[Stored]) -> bool:
    """True when every FP8 tensor's last two dims are multiples of its block (transformers' loader is exact then)."""
    for s in stored:
        if s.method == FP8 and s.block is not None and s.scale is not None and s.scale.numel > 1:
            rows, cols = s.data.shape[-2:]
            if rows % s.block[0] or cols % s.block[1]:
                return False
    return True


__all__ = [
    "FP8",
    "MXFP4",
    "Quantization",
    "Stored",
    "check_requantizable",
    "fp8_tiles_exactly",
    "group",
    "quantize",
    "read_float",
]
