"""allocate's masked original (allocation/masking.py) refuses, naming the layers, when a layer's router was not masked.

The mask works by catching each router weight in F.linear. A router that computes its logits from another tensor
(a copy, an offloaded weight put back as a new parameter, another op) is not caught: that layer runs with all its
experts and the candidate is scored as better than it is. A model-wide hit count let that pass whenever another
layer was caught; the count is per router, and a layer with drops that was never caught is an error.
"""

from __future__ import annotations

import pytest
import torch

from moe_prune.allocation.masking import RouterMasks
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError

UNCAUGHT = 1  # the MoE layer whose router computes from a copy of its weight


def uncaught_router(model, config, layer: int) -> None:
    """Layer `layer`'s router computes its logits from a copy of its weight (same values, another tensor)."""
    adapter = config.adapter
    router = model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_router}")
    original, weight = router.forward, router.weight

    def forward(*args, **kwargs):
        router._parameters["weight"] = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        try:
            return original(*args, **kwargs)
        finally:
            router._parameters["weight"] = weight

    router.forward = forward


@pytest.fixture
def masked(tiny_factory):
    folder, model = tiny_factory("mixtral")
    config = Checkpoint.open(folder).config
    masks = RouterMasks(model, config)
    yield model, config, masks
    router = model.get_submodule(f"{config.adapter.runtime_layers}.{UNCAUGHT}.{config.adapter.runtime_router}")
    router.__dict__.pop("forward", None)  # the session's shared tiny model: its class's forward again


def run(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_a_layer_whose_router_was_not_masked_is_named(masked):
    model, config, masks = masked
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    layers = list(config.moe_layers)
    assert len(layers) > 2 and UNCAUGHT in layers
    uncaught_router(model, config, UNCAUGHT)
    drops = [[0, 1] for _ in layers]
    with pytest.raises(MoePruneError) as caught, masks.dropped(drops):
        run(model, ids)
    message = str(caught.value)
    assert f"MoE layers [{UNCAUGHT}]:" in message and "\n" not in message
    # drops only where routers are caught: masked, no error; the output differs from the original's
    drops[layers.index(UNCAUGHT)] = []
    with masks.dropped(drops):
        candidate = run(model, ids)
    assert not torch.allclose(candidate, run(model, ids))
