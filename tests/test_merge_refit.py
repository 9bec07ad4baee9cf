"""`profile --expert-outputs/--refit-stats` against a float64 brute force, and `merge --refit` (least squares)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_profile import DOCS, FAMILIES, capture_routing, expert_output, settings, silu, write_docs

from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.stages import profile as stage


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def expert_pass_reference(model, config: ModelConfig, kind: str, score: str, input_ids: torch.Tensor) -> dict:
    """out_all_sum, refit_hh, refit_hy recomputed in numpy from the weights and the captured routing."""
    out: dict[str, list[np.ndarray]] = {"out_all_sum": [], "refit_hh": [], "refit_hy": []}
    for layer, rec in capture_routing(model, config, input_ids).items():
        prefix = f"{config.adapter.runtime_layers}.{layer}.{config.adapter.runtime_experts}."
        weights = {
            k[len(prefix) :]: v.detach().double().numpy() for k, v in model.named_parameters() if k.startswith(prefix)
        }
        x, z, idx, w = rec["x"], rec["z"], rec["idx"], rec["w"]
        n = config.experts_per_layer[layer]
        outputs = np.stack([expert_output(kind, weights, model.config, e, x) for e in range(n)])  # [E, T, H]
        y = np.zeros_like(x)  # the gate-weighted mean of the chosen experts' outputs
        for t in range(x.shape[0]):
            for j in range(idx.shape[1]):
                y[t] += w[t, j] * outputs[idx[t, j], t] / w[t].sum()
        probs = 1 / (1 + np.exp(-z)) if score == "sigmoid" else softmax(z)
        out["out_all_sum"].append(outputs.sum(axis=1))
        if kind == "fused":
            gate_up = [np.split(x @ weights["gate_up_proj"][e].T, 2, axis=1) for e in range(n)]
            h = np.stack([silu(g) * u for g, u in gate_up])  # [E, T, I]
            out["refit_hh"].append(np.einsum("te,eti,etj->eij", probs, h, h))
            out["refit_hy"].append(np.einsum("te,eti,th->eih", probs, h, y))
    return {k: np.stack(v) for k, v in out.items() if v}


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss", "dbrx"])
def test_expert_pass_statistics_match_brute_force(model_type, tiny, tmp_path):
    """Every expert on every token: the recorder's sums equal a float64 recomputation from the weights."""
    folder = tiny(model_type)
    data = tmp_path / "cal.jsonl"
    write_docs(data, DOCS // 4, seed=2)
    kind, score = FAMILIES[model_type]
    refit = kind == "fused"
    result = stage.run(folder, str(data), settings(expert_outputs=True, refit_stats=refit))
    model = load_model(folder)
    config = ModelConfig.load(folder / "config.json")
    from test_profile import windows_of

    want = expert_pass_reference(model, config, kind, score, windows_of(data, folder))
    assert result.stats.provenance["expert_outputs"] is True
    for key, value in want.items():
        got = result.stats.arrays[key]
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-5 * float(np.abs(value).max()), err_msg=key)
    assert ("refit_hh" in result.stats.arrays) == refit


@pytest.mark.parametrize(
    "model_type,flags,message",
    [
        ("gpt_oss", {"refit_stats": True}, "have biases"),
        ("dbrx", {"refit_stats": True}, "not built on transformers' experts interface"),
        ("llama4_text", {"expert_outputs": True}, "router-scaled inputs"),
    ],
)
def test_expert_pass_refusals(model_type, flags, message, tiny, tmp_path):
    data = tmp_path / "cal.jsonl"
    write_docs(data, 3, seed=0)
    with pytest.raises(MoePruneError, match=message):
        stage.run(tiny(model_type), str(data), settings(**flags))


def test_expert_pass_statistics_survive_sequential_shards_and_resume(tiny, tmp_path):
    """The opt-in sums are ordinary streaming sums: --sequential, two shards combined and a resumed run agree."""
    from test_profile import SEQ
    from test_profile_scale import Interrupt, interrupt_after

    from moe_prune.runtime.resume import partial_path

    folder = tiny("qwen3_moe")
    data = tmp_path / "cal.jsonl"
    write_docs(data, 9, seed=6)
    flags = {"expert_outputs": True, "refit_stats": True, "batch_size": 2}
    whole = stage.run(folder, str(data), settings(**flags)).stats.arrays
    sequential = stage.run(folder, str(data), settings(**flags, sequential=True)).stats.arrays
    shards = [stage.run(folder, str(data), settings(**flags, shard=(i, 2))).stats for i in range(2)]
    combined = shards[0].combine(shards[1]).arrays
    partial = partial_path(tmp_path / "s.npz")
    with pytest.raises(Interrupt):
        stage.run(folder, str(data), settings(**flags, save_every=2), interrupt_after(3, 2 * SEQ), partial=partial)
    resumed = stage.run(folder, str(data), settings(**flags, save_every=2), partial=partial, resume=True).stats.arrays
    for key in ("out_all_sum", "refit_hh", "refit_hy"):
        scale = float(np.abs(whole[key]).max())
        for other in (sequential, combined, resumed):
            np.testing.assert_allclose(other[key], whole[key], rtol=1e-5, atol=1e-6 * scale, err_msg=key)
