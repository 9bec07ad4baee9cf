"""`--expert-memory` bounds what a decoder layer's experts cost (issue #24: DeepSeek-V3's 22.5 GB bf16 layer in 24 GB).

Probe of tests/test_memory_contract.py: a child process profiles a small model (imports and lazy
initialisation done), resets its resident high-water mark and profiles `--sequential` a model whose MoE
layers are 100 MB of float32 experts each; the growth of the high-water mark is what that run cost. With
a budget of a quarter of a layer's experts the growth stays under half a layer; without it a whole layer
is held (at least one layer's experts). Linux only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_memory_contract import LARGE, _growth, _save
from tests.test_profile import write_docs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, int]:
    """(folder with the small and large models and the data, one large layer's bytes)."""
    folder = tmp_path_factory.mktemp("chunks")
    _save(folder / "small")
    layer = _save(folder / "large", **{**LARGE, "num_hidden_layers": 2})
    write_docs(folder / "cal.jsonl", 8, seed=0)
    return folder, layer


def test_expert_memory_bounds_the_layer(models):
    folder, layer = models
    experts = LARGE["num_experts"] * 3 * LARGE["hidden_size"] * LARGE["moe_intermediate_size"] * 4
    assert experts > 0.9 * layer  # the layer is almost all experts: what the budget bounds
    whole = _growth(folder, "profile")
    chunked = _growth(folder, "profile", experts // 4)
    assert whole >= experts, f"without a budget the peak grew {whole / 2**20:.0f} MB"
    assert chunked <= 0.5 * layer, f"peak grew {chunked / 2**20:.0f} MB, one layer {layer / 2**20:.0f} MB"


def test_expert_memory_bounds_the_refit_pass(models, tmp_path):
    """merge --refit --expert-memory: the pass holds a quarter layer's chunk, not the layer; its default sums bound
    is half of what the layer holds then (about one slot's 34 MiB here), plus one slot's solve (3 I x I float64)."""
    from moe_prune.stages import profile

    folder, layer = models
    settings = profile.Settings(samples=8, seq_len=16, batch_size=4, sequential=True)
    for name in ("small", "large"):
        profile.run(folder / name, folder / "cal.jsonl", settings).stats.save(folder / f"{name}.npz")
    experts = LARGE["num_experts"] * 3 * LARGE["hidden_size"] * LARGE["moe_intermediate_size"] * 4
    slot = LARGE["moe_intermediate_size"] * (LARGE["moe_intermediate_size"] + LARGE["hidden_size"]) * 8
    solve = 3 * LARGE["moe_intermediate_size"] ** 2 * 8
    chunked = _growth(folder, "merge-refit", experts // 4)
    bound = 0.25 * experts + (layer - experts) + slot + solve + 2**20  # whole layers: 100 MB more
    assert chunked <= bound, f"peak grew {chunked / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB"
