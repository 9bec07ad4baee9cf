"""Router rows past the routed experts' (`Adapter.router_tail`): inkling_text's router has a row per shared expert
after the routed ones ([E + shared, H]). They weigh the shared experts, so every edit keeps them, unchanged, after
the kept or merged rows; validation checks the row count against the config key.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_derived import _build
from test_merge import load_stock, read_all, synthetic_stats

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.surgery import KeyMatcher
from moe_prune.errors import MoePruneError
from moe_prune.stages import merge

FAMILY = "inkling_text"


@pytest.fixture(scope="module")
def inkling(tmp_path_factory):
    folder = tmp_path_factory.mktemp(FAMILY) / "model"
    _build(FAMILY, folder, {})
    return folder


@pytest.mark.parametrize("router", ["anchor", "average", "reinit"])
def test_merge_keeps_the_tail_rows_after_the_merged_ones(inkling, router, tmp_path):
    ckpt = Checkpoint.open(inkling)
    n, tail = ckpt.config.num_experts, ckpt.config.router_tail
    assert tail == 1
    merge.run(inkling, synthetic_stats(ckpt), tmp_path / "half", n // 2, router=router, seed=1)
    before, after = read_all(inkling), read_all(tmp_path / "half")
    matcher = KeyMatcher(ckpt.config.adapter)
    routers = [name for name in after if matcher.is_router(name) is not None]
    assert len(routers) == len(ckpt.config.moe_layers)
    for name in routers:
        assert after[name].shape == (n // 2 + tail, before[name].shape[1])
        assert torch.equal(after[name][n // 2 :], before[name][n:])
    with torch.no_grad():
        assert torch.isfinite(load_stock(tmp_path / "half")(torch.randint(0, 100, (1, 9))).logits).all()


def test_router_rows_must_be_experts_plus_tail(inkling, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(inkling, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_shared_experts"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoePruneError) as info:
        Checkpoint.open(folder)
    message = str(info.value)
    assert "n_shared_experts" in message and "router" in message and "\n" not in message
