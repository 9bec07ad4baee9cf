"""Teacher-forced agreement of a candidate model with the original on the same tokens.

At each position t the original predicts p_t and the candidate q_t (both given the original tokens):
    ESAP = mean_t Σ_v min(p_t,v, q_t,v)      expected speculative acceptance (EvoESAP, arXiv 2603.06003)
    KL   = mean_t Σ_v p_t,v (log p_t,v − log q_t,v)
The original's distributions are computed once and stored as its `top` most likely tokens per position
(all of them when `top` >= vocabulary). With a truncated support both are taken over the coarsened
distribution (the stored tokens plus one bucket for the rest), exact when nothing is truncated.
All sums run in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

OBJECTIVES = ("esap", "kl")


@dataclass
class Reference:
    """The original's log-probabilities at every scored position: `values` [T, K] and, when truncated, `index`."""

    values: torch.Tensor  # float64 log p of the stored tokens
    index: torch.Tensor | None  # int64 [T, K] token ids; None: all of the vocabulary, in order

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top: int) -> Reference:
        """Keep the `top` most likely tokens of each row of `logits` [T, V] (all when `top` >= V)."""
        logp = torch.log_softmax(logits.double(), dim=-1)
        if top >= logp.shape[-1]:
            return cls(logp, None)
        values, index = logp.topk(top, dim=-1)
        return cls(values, index)

    @staticmethod
    def concat(parts: list[Reference]) -> Reference:
        index = None if parts[0].index is None else torch.cat([p.index for p in parts if p.index is not None])
        return Reference(torch.cat([p.values for p in parts]), index)

    def __len__(self) -> int:
        return self.values.shape[0]


def _aligned(reference: Reference, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) on the reference's support, with a last column for the mass outside it when truncated."""
    logq = torch.log_softmax(logits.double(), dim=-1)
    logp = reference.values
    if reference.index is None:
        return logp, logq
    logq = logq.gather(-1, reference.index)
    rest_p = torch.log1p(-logp.exp().sum(-1).clamp(max=1.0)).unsqueeze(-1)
    rest_q = torch.log1p(-logq.exp().sum(-1).clamp(max=1.0)).unsqueeze(-1)
    return torch.cat([logp, rest_p], -1), torch.cat([logq, rest_q], -1)


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
