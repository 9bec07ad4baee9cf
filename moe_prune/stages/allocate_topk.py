"""`allocate --top-k search`: after the count search, fewer experts per token in the layers that tolerate it.

Only for families whose ragged checkpoints both serving paths build with each layer's own top-k: transformers
through `modeling_moe_prune.py` (each block built from a config holding its layer's top-k) and vLLM through
moe-prune's plugin (families in `checkpoint.serving.SERVED`, each layer built under its own config values).
Others are refused before the model loads. On the loaded model, `allocation.topk.LayerTopK` sets the
routers' top-k attributes per layer and proves the routing reads them; the searched counts' drops stay
applied (router masking), so each candidate is the pruned model the mask will write.

Search: LExI-style greedy from every layer's full top-k (`allocation.topk.greedy`, the loss of each (layer,
top-k) measured alone: one evaluation per searched layer plus one per step), then the seeded exchange search
of `allocation.search` over the top-ks under the same active-expert budget, judged jointly, with up to
`--budget-evals` more evaluations. Budget: `--active-ratio R` keeps at most floor(R x Σ full top-k) experts
per token over the searched layers (skipped layers keep theirs, outside it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from moe_prune.allocation import plan
from moe_prune.allocation.objective import score
from moe_prune.allocation.search import Counts, Space, search
from moe_prune.allocation.topk import LayerTopK, active_budget, greedy
from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.ragged import base_class
from moe_prune.checkpoint.serving import NOT_SERVED, SERVED
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import input_device

CHECK_TOKENS = 16  # tokens of the first calibration window run to see each layer's routing read its top-k


@dataclass
class TopKResult:
    """The top-k search's record: budget, per-layer top-k before and after, objective values, evaluations."""

    active_ratio: float
    budget: int  # experts per token summed over the searched layers, at most
    full: list[int]  # per MoE layer, before the search (the model's top-k, clipped to the kept count)
    greedy: list[int]  # per MoE layer, the greedy's result (the exchange search's start)
    top_k: list[int]  # per MoE layer, searched
    values: dict[str, dict[str, float]]  # full, greedy, searched -> {"esap": ..., "kl": ...}
    greedy_steps: list[dict[str, Any]]  # layer, new top-k, objective lost (measured alone)
    evaluations: int  # greedy's single-layer evaluations plus the exchange search's joint ones
    method: str = "greedy (LExI-style, objective loss per layer) + exchange search"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def refusal(config: ModelConfig) -> str:
    return f"--top-k search is not supported for {config.model_type}"


def check_family(config: ModelConfig) -> None:
    """Refuse, before the model loads, a family whose ragged checkpoints the vLLM plugin does not serve."""
    base = base_class(config)
    if base not in SERVED:
        reason = NOT_SERVED.get(base, "not in moe-prune's vLLM plugin")
        raise MoePruneError(
            f"{refusal(config)}: vLLM cannot serve per-layer top-k for {base} ({reason}); use --top-k keep"
        )


def check_options(config: ModelConfig, layers: plan.Layers, ratio: float, merge: bool) -> None:
    """--top-k search's refusals before the model loads: --for merge, the family, a budget below 1 per layer."""
    if merge:
        raise MoePruneError("--top-k search applies to --for prune only (merge takes no per-layer top-k)")
    check_family(config)
    active_budget(layers.top_k, layers.searched, ratio)


@contextmanager
def _both(first: AbstractContextManager[Any], second: AbstractContextManager[Any]) -> Iterator[None]:
    with first, second:
        yield


@dataclass
class TopKJudge:
    """Candidates of per-layer top-k on the loaded model, with the searched counts' experts dropped."""

    model: Any
    config: ModelConfig
    measure_in: Callable[[AbstractContextManager[Any]], tuple[float, float]]  # Evaluator.measure_in
    counts_candidate: Callable[[], AbstractContextManager[Any]]  # the searched counts' drops
    first_window: torch.Tensor
    objective: str

    def __post_init__(self) -> None:
        self.setter = LayerTopK(self.model, self.config, refusal(self.config))
        self.measured: dict[Counts, tuple[float, float]] = {}

    def check(self) -> None:
        ids = self.first_window[:CHECK_TOKENS].unsqueeze(0).to(input_device(self.model))

        @torch.inference_mode()
        def run() -> Any:
            return self.model(input_ids=ids, use_cache=False)

        self.setter.check(run, refusal(self.config))

    def value(self, top_k: Counts) -> float:
        if top_k not in self.measured:
            self.measured[top_k] = self.measure_in(_both(self.counts_candidate(), self.setter.reduced(top_k)))
        return score(*self.measured[top_k], self.objective)


def search_top_k(
    judge: TopKJudge,
    layers: plan.Layers,
    counts: Counts,
    ratio: float,
    budget_evals: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> TopKResult:
    """Per-layer top-k for the searched `counts` under `--active-ratio ratio` (module docstring)."""
    full = tuple(min(k, n) for k, n in zip(judge.setter.full, counts, strict=True))
    budget = active_budget(full, layers.searched, ratio)
    judge.check()
    report = progress or (lambda done, total: None)
    searched_full = sum(f for f, s in zip(full, layers.searched, strict=True) if s)
    expected = 1 + sum(layers.searched) + searched_full - budget + budget_evals  # greedy's, then the exchange's
    base = judge.value(full)
    single: dict[tuple[int, int], float] = {}

    def loss(index: int, k: int) -> float:
        if (index, k) not in single:
            alone = tuple(k if i == index else f for i, f in enumerate(full))
            single[index, k] = base - judge.value(alone)
            report(len(judge.measured), expected)
        return single[index, k]

    start, steps = greedy(full, layers.searched, budget, loss)
    fixed = sum(f for f, s in zip(full, layers.searched, strict=True) if not s)
    floors = tuple(1 if s else f for f, s in zip(full, layers.searched, strict=True))
    space = Space(full, floors, (1,) * len(full), (1,) * len(full), budget + fixed)
    done = len(judge.measured)
    trace = search(space, {"greedy": start}, judge.value, budget_evals, seed, lambda n, _: report(done + n, expected))
    named = {"full": full, "greedy": start, "searched": trace.best}
    return TopKResult(
        active_ratio=ratio,
        budget=budget,
        full=list(full),
        greedy=list(start),
        top_k=list(trace.best),
        values={name: dict(zip(("esap", "kl"), judge.measured[k], strict=True)) for name, k in named.items()},
        greedy_steps=[{"layer": layers.numbers[i], "top_k": k, "lost": lost} for i, k, lost in steps],
        evaluations=len(judge.measured),
    )
