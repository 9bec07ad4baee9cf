"""Run the original once to store its predictions, then measure candidates against them (ESAP, KL)."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from moe_prune.allocation.masking import RouterMasks
from moe_prune.allocation.objective import Reference, sums
from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import input_device


class Evaluator:
    """Teacher-forced agreement with the original on `windows` [N, S]: every position but each window's last."""

    def __init__(self, model: Any, config: ModelConfig, windows: torch.Tensor, batch_size: int, top: int) -> None:
        self.model = model
        self.masks = RouterMasks(model, config)
        self.batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        self.references = [Reference.from_logits(self._logits(batch), top) for batch in self.batches]
        self.positions = sum(len(r) for r in self.references)

    @torch.inference_mode()
    def _logits(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Per window, the [S − 1, V] next-token logits of the positions scored: views, on the model's device
        (no CPU or reshaped copy of the batch's logits; `objective` works through them in chunks)."""
        logits = self.model(input_ids=batch.to(input_device(self.model)), use_cache=False).logits
        return list(logits[:, :-1].unbind(0))

    def measure(self, drops: list[list[int]], on_batch: Callable[[], None] | None = None) -> tuple[float, float]:
        """(mean ESAP, mean KL) of the original with `drops[i]` (slots) out of routing in MoE layer i."""
        return self.measure_in(self.masks.dropped(drops), on_batch)

    def measure_in(
        self, candidate: AbstractContextManager[Any], on_batch: Callable[[], None] | None = None
    ) -> tuple[float, float]:
        """(mean ESAP, mean KL) of the model while `candidate` (e.g. merged blocks swapped in) is entered."""
        esap = kl = 0.0
        with candidate:
            for batch, reference in zip(self.batches, self.references, strict=True):
                part_esap, part_kl = sums(reference, self._logits(batch))
                esap, kl = esap + part_esap, kl + part_kl
                if on_batch:
                    on_batch()
        if not (math.isfinite(esap) and math.isfinite(kl)):
            raise MoePruneError("a candidate's predictions are not finite (NaN/Inf logits); the model may be corrupt")
        return esap / self.positions, kl / self.positions
