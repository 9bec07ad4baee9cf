"""`merge --refit` without stored sums: one layer-by-layer pass (issue #24's refit that scales).

Checked against independent paths: the two-step refit (`profile --refit-stats`, itself checked against a
float64 brute force in test_merge_refit/test_merge_methods) on the demo, a float64 numpy ridge selection on
captured activations for `--refit-ridge auto`, and tracemalloc for the memory the pass keeps alive.
"""

from __future__ import annotations

import json
import re
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import traced_peaks
from test_merge_methods import refit_targets
from test_profile import settings, windows_of, write_docs
from tiny_models import save_char_tokenizer, tiny_config
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moe_prune.artifacts.stats import Stats
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.merging.refit import RIDGES
from moe_prune.merging.refit_pass import LayerFit, held_out_rows
from moe_prune.merging.refit_store import SpilledDowns
from moe_prune.runtime.loading import load_model
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge
from moe_prune.stages import profile as profile_stage
from moe_prune.stages.refit import check_range

runner = CliRunner()


def without_sums(stats: Stats) -> Stats:
    """The same statistics (and provenance: the same windows) without refit_hh/refit_hy."""
    return Stats(stats.identity, {k: v for k, v in stats.arrays.items() if not k.startswith("refit")}, stats.provenance)


def downs(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(file).items() if k.endswith("w2.weight")})
    return out


def test_sequential_refit_equals_the_two_step_refit_on_the_demo(tmp_path):
    """Same windows (re-read from the provenance), same float64 normal equations: the down projections agree.

    Tolerance 1e-5 of each tensor's largest value: the two paths sum identical float64 products except that y
    (and the hidden states feeding the next layer) come from float32 forwards that add the chosen experts in a
    different order (the recorder's sorted rows vs the experts module's own loop), ~1e-7 relative; measured
    2.0e-7 on 16 windows, 3.9e-7 on these 8. Unweighted sums (p = 1, the sabotage tried) fail it.
    """
    from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR

    options = profile_stage.Settings(samples=8, seq_len=256, refit_stats=True)
    stats = profile_stage.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), options).stats
    stored = merge.run(DEMO_MODEL_DIR, stats, tmp_path / "two-step", 2, MergeSpec(refit=True))
    layered = merge.run(DEMO_MODEL_DIR, without_sums(stats), tmp_path / "one-pass", 2, MergeSpec(refit=True))
    assert [f.layer for f in layered.refit_fits] == [0, 1, 2, 3] and not stored.refit_fits
    want, got = downs(tmp_path / "two-step"), downs(tmp_path / "one-pass")
    assert sorted(want) == sorted(got) and len(want) == 8
    for name, value in want.items():
        scale = float(value.abs().max())
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5 * scale, msg=name)
    for report, fit in zip(layered.layers, layered.refit_fits, strict=True):
        largest = max(
            float(want[f"model.layers.{report.layer}.block_sparse_moe.experts.{s}.w2.weight"].abs().max())
            for s in range(2)
        )
        assert fit.max_abs == pytest.approx(largest, rel=1e-5)


def wide_model(tmp_path, layers: int, inner: int, hidden: int):
    torch.manual_seed(0)
    config = tiny_config("mixtral", num_hidden_layers=layers, intermediate_size=inner, hidden_size=hidden)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "experts" in name or "gate" in name:
                param.normal_(0.0, 0.3)
    folder = tmp_path / "wide"
    model.save_pretrained(folder)
    save_char_tokenizer(folder)
    return folder


def test_refit_pass_keeps_one_layers_statistics_alive(tmp_path, monkeypatch):
    """6 MoE layers whose refit sums (4 slots x I x (I + H) float64) are 20.4 MB each: the pass (embedding, every
    layer's sums, solves and spills) peaks at about one layer's sums (measured 1.34x: the sums plus one slot's
    solve), never the 123 MB of all layers, nor the 245 MB `profile --refit-stats` would hold at E = 8. The sums
    are numpy-backed, so tracemalloc sees them (checked by the lower bound). Reading the calibration data and
    tokenizer (profile's own reader, a transient 67 MB here) happens before the pass and is not counted."""
    from moe_prune.stages import refit as refit_stage

    layers, inner, hidden, keep = 6, 768, 64, 4
    folder = wide_model(tmp_path, layers, inner, hidden)
    write_docs(tmp_path / "cal.jsonl", 12, seed=1)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    one_layer = keep * inner * (inner + hidden) * 8
    peaks = traced_peaks(monkeypatch, refit_stage, "refit_pass")
    tracemalloc.start()
    try:
        spec = MergeSpec(refit=True, refit_memory=10**15)  # one group per layer (the default groups: test_refit_groups)
        result = merge.run(folder, stats, tmp_path / "out", keep, spec)
    finally:
        tracemalloc.stop()
    assert len(result.refit_fits) == layers and len(peaks) == 1
    assert 0.9 * one_layer < peaks[0] < 1.5 * one_layer, (peaks[0] / one_layer, one_layer)


