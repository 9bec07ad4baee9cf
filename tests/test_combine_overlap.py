"""`profile --combine` refuses inputs that count the same calibration windows twice (stages/profile.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_profile import settings, write_docs

from moe_prune.errors import MoePruneError
from moe_prune.stages import profile as stage


@pytest.fixture(scope="module")
def parts(tiny, tmp_path_factory):
    """Two profiles of the same windows at batch sizes 1 and 3, and one of other windows (another seed)."""
    root = tmp_path_factory.mktemp("overlap")
    data = root / "cal.jsonl"
    write_docs(data, 6, seed=7)
    folder = tiny("mixtral")
    paths = {}
    for name, options in (("b1", {"batch_size": 1}), ("b3", {"batch_size": 3}), ("other", {"samples": 3, "seed": 9})):
        paths[name] = root / f"{name}.npz"
        stage.run(folder, str(data), settings(**options)).stats.save(paths[name])
    return paths


def test_the_same_windows_at_another_batch_size_are_refused(parts):
    with pytest.raises(MoePruneError, match="counts the same calibration windows as"):
        stage.combine([parts["b1"], parts["b3"]])


def test_one_combined_file_named_twice_is_refused_however_its_path_is_written(parts, tmp_path, monkeypatch):
    combined = tmp_path / "c.npz"
    stage.combine([parts["b1"], parts["other"]]).save(combined)  # lists its sources: no window fields of its own
    link = tmp_path / "link.npz"
    link.symlink_to(combined)
    monkeypatch.chdir(tmp_path)
    for second in (link, Path("c.npz"), Path("..") / tmp_path.name / "c.npz"):
        with pytest.raises(MoePruneError, match="counts the same calibration windows as"):
            stage.combine([combined, second])
