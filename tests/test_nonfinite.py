"""eval refuses a model whose logits are not finite, however the NaN got there (weights, or overflow at run time)."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_prune.errors import MoePruneError
from moe_prune.stages.evaluate import nll_sum


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nll_sum_refuses_non_finite_logits_naming_the_model(tiny_factory, value):
    _, model = tiny_factory("mixtral")
    model = copy.deepcopy(model)
    chunks = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    total, count = nll_sum(model, chunks, 2, lambda done: None, "good-model")
    assert torch.isfinite(torch.tensor(total)) and count == 4 * 15
    with torch.no_grad():
        model.get_output_embeddings().weight[3] = value  # token 3's logit: +-inf terms sum to NaN at every position
    with pytest.raises(MoePruneError, match=r"^some/folder: the model produces non-finite logits"):
        nll_sum(model, chunks, 2, lambda done: None, "some/folder")
