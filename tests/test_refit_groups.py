"""`merge --refit-memory`: a layer's slots summed in groups that fit a bound (issue #24, refit that scales).

Checked against the ungrouped pass (one group of every slot, itself checked against the two-step refit and a
float64 brute force in test_refit_pass), and by counting the refit sums alive at once (every float64 sums
array the pass allocates, tracked until it is freed) and tracemalloc's peak of the pass.
"""

from __future__ import annotations

import re
import tracemalloc
import weakref

import pytest
import torch
from helpers import traced_peaks
from test_profile import settings, write_docs
from test_refit_pass import downs, wide_model
from typer.testing import CliRunner

from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.merging import refit_groups, refit_pass
from moe_prune.merging.refit_groups import slot_groups
from moe_prune.merging.refit_store import SpilledDowns
from moe_prune.runtime import refit_sums
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge
from moe_prune.stages import profile as profile_stage
from moe_prune.stages import refit as refit_stage

runner = CliRunner()
ALL = 10**15  # a bound every layer's slots fit at once: today's ungrouped pass


def count_groups(monkeypatch) -> list[tuple[int, int]]:
    """(layer, slots) of every AnchorSums the pass builds: one per group."""
    built: list[tuple[int, int]] = []

    class Counted(refit_sums.AnchorSums):
        def __init__(self, model, config, layer, anchors):
            super().__init__(model, config, layer, anchors)
            built.append((layer, len(anchors)))

    monkeypatch.setattr(refit_pass, "AnchorSums", Counted)
    return built


@pytest.mark.parametrize("ridge", [None, "auto"])
def test_groups_of_one_and_two_slots_equal_all_at_once_on_the_demo(tmp_path, monkeypatch, ridge):
    """4 slots per layer summed 1, 2 and 4 at a time (the layer runs 4, 2 and 1 times): the same down projections
    (1e-6 of each tensor's largest value; measured identical, the same float64 products), the same ridges and
    held-out errors, and a progress bar that only moves forward to its end."""
    from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR

    stats = profile_stage.run(
        DEMO_MODEL_DIR, str(DEMO_CALIBRATION), profile_stage.Settings(samples=8, seq_len=128)
    ).stats
    per_slot = 224 * (224 + 128) * 8  # demo: I = 224, H = 128
    built = count_groups(monkeypatch)
    results, written = {}, {}
    for slots in (ALL, 1, 2):
        built.clear()
        ticks: list[tuple[int, int]] = []
        out = tmp_path / f"g{slots}"
        results[slots] = merge.run(
            DEMO_MODEL_DIR, stats, out, 4, MergeSpec(refit=True, refit_ridge=ridge, refit_memory=slots * per_slot),
            refit_progress=lambda done, total: ticks.append((done, total)),  # noqa: B023
        )  # fmt: skip
        written[slots] = downs(out)
        assert built == [(layer, min(slots, 4)) for layer in range(4) for _ in range(4 // min(slots, 4))]
        done = [d for d, _ in ticks]
        assert done == sorted(done) and done[-1] == ticks[-1][1], ticks[-3:]
    want = written[ALL]
    assert len(want) == 16
    for slots in (1, 2):
        assert sorted(written[slots]) == sorted(want)
        for name, value in want.items():
            scale = float(value.abs().max())
            torch.testing.assert_close(written[slots][name], value, rtol=0, atol=1e-6 * scale, msg=name)
        for got, ref in zip(results[slots].refit_fits, results[ALL].refit_fits, strict=True):
            assert got.ridges == ref.ridges and got.max_abs == pytest.approx(ref.max_abs, rel=1e-6)
            assert got.original_max_norm == ref.original_max_norm and got.original_max_abs == ref.original_max_abs
            assert got.held_out_errors == pytest.approx(ref.held_out_errors, rel=1e-9)
            assert (got.held_out_error is None) == (ridge is None)


def alive_sums(monkeypatch) -> dict[str, int]:
    """Bytes of refit sums alive now and at most, over every array `runtime.refit_sums.zeros` hands out."""
    state = {"now": 0, "peak": 0, "arrays": 0}
    original = refit_sums.zeros

    def tracked(shape, device):
        array, tensor = original(shape, device)
        assert array is not None  # CPU: numpy-backed
        state["now"] += array.nbytes
        state["peak"] = max(state["peak"], state["now"])
        state["arrays"] += 1
        weakref.finalize(array, lambda n=array.nbytes: state.__setitem__("now", state["now"] - n))
        return array, tensor

    monkeypatch.setattr(refit_sums, "zeros", tracked)
    return state


def test_a_bound_of_one_slot_keeps_one_slots_sums_alive(tmp_path, monkeypatch):
    """2 layers, 4 slots of I = 768, H = 64 (5.1 MB of sums each): with --refit-memory one slot's sums, never more
    than one slot's sums alive (counted), 8 groups summed; unbounded, the 4 slots' 20.4 MB at once. tracemalloc's
    peak of the pass (sums + one slot's solve) falls with them: measured 5.0 slots' sums -> 2.0 (2.5x lower)."""
    inner, hidden, keep = 768, 64, 4
    folder = wide_model(tmp_path, 2, inner, hidden)
    write_docs(tmp_path / "cal.jsonl", 8, seed=1)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    per_slot = inner * (inner + hidden) * 8
    state = alive_sums(monkeypatch)
    peaks = traced_peaks(monkeypatch, refit_stage, "refit_pass")  # the pass alone, not the reader before it
    for bound in (ALL, per_slot):
        state.update(now=0, peak=0, arrays=0)
        tracemalloc.start()
        try:
            merge.run(folder, stats, tmp_path / f"out{bound}", keep, MergeSpec(refit=True, refit_memory=bound))
        finally:
            tracemalloc.stop()
        slots = 1 if bound == per_slot else keep
        assert state["peak"] == slots * per_slot and state["arrays"] == 2 * 2 * keep // slots, state
        assert state["now"] == 0
    assert peaks[1] < 0.6 * peaks[0], (peaks, peaks[0] / peaks[1])


@pytest.mark.parametrize("limit", ["available", "layer"])
def test_the_automatic_bound_is_half_the_layer_within_half_the_available_memory(limit, tiny, tmp_path, monkeypatch):
    """Without --refit-memory the groups fit half of the layer's own bytes (issue #24's contract: 1.5x a layer),
    and no more than half of what the sums' device has available when the layer runs."""
    from transformers import AutoModelForCausalLM

    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 6, seed=2)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    layer = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).model.layers[0]
    layer_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())  # the transformers model's count
    built = count_groups(monkeypatch)
    per_slot = []
    original = refit_pass.slot_bytes
    monkeypatch.setattr(refit_pass, "slot_bytes", lambda *a: per_slot.append(original(*a)) or per_slot[-1])
    if limit == "available":
        monkeypatch.setattr(refit_groups, "available_bytes", lambda device: 5 * per_slot[0])  # groups of 2 (2.5)
        want = [2, 1] * 3
    else:
        monkeypatch.setattr(refit_groups, "available_bytes", lambda device: 10**15)
        slots = max(1, min(3, layer_bytes // 2 // original_slot_bytes(folder)))
        want = [len(range(start, min(start + slots, 3))) for start in range(0, 3, slots)] * 3
        assert len(want) > 3  # the tiny layer holds fewer bytes than its 3 slots' sums: several groups
    merge.run(folder, stats, tmp_path / "out", 3, MergeSpec(refit=True))
    assert [slots for _, slots in built] == want, built
    assert refit_groups.available_bytes(torch.device("cpu")) > 0


def original_slot_bytes(folder) -> int:
    """One slot's sums, I x (I + H) float64, from the config (independent of `runtime.refit_sums.slot_bytes`)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    inner = config["intermediate_size"]
    return inner * (inner + config["hidden_size"]) * 8


def test_slot_groups():
    assert slot_groups(4, 10, 25) == [slice(0, 2), slice(2, 4)]
    assert slot_groups(5, 10, 10) == [slice(i, i + 1) for i in range(5)]
    assert slot_groups(3, 10, 9) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # below one slot: one at a time
    assert slot_groups(3, 10, 10**9) == [slice(0, 3)]
    assert slot_groups(5, 10, 30) == [slice(0, 3), slice(3, 5)]


def test_refit_memory_refusals(tiny, tmp_path):
    """Below one slot's sums, without --refit, with stored sums: one line, nothing written."""
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 6, seed=2)
    stats = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats
    with_sums = profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings(refit_stats=True)).stats
    cases = [
        (stats, {"refit_memory": 100}, "--refit-memory 100 bytes is less than one slot's refit sums ("),
        (stats, {"refit": False, "refit_memory": 10**9}, "--refit-memory applies to --refit only"),
        (with_sums, {"refit_memory": 10**9}, "(profile --refit-stats), solved with a fixed ridge without running"),
    ]
    for given, options, message in cases:
        with pytest.raises(MoePruneError, match=re.escape(message)):
            merge.run(folder, given, tmp_path / "out", 3, MergeSpec(**{"refit": True, **options}))
        assert not (tmp_path / "out").exists()


