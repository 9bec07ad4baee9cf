"""`profile --for`: only the fields the named criteria and merge options read, equal to a full profile's.

A file profiled `--for` some names holds exactly the fields those read (plus the selection counts); each
field equals the same field of a full profile of the same data; `score` and `merge` refuse, in one line, a
criterion or method whose fields the file lacks; an unknown name is refused before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from moe_prune.artifacts.stats import Stats
from moe_prune.cli import app
from moe_prune.merging.registry import NEEDS
from moe_prune.scoring import get_criterion
from moe_prune.stages import profile as stage
from moe_prune.stages.profile_for import ALWAYS, wanted
from tests.helpers import assert_one_line_error
from tests.test_profile import settings, write_docs
from tests.tiny_models import save_char_tokenizer

# Names that together reach every forward code path: router sums, selection sums, each act_* field.
CHOICES = [
    ("usage-frequency",),  # selection counts only: experts run unwrapped
    ("soft-counts",),
    ("uncurl",),  # logit_gram
    ("co-selection", "vocabulary-coverage"),
    ("reap",),
    ("activation-entropy",),
    ("activation-similarity", "weights-output"),
    ("protect-super-experts",),  # each act_* field alone at least once: none may depend on another's gate
    ("activation-norm",),
    ("activation-outliers",),
]


@pytest.fixture(scope="module")
def full(tiny_factory, tmp_path_factory):
    """(folder, data, a full profile's arrays) per family, computed once."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            folder, _ = tiny_factory(model_type)
            if not (folder / "tokenizer.json").exists():
                save_char_tokenizer(folder)
            data = tmp_path_factory.mktemp("for") / "cal.jsonl"
            write_docs(data, 12, seed=3)
            cache[model_type] = (folder, data, stage.run(folder, str(data), settings()).stats.arrays)
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", ["mixtral", "llama4_text"])  # experts_args and router_scores selection
@pytest.mark.parametrize("names", CHOICES, ids=lambda n: ",".join(n))
def test_for_fields_equal_full_profile(model_type, names, full):
    folder, data, everything = full(model_type)
    result = stage.run(folder, str(data), settings(for_names=names))
    expected = set(ALWAYS).union(*(_reads(name) for name in names))
    assert set(result.stats.arrays) == expected
    for key, array in result.stats.arrays.items():
        np.testing.assert_array_equal(array, everything[key], err_msg=key)
    assert result.stats.provenance["for"] == list(names)


_OPTIONS = {"protect-super-experts": ("act_max",), "weights-output": ("act_weighted_norm_sum",)}


def _reads(name: str) -> set[str]:
    """What `name` reads, from its own declaration (criterion, merge method) or written out (options)."""
    if name in _OPTIONS:
        return set(_OPTIONS[name])
    if name in NEEDS:
        return {"hard_counts", *NEEDS[name]}
    return set(get_criterion(name).stats)


def test_for_sequential_equals_full(full):
    folder, data, everything = full("mixtral")
    result = stage.run(folder, str(data), settings(for_names=("reap", "uncurl"), sequential=True))
    assert set(result.stats.arrays) == {*ALWAYS, "act_gate_norm_sum", "logit_gram"}
    for key, array in result.stats.arrays.items():
        np.testing.assert_allclose(array, everything[key], rtol=1e-9, err_msg=key)


def test_for_merge_methods_read_their_needs():
    for method, needs in NEEDS.items():
        assert wanted([method]).fields == {*ALWAYS, *needs}
    assert wanted(["hcsmoe"]).expert_outputs and wanted(["refit"]).refit_stats
    assert wanted(["gradient-norm"]).gradients and not wanted(["reap"]).gradients


def test_score_and_merge_refuse_missing_fields(full, tmp_path):
    folder, data, _ = full("mixtral")
    stats = tmp_path / "reap.npz"
    stage.run(folder, str(data), settings(for_names=("reap",))).stats.save(stats)
    assert sorted(Stats.load(stats).arrays) == ["act_gate_norm_sum", "hard_counts", "tokens"]
    runner = CliRunner()
    score = ["score", str(stats), "--ratio", "0.5", "--out"]
    ok = runner.invoke(app, [*score, str(tmp_path / "m.json"), "--criterion", "reap"])
    assert ok.exit_code == 0, ok.output
    refused = runner.invoke(app, [*score, str(tmp_path / "s.json"), "--criterion", "soft-counts"])
    assert_one_line_error(refused, f"{stats}: lacks statistics soft_counts (profiled --for reap;")
    merge = ["merge", str(folder), "--stats", str(stats), "--keep", "2", "--out", str(tmp_path / "merged")]
    assert_one_line_error(runner.invoke(app, merge), "lacks logit_gram, which --method uncurl needs")
    assert "--for reap" in runner.invoke(app, merge).output
    assert not (tmp_path / "merged").exists() and not (tmp_path / "s.json").exists()


def test_unknown_for_name_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["profile", "--out", str(tmp_path / "x.npz"), "--for", "reap,reapp"])
    assert_one_line_error(result, "unknown --for name 'reapp' (did you mean 'reap'?)")
    assert not list(tmp_path.iterdir())
