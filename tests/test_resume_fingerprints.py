"""Golden resume fingerprints: an interrupted run resumes only when its fingerprint matches the one stored
(finetune's run state, lottery's recipe.json, profile's partial sums), so a renamed field, a field moved
in or out of `affects_result`, or a reordered tuple would silently make old runs unresumable.

The expected values were computed with release b5b1b2a's code (`git worktree add /tmp/old-b5 b5b1b2a`, the
same calls run with PYTHONPATH=/tmp/old-b5) and equal HEAD's at the time this test was written; change them
only together with a note that old runs can no longer be resumed.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.lottery.recipe import LotteryParams, Recipe
from moe_prune.runtime.distributed import World
from moe_prune.stages import profile
from moe_prune.training.options import FinetuneOptions

FINETUNE_FIELDS = [
    "aux_loss_weight", "batch_size", "entropy_weight", "eos", "format", "grad_accum", "lr", "max_grad_norm",
    "mixed_precision", "router_warmup_steps", "seed", "seq_len", "split_on", "text_field", "tokens", "top_k",
    "top_k_anneal", "train", "warmup_ratio", "weight_decay",
]  # fmt: skip
CUSTOM = {
    "tokens": 4096, "seq_len": 64, "batch_size": 4, "lr": 1e-3, "top_k_anneal": (4, 2), "train": ("router",),
    "eos": False, "save_every": 3, "entropy_weight": 0.1,
}  # fmt: skip


def test_lottery_recipe_digest_is_the_releases() -> None:
    params = LotteryParams(
        "m", "reap", ["a:1", "b:2"], target_ratio=0.25, rounds=3, finetune=False, lr=2e-4, eval_data="e"
    )
    assert Recipe(params, {"x": 1}, {"y": 2}).digest() == "sha256:bbbea318d9506526"


@pytest.mark.parametrize(
    ("options", "digest"),
    [({}, "sha256:3597cd6169a55168"), (CUSTOM, "sha256:5ea50eca926f933d")],
    ids=["default", "custom"],
)
def test_finetune_fingerprint_fields_are_the_releases(options: dict, digest: str) -> None:
    fields = FinetuneOptions(**options).fingerprint_fields()
    assert sorted(fields) == FINETUNE_FIELDS
    blob = json.dumps(json.loads(json.dumps(fields)), sort_keys=True).encode()  # as stored in the run's JSON
    assert "sha256:" + hashlib.sha256(blob).hexdigest()[:16] == digest, fields


@pytest.mark.parametrize(
    ("settings", "digest"),
    [
        ({}, "871c0cd825d93b12294901f35ce578c21d1e5ef7b0a33ee77ed0dbf60bf2d541"),
        (
            {"batch_size": 2, "dtype": "bfloat16", "expert_outputs": True, "refit_stats": True},
            "f226192de76af00d68a889e530625803d8b3ff8619c66444e2f2627ef4b779d5",
        ),
        ({"for_names": ("reap",)}, "ad9fe21ecc26b0e5c4831d3008c2dcc6cfacba251b04963339af226d2d3c7cce"),
    ],
    ids=["default", "opt-ins", "for"],
)
def test_profile_resume_fingerprint_is_the_releases(settings: dict, digest: str) -> None:
    identity = Checkpoint.open(DEMO_MODEL_DIR).identity
    windows = torch.arange(4 * 16).reshape(4, 16) % 50
    assert profile._fingerprint(identity, windows, profile.Settings(**settings), World(rank=1, size=2)) == digest