def layer_reference(model, config, ids, layer: int, anchors: list[int], held: list[int]) -> dict:
    """float64 numpy: each anchor's held-out error for every candidate ridge, fitted on the other windows."""
    hidden, y, p = refit_targets(model, config, ids, layer)
    out = np.isin(np.arange(y.shape[0]) // ids.shape[1], held)  # tokens of the held-out windows
    fit = ~out
    errors, norms, solutions = np.zeros((len(anchors), len(RIDGES))), np.zeros(len(anchors)), []
    for row, a in enumerate(anchors):
        h, pa = hidden[a], p[:, a : a + 1]
        hh, hy = (h[fit] * pa[fit]).T @ h[fit], (h[fit] * pa[fit]).T @ y[fit]
        scale = np.mean(np.diag(hh))
        fits = [np.linalg.solve(hh + r * scale * np.eye(len(hh)), hy) for r in RIDGES]
        for i, d in enumerate(fits):
            errors[row, i] = np.sum(pa[out, 0] * np.sum((h[out] @ d - y[out]) ** 2, axis=1))
        norms[row] = np.sum(pa[out, 0] * np.sum(y[out] ** 2, axis=1))
        solutions.append(fits)
    return {"errors": errors, "norms": norms, "solutions": solutions}


def test_auto_ridge_equals_a_float64_held_out_selection(tiny, tmp_path):
    """--refit-ridge auto: every 8th window (5 of 40: 7, 15, ..., 39, spread over the stream, not its tail) scores
    every candidate ridge; the reported errors, each slot's choice and the written down projection equal a numpy
    ridge selection on captured activations."""
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 40, seed=4)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    result = merge.run(folder, stats, tmp_path / "out", 3, MergeSpec(refit=True, refit_ridge="auto"))
    model, config = load_model(folder), Checkpoint.open(folder).config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = windows_of(tmp_path / "cal.jsonl", folder)
    assert len(result.refit_fits) == len(result.layers) == 3
    for report, fit in zip(result.layers, result.refit_fits, strict=True):
        anchors = [c.anchor for c in report.clusters]
        want = layer_reference(model, config, ids, report.layer, anchors, held=[7, 15, 23, 31, 39])
        relative = want["errors"].sum(0) / want["norms"].sum()
        np.testing.assert_allclose(list(fit.held_out_errors.values()), relative, rtol=1e-4)
        best = want["errors"].argmin(1)
        assert fit.ridges == [RIDGES[i] for i in best]
        assert fit.held_out_error == pytest.approx(want["errors"].min(1).sum() / want["norms"].sum(), rel=1e-4)
        for slot, i in enumerate(best):
            expected = want["solutions"][slot][i].T
            got = merged.model.layers[report.layer].mlp.experts.down_proj[slot].detach().double().numpy()
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_held_out_windows_are_spread_over_the_stream():
    """One in eight, the last of each equal run: each source of a mixture (sources follow one another) is held out."""
    assert held_out_rows(40) == [7, 15, 23, 31, 39]
    assert held_out_rows(8) == [7] and held_out_rows(2) == [1] and held_out_rows(12) == [5, 11]
    assert held_out_rows(13) == [5, 12] and held_out_rows(256)[:2] == [7, 15] and len(held_out_rows(256)) == 32


def test_refusals_before_writing(tiny, tmp_path):
    """Statistics whose windows cannot be re-read, auto with stored sums, a bad ridge: one line, nothing written."""
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 6, seed=2)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    combined = Stats(stats.identity, stats.arrays, {"combined": [{}, {}]})
    cases = [
        (combined, {}, "combines several profile runs, so its calibration windows cannot be re-read"),
        (stats, {"refit_ridge": "-1"}, "--refit-ridge '-1': expected a finite number >= 0, or auto"),
        (stats, {"refit_ridge": "often"}, "--refit-ridge 'often': expected a number such as 1e-4, or auto"),
    ]
    with_sums = Stats(stats.identity, {**stats.arrays, "refit_hh": np.zeros(1), "refit_hy": np.zeros(1)})
    stored = "holds refit sums (profile --refit-stats), solved with a fixed ridge without running the model, so "
    cases.append((with_sums, {"refit_ridge": "auto"}, stored + "--refit-ridge auto does not apply"))
    cases.append((with_sums, {"device": "cpu"}, stored + "--device does not apply; give a --refit-ridge number"))
    cases.append((stats, {"refit": False, "refit_ridge": "auto"}, "--refit-ridge applies to --refit only"))
    cases.append((stats, {"refit": False, "device": "cpu"}, "--device applies to --refit only; add --refit or"))
    cases.append((stats, {"refit": False, "buffer_memory": 10}, "--buffer-memory applies to --refit only"))
    cases.append((with_sums, {"buffer_memory": 10}, stored + "--buffer-memory does not apply"))
    for given, options, message in cases:
        with pytest.raises(MoePruneError, match=re.escape(message)):
            merge.run(folder, given, tmp_path / "out", 3, MergeSpec(**{"refit": True, **options}))
        assert not (tmp_path / "out").exists()
    moved = tmp_path / "cal.jsonl"
    moved.write_text(moved.read_text().splitlines()[0] + "\n")
    with pytest.raises(MoePruneError, match="the data changed since `profile`"):
        merge.run(folder, stats, tmp_path / "out", 3, MergeSpec(refit=True))


