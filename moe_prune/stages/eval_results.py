"""What `eval` measures, as data: parameter counts, expert load per layer, one model's evaluation, and the
run's result with its model-vs-baseline comparison (the `--json` document and the tables' source)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ParamCounts:
    """Parameter counts of one checkpoint; see the module docstring for active and FLOPs."""

    total: int
    routed_experts: int
    non_expert: int
    embedding: int
    output_head: int
    tied_output_head: bool
    active: int
    flops_per_token: int


@dataclass
class LayerLoad:
    """How evenly one MoE layer spread its top-k selections over its experts."""

    layer: int
    experts: int
    original_ids: list[int]  # which expert of the never-pruned model each slot holds (counts follow this order)
    tokens: int
    counts: list[int]
    max_over_mean: float
    entropy: float  # H(load) / log(E): 1 = perfectly even, 0 = one expert takes everything


@dataclass
class ModelEval:
    """Everything `eval` measures for one model."""

    model: str
    engine: str  # what computed the perplexity: transformers, or vllm (prompt log-probs; no expert load)
    model_type: str
    experts_per_layer: int
    top_k: int
    moe_layers: list[int]
    shared_experts: dict[str, Any] | None
    seq_len: int
    sequences: int
    tokens_scored: int
    nll: float
    perplexity: float
    params: ParamCounts
    bytes_on_disk: int
    bytes_in_memory: int
    load: list[LayerLoad]  # empty under --engine vllm: its fused kernels expose no routing

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _change(model: float, baseline: float) -> dict[str, float | None]:
    return {
        "model": model,
        "baseline": baseline,
        "change": model - baseline,
        "relative_change": (model / baseline - 1) if baseline else None,
    }


@dataclass
class EvalResult:
    """The model's evaluation, the baseline's when asked for, and their comparison."""

    data: str
    model: ModelEval
    baseline: ModelEval | None = None
    warnings: list[str] = field(default_factory=list)

    def comparison(self) -> dict[str, dict[str, float | None]] | None:
        """Model vs baseline for each size/cost metric and perplexity (negative change = saving)."""
        if self.baseline is None:
            return None
        m, b = self.model, self.baseline
        return {
            "params": _change(m.params.total, b.params.total),
            "active_params": _change(m.params.active, b.params.active),
            "flops_per_token": _change(m.params.flops_per_token, b.params.flops_per_token),
            "bytes_on_disk": _change(m.bytes_on_disk, b.bytes_on_disk),
            "bytes_in_memory": _change(m.bytes_in_memory, b.bytes_in_memory),
            "perplexity": _change(m.perplexity, b.perplexity),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "model": self.model.to_dict(),
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "comparison": self.comparison(),
            "warnings": self.warnings,
        }
