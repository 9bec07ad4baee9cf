"""Artifacts: masks and statistics round-trip, validate on read, and combine exactly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.mask import DropMask
from moe_prune.artifacts.stats import Stats
from moe_prune.errors import MoePruneError

IDENT = ModelIdentity("mixtral", 3, {0: tuple(range(8)), 2: (0, 2, 3, 5, 6, 7)}, "sha256:abc")


def test_mask_round_trip_and_drop_lists():
    mask = DropMask.create(IDENT, {0: [7, 1, 2, 3], 2: [0, 5, 6]}, "usage", {"ratio": 0.5})
    again = DropMask.from_dict(json.loads(mask.dumps()), "m")
    assert again.keep == {0: (1, 2, 3, 7), 2: (0, 5, 6)}
    assert again.drop(2) == (2, 3, 7)
    assert again.provenance["criterion"] == "usage" and again.provenance["tool_version"]
    assert not again.is_uniform


def test_mask_from_drop_lists_only():
    obj = DropMask.create(IDENT, {0: [0, 1], 2: [0, 2]}, "x").to_dict()
    for entry in obj["layers"].values():
        del entry["keep"]
    assert DropMask.from_dict(obj, "m").keep == {0: (0, 1), 2: (0, 2)}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda o: o.update(schema="other"), "not a moe-prune/mask file"),
        (lambda o: o.update(version=99), "version 99 is not supported"),
        (lambda o: o["layers"]["2"].update(keep=[1], drop=[]), "does not have"),
        (lambda o: o["layers"].pop("2"), "lists layers"),
        (lambda o: o["layers"].update({"1": {"keep": [0]}}), "not an MoE layer"),
        (lambda o: o["layers"]["0"].update(keep=[0, 1], drop=[1, 2]), "do not partition"),
    ],
)
def test_mask_validation(edit, message):
    obj = DropMask.create(IDENT, {0: [0, 1], 2: [0, 2]}, "x").to_dict()
    edit(obj)
    with pytest.raises(MoePruneError, match=message):
        DropMask.from_dict(obj, "m")


def test_identity_mismatch_says_what_differs():
    other = ModelIdentity("mixtral", 3, {0: tuple(range(8)), 2: tuple(range(8))}, "sha256:abc")
    with pytest.raises(MoePruneError, match="expects 6 experts in layer 2 but model has 8"):
        IDENT.require_same(other, "mask", "model")


def test_stats_save_load_combine(tmp_path):
    rng = np.random.default_rng(0)
    a = Stats(
        IDENT,
        {"hard_counts": rng.integers(0, 9, (2, 8)), "vocab_bits": rng.integers(0, 255, (2, 8, 4), dtype=np.uint8)},
    )
    b = Stats(
        IDENT,
        {"hard_counts": rng.integers(0, 9, (2, 8)), "vocab_bits": rng.integers(0, 255, (2, 8, 4), dtype=np.uint8)},
    )
    a.save(tmp_path / "a.npz")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o666 & ~umask
    loaded = Stats.load(tmp_path / "a.npz")
    assert loaded.identity == IDENT
    both = loaded.combine(b)
    assert np.array_equal(both.arrays["hard_counts"], a.arrays["hard_counts"] + b.arrays["hard_counts"])
    assert np.array_equal(both.arrays["vocab_bits"], a.arrays["vocab_bits"] | b.arrays["vocab_bits"])
    with pytest.raises(MoePruneError, match="lacks statistics grad_gram"):
        both.require("hard_counts", "grad_gram")


def test_stats_combine_refuses_gradient_statistics():
    grads = {"hard_counts": np.ones((2, 8)), "grad_gram": np.ones((2, 8, 8))}
    with pytest.raises(MoePruneError, match="do not add"):
        Stats(IDENT, grads).combine(Stats(IDENT, dict(grads)), "b.npz")


def test_stats_refuse_garbage(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(MoePruneError, match="not a moe-prune statistics file"):
        Stats.load(tmp_path / "x.npz")
    with pytest.raises(MoePruneError, match="not found"):
        Stats.load(tmp_path / "missing.npz")


# ---- resume files of `profile --save-every` -----------------------------------------------------------------------


class _Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def partial_run(tiny, tmp_path_factory):
    """(model, data, partial file bytes) of a profile interrupted after two of four saved batches."""
    from moe_prune.runtime.resume import partial_path
    from moe_prune.stages import profile

    root = tmp_path_factory.mktemp("partial")
    data = root / "cal.txt"
    data.write_text("\n\n".join(f"document {i}: the {i % 7} crates sold at {i * 3} in the morning" for i in range(40)))
    settings = profile.Settings(samples=8, seq_len=16, batch_size=2, save_every=1)

    def stop(done: int, total: int) -> None:
        if done >= 2 * 2 * 16:
            raise _Interrupt

    partial = partial_path(root / "s.npz")
    with pytest.raises(_Interrupt):
        profile.run(tiny("mixtral"), str(data), settings, stop, partial=partial)
    return tiny("mixtral"), data, partial.read_bytes()


def _rewrite(blob: bytes, edit) -> bytes:
    """The partial file with `edit(arrays)` applied to its arrays."""
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    edit(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


PARTIAL_DAMAGE = {
    "garbage": lambda blob: b"\x00garbage" * 10,
    "empty-file": lambda blob: b"",
    "truncated": lambda blob: blob[: len(blob) // 2],
    "empty-npz": lambda blob: _rewrite(blob, lambda a: a.clear()),
    "missing-sums": lambda blob: _rewrite(blob, lambda a: a.pop("act_sum")),
    "wrong-shape": lambda blob: _rewrite(blob, lambda a: a.update(hard_counts=a["hard_counts"][:, :-1])),
    "wrong-dtype": lambda blob: _rewrite(blob, lambda a: a.update(hard_counts=a["hard_counts"].astype(np.float32))),
    "nan-sums": lambda blob: _rewrite(blob, lambda a: a["logit_gram"].__setitem__((0, 0, 0), np.nan)),
    "bad-counter": lambda blob: _rewrite(
        blob, lambda a: a.update(__resume__=np.array([str(a["__resume__"][0]), "two", "0"]))
    ),
    "pickled": lambda blob: _rewrite(blob, lambda a: a.update(__resume__=np.array([{}, "1", "0"], dtype=object))),
}


@pytest.mark.parametrize("kind", sorted(PARTIAL_DAMAGE))
def test_profile_resume_from_damaged_partial_file_is_one_line(partial_run, tmp_path, kind):
    from typer.testing import CliRunner

    from moe_prune.cli import app
    from moe_prune.runtime.resume import partial_path

    model, data, blob = partial_run
    out = tmp_path / "s.npz"
    partial = partial_path(out)
    partial.write_bytes(PARTIAL_DAMAGE[kind](blob))
    before = partial.read_bytes()
    args = ["profile", str(model), "--data", str(data), "--samples", "8", "--seq-len", "16", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--save-every", "1", "--resume", "--out", str(out)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and partial.name in lines[0], (result.stderr, result.exception)
    assert partial.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [partial.name]


def test_profile_resume_from_good_partial_file_still_works(partial_run, tmp_path):
    """The check of the damaged cases above does not refuse the file a real interruption leaves."""
    from typer.testing import CliRunner

    from moe_prune.cli import app
    from moe_prune.runtime.resume import partial_path

    model, data, blob = partial_run
    out = tmp_path / "s.npz"
    partial_path(out).write_bytes(blob)
    args = ["profile", str(model), "--data", str(data), "--samples", "8", "--seq-len", "16", "--batch-size", "2"]
    result = CliRunner().invoke(app, [*args, "--save-every", "1", "--resume", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert out.exists() and not partial_path(out).exists()
