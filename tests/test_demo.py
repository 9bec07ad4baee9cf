"""The shipped demo model is real: its perplexity is what the README states, and experts matter."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch
from reference import MaskRouterLogits, router_weight

from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.runtime.data import fixed_chunks, load_texts, token_stream
from moe_prune.runtime.loading import load_model, load_tokenizer
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, prune

README = Path(__file__).parents[1] / "README.md"


def stated_perplexity() -> float:
    match = re.search(r"held-out perplexity \| \*\*([\d.]+)\*\*", README.read_text())
    assert match, "README must state the demo model's held-out perplexity"
    return float(match[1])


@pytest.fixture(scope="module")
def demo_eval():
    return evaluate.run(DEMO_MODEL_DIR, EvalSpec(data=str(DEMO_HELDOUT), seq_len=256, batch_size=16))


def test_demo_loads_and_matches_readme(demo_eval):
    assert demo_eval.model.model_type == "mixtral" and demo_eval.model.experts_per_layer == 8
    assert round(demo_eval.model.perplexity, 3) == stated_perplexity(), "README and the demo model disagree"
    assert demo_eval.model.tokens_scored > 20_000


def _perplexity(model, chunks) -> float:
    """Independent of moe-prune's NLL loop: transformers' own shifted loss per chunk, weighted by its targets."""
    total = 0.0
    with torch.no_grad():
        for chunk in chunks:
            ids = chunk[None]
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
    return float(torch.exp(torch.tensor(total / (len(chunks) * (chunks.shape[1] - 1)))))


def test_dropping_half_the_experts_of_one_layer_hurts(demo_eval):
    model = load_model(DEMO_MODEL_DIR)
    tokenizer = load_tokenizer(DEMO_MODEL_DIR)
    chunks = fixed_chunks(token_stream(load_texts(str(DEMO_HELDOUT)), tokenizer), 256)
    intact = _perplexity(model, chunks)
    assert intact == pytest.approx(demo_eval.model.perplexity, rel=1e-6)
    router = model.get_submodule("model.layers.1.mlp.gate")
    dropped = sorted(random.Random(0).sample(range(8), 4))
    with MaskRouterLogits({id(router_weight(router, 8)): dropped}):
        masked = _perplexity(model, chunks)
    assert masked > intact * 1.02, (intact, masked)  # about +5% on the shipped demo


def test_pruning_half_of_every_layer_hurts_more(demo_eval, tmp_path):
    ckpt = Checkpoint.open(DEMO_MODEL_DIR)
    rng = random.Random(1)
    keep = {layer: sorted(rng.sample(range(8), 4)) for layer in ckpt.identity.moe_layers}
    prune.run(DEMO_MODEL_DIR, DropMask.create(ckpt.identity, keep, "random"), tmp_path / "half")
    half = evaluate.run(
        tmp_path / "half", EvalSpec(data=str(DEMO_HELDOUT), seq_len=256, batch_size=16, baseline=DEMO_MODEL_DIR)
    )
    print(f"\ndemo perplexity {demo_eval.model.perplexity:.3f}; half dropped {half.model.perplexity:.3f}")
    assert half.model.perplexity > demo_eval.model.perplexity * 1.05
    assert half.model.params.total < half.baseline.params.total
    assert half.model.bytes_on_disk < half.baseline.bytes_on_disk


def test_demo_alias_names_the_shipped_model_unless_a_local_folder_is_called_demo(tmp_path, monkeypatch):
    from moe_prune.checkpoint.source import resolve_model

    monkeypatch.chdir(tmp_path)
    assert resolve_model("demo") == DEMO_MODEL_DIR
    (tmp_path / "demo").mkdir()
    assert resolve_model("demo") == Path("demo")
