"""What a lottery run reports: each round, each method, and the whole run (the CLI's tables and `--json`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moe_prune.lottery.agreement import LayerAgreement


@dataclass
class RoundResult:
    """One finished round: what it dropped (original ids), what remains, its checkpoint and perplexity."""

    round: int
    dropped: dict[int, list[int]]
    kept: dict[int, list[int]]
    tokens: int  # the finetuning budget
    checkpoint: str
    perplexity: float | None
    reused: bool = False
    trained: int | None = None  # tokens the finetune trained: the budget rounded down to whole steps

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped"] = {str(k): v for k, v in self.dropped.items()}
        out["kept"] = {str(k): v for k, v in self.kept.items()}
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> RoundResult:
        return cls(
            round=int(obj["round"]),
            dropped={int(k): list(v) for k, v in obj["dropped"].items()},
            kept={int(k): list(v) for k, v in obj["kept"].items()},
            tokens=int(obj["tokens"]),
            checkpoint=str(obj["checkpoint"]),
            perplexity=obj["perplexity"],
            reused=True,
            trained=None if obj.get("trained") is None else int(obj["trained"]),
        )


@dataclass
class MethodResult:
    """All rounds of one method; `dropped` is every original expert it removed, per layer."""

    name: str
    folder: Path
    rounds: list[RoundResult]

    @property
    def final(self) -> Path:
        return self.folder / self.rounds[-1].checkpoint

    @property
    def trained(self) -> int:
        """Tokens trained over all rounds."""
        return sum(r.trained or 0 for r in self.rounds)

    @property
    def dropped(self) -> dict[int, list[int]]:
        layers = self.rounds[0].dropped
        return {layer: sorted(i for r in self.rounds for i in r.dropped[layer]) for layer in layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "folder": str(self.folder),
            "final": str(self.final),
            "dropped": {str(k): v for k, v in self.dropped.items()},
            "trained": self.trained,
            "rounds": [r.to_dict() for r in self.rounds],
        }


@dataclass
class LotteryResult:
    """Every method's rounds, the original model's perplexity, and the methods' agreement."""

    out: Path
    recipe: dict[str, Any]
    experts: dict[int, list[int]]  # original expert ids per MoE layer
    baseline_perplexity: float | None
    methods: dict[str, MethodResult]
    agreement: list[LayerAgreement] = field(default_factory=list)
    resumed: bool = False
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "recipe": self.recipe,
            "experts": {str(k): v for k, v in self.experts.items()},
            "baseline_perplexity": self.baseline_perplexity,
            "methods": {name: m.to_dict() for name, m in self.methods.items()},
            "agreement": [row.to_dict() for row in self.agreement],
            "resumed": self.resumed,
            "warnings": self.warnings,
        }