def test_cli_refit_without_sums_reports_each_layer(tiny, tmp_path):
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 16, seed=3)
    stats, out = tmp_path / "s.npz", tmp_path / "out"
    args = ["profile", str(folder), "-d", str(tmp_path / "cal.jsonl"), "--seq-len", "16", "-o", str(stats)]
    assert runner.invoke(app, args).exit_code == 0
    args = ["merge", str(folder), "-s", str(stats), "-k", "3", "-o", str(out), "--refit", "--refit-ridge", "auto"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    fits = json.loads(result.stdout)["refit_layers"]
    assert [f["layer"] for f in fits] == [0, 1, 2]
    assert all(set(f["held_out_errors"]) == {f"{r:g}" for r in RIDGES} and f["max_abs"] > 0 for f in fits)


def test_cli_refit_options_without_refit_are_one_line(tiny, tmp_path):
    """--device (its default is not the user's word), --refit-ridge, --buffer-memory, --refit-memory without --refit:
    exit 1, nothing written."""
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 4, seed=3)
    stats, out = tmp_path / "s.npz", tmp_path / "out"
    args = ["profile", str(folder), "-d", str(tmp_path / "cal.jsonl"), "--seq-len", "16", "-o", str(stats)]
    assert runner.invoke(app, args).exit_code == 0
    merge_args = ["merge", str(folder), "-s", str(stats), "-k", "3", "-o", str(out)]
    for extra in (
        ["--device", "cpu"],
        ["--refit-ridge", "1e-3"],
        ["--buffer-memory", "1KB"],
        ["--refit-memory", "1KB"],
        ["--expert-memory", "1KB"],
    ):
        option = extra[0]
        result = runner.invoke(app, [*merge_args, *extra])
        assert result.exit_code == 1 and f"{option} applies to --refit only" in result.output, result.output
        assert not out.exists()
    assert runner.invoke(app, merge_args).exit_code == 0


def test_buffer_memory_spills_beside_the_output(tiny, tmp_path, monkeypatch):
    """Hidden states past buffer_memory and the solved down projections go to temporary files in the output's
    folder (not $TMPDIR, often RAM); the merged model equals an in-memory run's, bit for bit."""
    from moe_prune.merging import refit_pass as pass_module
    from moe_prune.runtime import layer_pass

    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 8, seed=6)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    seen: list[tuple[str, bool, object]] = []

    class Buffer(layer_pass.HiddenBuffer):
        def __init__(self, shape, dtype, budget, folder=None):
            super().__init__(shape, dtype, budget, folder)
            seen.append(("hidden", self.spilled, folder))

    class Downs(SpilledDowns):
        def __init__(self, downs, folder=None):
            super().__init__(downs, folder)
            seen.append(("downs", True, folder))

    monkeypatch.setattr(layer_pass, "HiddenBuffer", Buffer)
    monkeypatch.setattr(pass_module, "SpilledDowns", Downs)
    (tmp_path / "runs").mkdir()
    merge.run(folder, stats, tmp_path / "runs" / "spilled", 3, MergeSpec(refit=True, buffer_memory=1))
    assert seen == [("hidden", True, tmp_path / "runs")] + [("downs", True, tmp_path / "runs")] * 3
    seen.clear()
    merge.run(folder, stats, tmp_path / "in-memory", 3, MergeSpec(refit=True))
    assert seen[0] == ("hidden", False, tmp_path)
    want, got = downs(tmp_path / "in-memory"), downs(tmp_path / "runs" / "spilled")
    assert sorted(want) == sorted(got) and all(torch.equal(got[name], value) for name, value in want.items())


def test_range_check_refuses_what_fp16_cannot_hold(tiny_factory, tmp_path):
    """Refit down projections past the checkpoint's narrowest float type would be written as inf."""
    _, model = tiny_factory("mixtral")
    model.half().save_pretrained(tmp_path / "fp16")
    model.float()
    ckpt = Checkpoint.open(tmp_path / "fp16")
    fit = LayerFit(layer=1, ridges=[1e-6], max_abs=6.5e4, original_max_abs=1.0, max_norm=1.0, original_max_norm=1.0)
    check_range(ckpt, [fit])  # 65000 < 65504
    fit.max_abs = 7e4
    with pytest.raises(MoePruneError, match=r"MoE layer 1 reach 7e\+04, past float16's largest value 6.55e\+04"):
        check_range(ckpt, [fit])


def test_spilled_downs_read_back_float32():
    arrays = [np.random.default_rng(i).normal(size=(5, 3)) for i in range(3)]
    store = SpilledDowns(arrays)
    assert len(store) == 3 and store[0].shape == (5, 3)
    for got, want in zip(store, arrays, strict=True):
        np.testing.assert_array_equal(got, want.astype(np.float32))
    np.testing.assert_array_equal(store[-1], arrays[2].astype(np.float32))
    with pytest.raises(IndexError):
        store[3]
