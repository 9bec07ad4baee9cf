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
All sums run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OBJECTIVES = ("esap", "kl")


@dataclass
class Reference:
    """The original's log-probabilities at every scored position: `values` [T, K] and, when truncated,
    `index` and `rest`."""

    values: torch.Tensor  # float64 log p of the stored tokens
    index: torch.Tensor | None  # int64 [T, K] token ids; None: all of the vocabulary, in order
    rest: torch.Tensor | None  # float64 [T] log p of the tokens outside `index`; None when not truncated

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top: int) -> Reference:
        """Keep the `top` most likely tokens of each row of `logits` [T, V] (all when `top` >= V)."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        if top >= logp.shape[-1]:
            return cls(logp, None, None)
        values, index = logp.topk(top, dim=-1)
        return cls(values, index, _rest(logp, index))

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


def _aligned(reference: Reference, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) on the reference's support, with a last column for the mass outside it when truncated."""
    logq = torch.log_softmax(logits.double(), dim=-1)
    logp = reference.values
    if reference.index is None:
        return logp, logq
    assert reference.rest is not None  # from_logits stores it whenever it stores an index
    rest_p = reference.rest
    rest_q = _rest(logq, reference.index)
    logq = logq.gather(-1, reference.index)
    return torch.cat([logp, rest_p.unsqueeze(-1)], -1), torch.cat([logq, rest_q.unsqueeze(-1)], -1)


def sums(reference: Reference, logits: torch.Tensor) -> tuple[float, float]:
    """(Σ_t ESAP_t, Σ_t KL_t) of candidate `logits` [T, V] against `reference` (same positions, same order)."""
    logp, logq = _aligned(reference, logits)
    p, q = logp.exp(), logq.exp()
    esap = torch.minimum(p, q).sum()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))  # 0 log 0 = 0
    return float(esap), float(terms.sum())


def score(esap: float, kl: float, objective: str) -> float:
    """The value the search maximises: ESAP, or −KL."""
    return esap if objective == "esap" else -kl
