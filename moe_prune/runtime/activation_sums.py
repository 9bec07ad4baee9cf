"""The act_* statistics of a block of expert outputs, without a temporary as large as the block.

Every routed row passes through here, so this is the profile's main cost beyond the model itself. The
block `a` [n, H] (rows of one expert adjacent) is as large as the experts' own output (n = tokens x top-k);
a temporary of that size (a float64 copy, a / ||a||, a * a, the outlier masks) costs a fresh allocation
and page faults of hundreds of MB at real widths, and was the profile's peak memory growth. Instead:
- per-row values (norms, sums, largest |a|) are reductions over the hidden axis: [n] vectors;
- per-expert column sums come from one small matrix product per chunk of at most `CHUNK_ELEMENTS`
  elements of that expert's rows: rows^T [1, 1/||a||] gives the sum and the unit-vector sum, the column
  norms give the sum of squares; products and norms accumulate in float32 over at most a chunk, then in
  float64 (relative error ~1e-7 per chunk, float64 across chunks and batches);
- the outlier comparison runs one chunk at a time (a bool mask of the chunk only).
Only the fields asked for are computed (`profile --for`).
"""

from __future__ import annotations

from typing import Any

import torch

OUTLIER_STDS = 3.0
CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32: small enough for the allocator to reuse, large enough for BLAS
COLUMN_FIELDS = frozenset({"act_sum", "act_sumsq", "act_unit_sum", "act_outliers", "act_max"})


@torch.no_grad()
def add_activations(
    sums: Any, fields: frozenset[str], expert: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, gate
) -> None:
    """Add rows of expert outputs (row i belongs to `expert[i]`, rows of one expert adjacent) to `sums`.

    `weight` is the routing weight the model applied, `gate` the same gate renormalised over the token's
    top-k (REAP's g_j(x); equal to `weight` for families that renormalise). Each row's mean and std come
    from its sum and norm, so the outlier count is one pass against per-row bounds.
    """
    f64 = torch.float64
    a = output if output.is_floating_point() and output.dtype != torch.float16 else output.float()
    hidden = a.shape[1]
    norms = torch.linalg.vector_norm(a, dim=1).to(f64)  # in a's dtype: dtype=float64 would copy a
    if "act_norm_sum" in fields:
        sums.act_norm_sum.index_add_(0, expert, norms)
    if "act_weighted_norm_sum" in fields:
        sums.act_weighted_norm_sum.index_add_(0, expert, weight.to(f64) * norms)
    if "act_gate_norm_sum" in fields:
        sums.act_gate_norm_sum.index_add_(0, expert, gate.to(f64) * norms)
    if not fields & COLUMN_FIELDS:
        return
    bounds = None
    if "act_outliers" in fields:
        mean = a.sum(dim=1).to(f64) / hidden
        std = (norms.square() / hidden - mean.square()).clamp_min(0).sqrt()
        bounds = ((mean - OUTLIER_STDS * std).to(a.dtype), (mean + OUTLIER_STDS * std).to(a.dtype))
    inverse = (1.0 / norms.clamp_min(torch.finfo(f64).tiny)).float()
    ids, counts = torch.unique_consecutive(expert, return_counts=True)
    step = max(1, CHUNK_ELEMENTS // hidden)
    start = 0
    for e, count in zip(ids.tolist(), counts.tolist(), strict=True):
        for lo in range(start, start + count, step):
            hi = min(lo + step, start + count)
            _add_chunk(sums, fields, e, a[lo:hi], inverse[lo:hi], None if bounds is None else _rows(bounds, lo, hi))
        start += count


def _rows(bounds: tuple[torch.Tensor, torch.Tensor], lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    return bounds[0][lo:hi, None], bounds[1][lo:hi, None]


def _add_chunk(sums: Any, fields: frozenset[str], e: int, rows: torch.Tensor, inverse: torch.Tensor, bounds) -> None:
    """One expert's chunk of rows: column sums by one [rows, 2] product, norms, one outlier mask."""
    f64 = torch.float64
    chunk = rows.float()  # a copy only for bfloat16 outputs, and of one chunk
    if "act_sum" in fields or "act_unit_sum" in fields:
        both = chunk.T @ torch.stack([torch.ones_like(inverse), inverse], dim=1)  # [H, 2]: sum, unit-vector sum
        if "act_sum" in fields:
            sums.act_sum[e] += both[:, 0].to(f64)
        if "act_unit_sum" in fields:
            sums.act_unit_sum[e] += both[:, 1].to(f64)
    if "act_sumsq" in fields:
        sums.act_sumsq[e] += torch.linalg.vector_norm(chunk, dim=0).to(f64).square()
    if "act_max" in fields:
        largest = torch.maximum(chunk.amax(), -chunk.amin()).to(f64)
        sums.act_max[e] = torch.maximum(sums.act_max[e], largest)
    if bounds is not None:
        sums.act_outliers[e] += ((rows < bounds[0]) | (rows > bounds[1])).sum()
