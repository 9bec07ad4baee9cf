"""The act_* statistics of a block of expert outputs, without a temporary as large as the block.

Every routed row passes through here, so this is the profile's main cost beyond the model itself. The
block `a` [n, H] is as large as the experts' own output (n = tokens x top-k); a temporary of that size (a
float64 copy, a / ||a||, a * a, the outlier masks) costs a fresh allocation and page faults of hundreds
of MB at real widths, and was the profile's peak memory growth. Instead:
- per-row values (norms, sums, largest |a|, outlier counts) are reductions over the hidden axis: [n]
  vectors, added per expert with `index_add_` / `scatter_reduce_`;
- per-expert column sums (sum, unit-vector sum, sum of squares) are `index_add_`s of chunks of at most
  `CHUNK_ELEMENTS` rows' elements into [E, H] float32 accumulators, added to the float64 sums once per
  block (relative error ~1e-7 per block, float64 across blocks and batches);
- the outlier comparison and the products run one chunk at a time (temporaries of one chunk).
A chunk spans experts, so the Python loop runs n x H / CHUNK_ELEMENTS times, not once per expert: 3x
faster than one chunk per expert at 64 experts of hidden 1024 (benchmarks/README.md, profile overhead).
On CUDA `index_add_` adds in no fixed order (atomics): the sums then vary between runs at float32
rounding. Only the fields asked for are computed (`profile --for`).
"""

from __future__ import annotations

from typing import Any

import torch

OUTLIER_STDS = 3.0
CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32: small enough for the allocator to reuse, large enough for BLAS
COLUMN_FIELDS = frozenset({"act_sum", "act_sumsq", "act_unit_sum", "act_outliers", "act_max"})
SUMMED_COLUMNS = frozenset({"act_sum", "act_sumsq", "act_unit_sum"})  # [E, H] sums over an expert's rows


@torch.no_grad()
def add_activations(
    sums: Any, fields: frozenset[str], expert: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, gate
) -> None:
    """Add rows of expert outputs (row i belongs to `expert[i]`) to `sums`.

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
    if "act_max" in fields:
        peak = torch.maximum(a.amax(dim=1), -a.amin(dim=1)).to(f64)
        sums.act_max.copy_(sums.act_max.scatter_reduce(0, expert, peak, "amax"))
    bounds = None
    if "act_outliers" in fields:
        mean = a.sum(dim=1).to(f64) / hidden
        std = (norms.square() / hidden - mean.square()).clamp_min(0).sqrt()
        bounds = ((mean - OUTLIER_STDS * std).to(a.dtype)[:, None], (mean + OUTLIER_STDS * std).to(a.dtype)[:, None])
    columns = {name: getattr(sums, name) for name in sorted(fields & SUMMED_COLUMNS)}
    acc = {name: torch.zeros(total.shape, dtype=torch.float32, device=a.device) for name, total in columns.items()}
    inverse = (1.0 / norms.clamp_min(torch.finfo(f64).tiny)).float()
    outliers = torch.zeros_like(expert) if bounds is not None else None
    step = max(1, CHUNK_ELEMENTS // hidden)
    for lo in range(0, a.shape[0], step):
        rows = slice(lo, lo + step)
        _add_chunk(acc, expert[rows], a[rows], inverse[rows])
        if outliers is not None and bounds is not None:
            outliers[rows] = ((a[rows] < bounds[0][rows]) | (a[rows] > bounds[1][rows])).sum(dim=1)
    for name, total in columns.items():
        total += acc[name].to(f64)
    if outliers is not None:
        sums.act_outliers.index_add_(0, expert, outliers.to(sums.act_outliers.dtype))


def _add_chunk(acc: dict[str, torch.Tensor], expert: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor) -> None:
    """A chunk of rows (of any experts) into the float32 column accumulators `acc`."""
    chunk = rows.float()  # a copy only for bfloat16 outputs, and of one chunk
    if "act_sum" in acc:
        acc["act_sum"].index_add_(0, expert, chunk)
    if "act_unit_sum" in acc:
        acc["act_unit_sum"].index_add_(0, expert, chunk * inverse[:, None])
    if "act_sumsq" in acc:
        acc["act_sumsq"].index_add_(0, expert, chunk.square())
