"""One held-out NLL loop (training.nll): finetune's held-out check scores as an independent cross-entropy does,
and refuses a non-finite loss in one line naming the model, as `eval` does."""

from __future__ import annotations

import pytest
import torch

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.training.batches import IGNORE, Sequences
from moe_prune.training.heldout import measure


@pytest.fixture(scope="module")
def demo():
    config = Checkpoint.open(DEMO_MODEL_DIR).config
    return load_model(DEMO_MODEL_DIR), config


def _ids(rows: int, width: int, vocab: int) -> torch.Tensor:
    return torch.randint(4, vocab, (rows, width), generator=torch.Generator().manual_seed(0))


def _independent(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token NLL over the positions whose label is not IGNORE, in one plain forward."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    targets = labels[:, 1:]
    return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE))


def test_text_chunks_and_response_tokens_score_as_plain_cross_entropy(demo):
    model, config = demo
    ids = _ids(6, 24, config.get("vocab_size"))
    held = measure(model, model, config, Sequences(ids), 4, config.top_k, "cpu")
    assert held.loss == pytest.approx(_independent(model, ids, ids), rel=1e-5)

    labels = ids.clone()
    labels[:, :10] = IGNORE  # the prompt carries no loss
    lengths = torch.full((len(ids),), ids.shape[1])
    held = measure(model, model, config, Sequences(ids, labels, lengths), 4, config.top_k, "cpu")
    assert held.loss == pytest.approx(_independent(model, ids, labels), rel=1e-5)


def test_a_non_finite_held_out_loss_is_refused_naming_the_model(demo):
    _, config = demo
    model = load_model(DEMO_MODEL_DIR)
    with torch.no_grad():
        model.get_output_embeddings().weight[5] = float("nan")
    ids = _ids(2, 16, config.get("vocab_size"))
    with pytest.raises(MoePruneError, match=r"^my-model: the model produces non-finite logits"):
        measure(model, model, config, Sequences(ids), 2, config.top_k, "cpu", "my-model")