def test_cli_refit_memory_is_a_size(tiny, tmp_path):
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 4, seed=3)
    stats, out = tmp_path / "s.npz", tmp_path / "out"
    args = ["profile", str(folder), "-d", str(tmp_path / "cal.jsonl"), "--seq-len", "16", "-o", str(stats)]
    assert runner.invoke(app, args).exit_code == 0
    merge_args = ["merge", str(folder), "-s", str(stats), "-k", "3", "-o", str(out), "--refit"]
    for value, message in (("0", "must be a positive size"), ("5XB", "expected a size such as 5GB")):
        result = runner.invoke(app, [*merge_args, "--refit-memory", value])
        assert result.exit_code == 1 and f"--refit-memory {value!r}: {message}" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    result = runner.invoke(app, [*merge_args, "--refit-memory", "1KB"])
    assert result.exit_code == 1 and "--refit-memory 1000 bytes is less than one slot's" in result.output
    assert runner.invoke(app, [*merge_args, "--refit-memory", "1GB", "--json"]).exit_code == 0


def test_spilled_downs_append_one_slot_at_a_time():
    store = SpilledDowns([], None)
    assert len(store) == 0
    store.append(torch.ones(2, 3).double().numpy())
    store.append(torch.zeros(2, 3).double().numpy())
    assert len(store) == 2 and store[0].sum() == 6 and store[1].sum() == 0 and store[0].shape == (2, 3)
    with pytest.raises(ValueError, match=r"of shape \(3, 2\) in a store of \(2, 3\)"):
        store.append(torch.ones(3, 2).numpy())
