"""`--expert-memory` bounds what a decoder layer's experts cost (issue #24: DeepSeek-V3's 22.5 GB bf16 layer in 24 GB).

Probe as in tests/test_memory_contract.py: a child process profiles a small model (imports and lazy
initialisation done), resets its resident high-water mark and profiles `--sequential` a model whose MoE
layers are 100 MB of float32 experts each; the growth of the high-water mark is what that run cost. With
a budget of a quarter of a layer's experts the growth stays under half a layer; without it a whole layer
is held (at least one layer's experts). Linux only.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_memory_contract import LARGE, _save
from tests.test_profile import write_docs

PROBE = """
import gc, json, sys
from moe_prune.stages import profile

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

small, large, data, budget = sys.argv[1:5]
def run(model, budget):
    settings = profile.Settings(samples=8, seq_len=16, batch_size=4, sequential=True, expert_memory=budget)
    profile.run(model, data, settings)
run(small, None)
gc.collect()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
run(large, int(budget) if budget != "none" else None)
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
"""

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


def _growth(folder: Path, budget: int | None) -> int:
    args = [str(folder / "small"), str(folder / "large"), str(folder / "cal.jsonl"), str(budget or "none")]
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    return probe["peak"] - probe["before"]


def test_expert_memory_bounds_the_layer(models):
    folder, layer = models
    experts = LARGE["num_experts"] * 3 * LARGE["hidden_size"] * LARGE["moe_intermediate_size"] * 4
    assert experts > 0.9 * layer  # the layer is almost all experts: what the budget bounds
    whole = _growth(folder, None)
    chunked = _growth(folder, experts // 4)
    assert whole >= experts, f"without a budget the peak grew {whole / 2**20:.0f} MB"
    assert chunked <= 0.5 * layer, f"peak grew {chunked / 2**20:.0f} MB, one layer {layer / 2**20:.0f} MB"
