"""The one held-out NLL loop: `eval` (and through it `sweep` and `lottery`) and finetune's before/after check.

Summed batch by batch in float64. A batch whose loss is not finite is refused: a NaN perplexity or held-out
loss is not a result. The loss is checked, not every logit: a NaN anywhere reaches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from moe_prune.errors import MoePruneError
from moe_prune.training.losses import token_cross_entropy

# (input ids, targets, how many positions carry loss): targets equal the ids for plain text chunks, and hold
# IGNORE outside the responses of prompt/response examples.
Batch = tuple[torch.Tensor, torch.Tensor, int]


def non_finite(source: str | Path) -> MoePruneError:
    """The one-line refusal of a NaN/Inf loss, naming `source` (the model folder)."""
    return MoePruneError(
        f"{source}: the model produces non-finite logits (NaN or Inf) on the evaluation data, so its "
        "perplexity is undefined (NaN/Inf in its weights, or overflow in this dtype)"
    )


def nll_sum(
    model: Any,
    batches: Iterable[Batch],
    device: Any,
    source: str | Path = "model",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """(summed next-token NLL, number of positions that carry loss) over `batches`; `on_batch(done)` after each.

    The caller chooses no_grad or inference_mode (a model wrapped for training is scored under no_grad).
    """
    total, count = 0.0, 0
    for done, (ids, targets, tokens) in enumerate(batches, 1):
        logits = model(input_ids=ids.to(device), use_cache=False).logits
        loss = float(token_cross_entropy(logits, targets.to(device), reduction="sum"))
        if not math.isfinite(loss):
            raise non_finite(source)
        total += loss
        count += tokens
        if on_batch is not None:
            on_batch(done)
    return total, count
