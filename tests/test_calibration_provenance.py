"""Statistics' provenance read back as calibration windows (`stages.calibration`, review items 4 and 10).

Hostile provenance values are one line naming the statistics file and the field (not "unexpected
TypeError ... a bug"); a data file changed to the same number of windows is refused by the recorded hash,
which equals the hash of the windows built independently of the stage (`test_profile.windows_of`).
"""

from __future__ import annotations

import pytest
from test_profile import settings, windows_of, write_docs
from typer.testing import CliRunner

from moe_prune.artifacts.provenance import hash_tokens
from moe_prune.artifacts.stats import Stats
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.specs.merge import MergeSpec
from moe_prune.stages import merge
from moe_prune.stages import profile as profile_stage

runner = CliRunner()

HOSTILE = [
    ({"shard": 3}, "s.npz: provenance shard must be a list, not an integer"),
    ({"shard": [0, 1, 2]}, "s.npz: provenance shard must be [i, n], not a list of 3"),
    ({"shard": [1, 1]}, r"s.npz: its provenance records settings profile refuses \(shard 1/1"),
    ({"seq_len": "abc"}, "s.npz: provenance seq_len must be an integer, not a string 'abc'"),
    ({"seq_len": True}, "s.npz: provenance seq_len must be an integer, not a boolean"),
    ({"seed": "x"}, "s.npz: provenance seed must be an integer, not a string 'x'"),
    ({"seed": 2**40}, "s.npz: provenance seed must be at most 2147483647"),
    ({"data": ["a.txt", 3]}, "s.npz: provenance data must list sources as strings, not an integer"),
    ({"data": []}, "s.npz: provenance data lists no source"),
    ({"samples": 0}, "s.npz: provenance samples must be at least 1, not 0"),
    ({"batch_size": 2.5}, "s.npz: provenance batch_size must be an integer, not a number"),
    ({"dtype": 16}, "s.npz: provenance dtype must be a string, not an integer"),
    ({"dtype": "float7"}, "s.npz: its provenance records settings profile refuses"),
    ({"sequences": "many"}, "s.npz: provenance sequences must be an integer"),
    ({"windows_sha256": 5}, "s.npz: provenance windows_sha256 must be a string, not an integer"),
]


@pytest.fixture
def profiled(tiny, tmp_path):
    folder = tiny("mixtral")
    write_docs(tmp_path / "cal.jsonl", 6, seed=2)
    return folder, profile_stage.run(folder, str(tmp_path / "cal.jsonl"), settings()).stats


@pytest.mark.parametrize(("edit", "message"), HOSTILE, ids=[next(iter(e)) + repr(e)[-6:] for e, _ in HOSTILE])
def test_hostile_provenance_is_one_line_naming_the_file_and_field(profiled, tmp_path, edit, message):
    folder, stats = profiled
    edited = Stats(stats.identity, stats.arrays, {**stats.provenance, **edit})
    with pytest.raises(MoePruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        merge.run(folder, edited, tmp_path / "out", 3, MergeSpec(refit=True), stats_name="s.npz")
    assert not (tmp_path / "out").exists()


def test_cli_hostile_provenance_exits_1_with_one_line(profiled, tmp_path):
    folder, stats = profiled
    Stats(stats.identity, stats.arrays, {**stats.provenance, "shard": 3}).save(tmp_path / "s.npz")
    args = ["merge", str(folder), "-s", str(tmp_path / "s.npz"), "-k", "3", "-o", str(tmp_path / "out"), "--refit"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "Traceback" not in result.output and "bug" not in result.output
    assert "provenance shard must be a list, not an integer" in result.output


def test_same_number_of_other_windows_is_refused_by_their_hash(profiled, tmp_path):
    """The recorded hash is the hash of the windows built independently; rewriting the data with as many
    windows of other text is refused (the count check alone passed it)."""
    folder, stats = profiled
    assert stats.provenance["windows_sha256"] == hash_tokens(windows_of(tmp_path / "cal.jsonl", folder))
    write_docs(tmp_path / "cal.jsonl", 6, seed=5)
    with pytest.raises(MoePruneError, match=r"other tokens than the 6 windows .* \(windows_sha256 differs\)"):
        merge.run(folder, stats, tmp_path / "out", 3, MergeSpec(refit=True))
    assert not (tmp_path / "out").exists()
