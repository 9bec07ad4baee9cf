"""Teacher-forced agreement of a candidate model with the original on the same tokens.

At each position t the original predicts p_t and the candidate q_t (both given the original tokens):
    ESAP = mean_t Σ_v min(p_t,v, q_t,v)      expected speculative acceptance (EvoESAP, arXiv 2603.06003)
    KL   = mean_t Σ_v p_t,v (log p_t,v − log q_t,v)
The original's distributions are computed once and stored as its `top` most likely tokens per position
(all of them when `top` >= vocabulary). With a truncated support both are taken over the coarsened
distribution (the stored tokens plus one bucket for the rest), exact when nothing is truncated.
The rest bucket's log-mass is the log-sum-exp over the tokens outside the support, not log(1 − Σ stored):
a candidate more confident than the original puts all but ~1e-16 of its mass on the stored tokens, the
sum rounds to 1 and log(1 − 1) = −inf would make KL +inf though the true KL is tiny.
All sums run in float64, on the logits' device, a chunk of positions at a time (`CHUNK_BYTES` per float64
copy): one batch of a real vocabulary is 16k positions x 152k tokens, 20 GB per float64 copy, and only
the top tokens (or the gathered candidate's log-probabilities) are ever kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

OBJECTIVES = ("esap", "kl")
CHUNK_BYTES = 256 * 2**20  # float64 log-probabilities of this many bytes' worth of positions exist at once
Logits = torch.Tensor | Sequence[torch.Tensor]  # [T, V], or row blocks [T_i, V] taken one after the other


def _chunks(logits: Logits) -> Iterator[torch.Tensor]:
    """Float64 log-softmax of a chunk of positions at a time, in order (views of `logits`, no copy of it)."""
    for piece in [logits] if isinstance(logits, torch.Tensor) else logits:
        for rows in piece.split(max(1, CHUNK_BYTES // (8 * piece.shape[-1]))):
            yield log_softmax64(rows)


def log_softmax64(rows: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(rows.double(), dim=-1)


@dataclass
class Reference:
    """The original's log-probabilities at every scored position: `values` [T, K] and, when truncated,
    `index` and `rest`."""

    values: torch.Tensor  # float64 log p of the stored tokens
    index: torch.Tensor | None  # int64 [T, K] token ids; None: all of the vocabulary, in order
    rest: torch.Tensor | None  # float64 [T] log p of the tokens outside `index`; None when not truncated

    @classmethod
    def from_logits(cls, logits: Logits, top: int) -> Reference:
        """Keep the `top` most likely tokens of each row of `logits` [T, V] (all when `top` >= V), on the CPU."""
        parts = []
        for logp in _chunks(logits):
            if top >= logp.shape[-1]:
                parts.append(cls(logp.cpu(), None, None))
                continue
            values, index = logp.topk(top, dim=-1)
            parts.append(cls(values.cpu(), index.cpu(), _rest(logp, index).cpu()))
        return cls.concat(parts)

    @staticmethod
    def concat(parts: list[Reference]) -> Reference:
        if parts[0].index is None:
            return Reference(torch.cat([p.values for p in parts]), None, None)
        index = torch.cat([p.index for p in parts if p.index is not None])
        rest = torch.cat([p.rest for p in parts if p.rest is not None])
        return Reference(torch.cat([p.values for p in parts]), index, rest)

    def __len__(self) -> int:
        return self.values.shape[0]


def _rest(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ index} p_v per row, summed in log space (exact for masses far below 1e-16)."""
    return logp.scatter(-1, index, -torch.inf).logsumexp(-1)


def _aligned(reference: Reference, logq: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) of the reference's `rows` on its support, plus a column for the rest when truncated."""
    logp = reference.values[rows].to(logq.device)
    if reference.index is None:
        return logp, logq
    assert reference.rest is not None  # from_logits stores it whenever it stores an index
    index = reference.index[rows].to(logq.device)
    rest_p, rest_q = reference.rest[rows].to(logq.device), _rest(logq, index)
    logq = logq.gather(-1, index)
    return torch.cat([logp, rest_p.unsqueeze(-1)], -1), torch.cat([logq, rest_q.unsqueeze(-1)], -1)


def sums(reference: Reference, logits: Logits) -> tuple[float, float]:
    """(Σ_t ESAP_t, Σ_t KL_t) of candidate `logits` [T, V] against `reference` (same positions, same order)."""
    esap = kl = 0.0
    start = 0
    for chunk in _chunks(logits):
        logp, logq = _aligned(reference, chunk, slice(start, start + len(chunk)))
        start += len(chunk)
        p, q = logp.exp(), logq.exp()
        terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))  # 0 log 0 = 0
        esap, kl = esap + float(torch.minimum(p, q).sum()), kl + float(terms.sum())
    if start != len(reference):
        raise ValueError(f"{start} candidate positions against {len(reference)} reference positions")
    return esap, kl


def score(esap: float, kl: float, objective: str) -> float:
    """The value the search maximises: ESAP, or −KL."""
    return esap if objective == "esap" else -kl
