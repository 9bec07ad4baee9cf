"""`--plot` without matplotlib installed: a one-line error saying how to get it, not an ImportError."""

from __future__ import annotations

import sys

import pytest

from moe_prune.errors import MoePruneError
from moe_prune.plotting import pyplot


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(MoePruneError, match=r"pip install 'moe-prune\[plot\]'"):
        pyplot()


def test_pyplot_draws_to_files_only():
    plt = pyplot()
    assert plt.get_backend().lower() == "agg"


def test_check_plot_refuses_before_any_work(tmp_path):
    from moe_prune.plotting import check_plot

    check_plot(None, force=False)
    with pytest.raises(MoePruneError, match=r"give a \.png file name"):
        check_plot(tmp_path / "a.jpg", force=False)
    existing = tmp_path / "a.png"
    existing.write_bytes(b"keep me")
    with pytest.raises(MoePruneError, match="already exists; pass --force"):
        check_plot(existing, force=False)
    check_plot(existing, force=True)
    given = tmp_path / "model.png"  # an input that happens to carry the name
    given.write_bytes(b"an input")
    with pytest.raises(MoePruneError, match="is, holds or lies inside the input"):
        check_plot(given, force=True, inputs=(given,))
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(MoePruneError, match="is a folder, not a file"):  # never replaced, even with --force
        check_plot(tmp_path / "dir.png", force=True)
    assert existing.read_bytes() == b"keep me"


def test_save_figure_is_atomic_and_respects_force(tmp_path):
    from moe_prune.plotting import save_figure

    plt = pyplot()
    path = tmp_path / "p.png"
    save_figure(plt.figure(), path, force=False)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = path.read_bytes()
    with pytest.raises(MoePruneError, match="already exists"):
        save_figure(plt.figure(), path, force=False)
    assert path.read_bytes() == first
    fig = plt.figure(figsize=(2, 2))
    save_figure(fig, path, force=True)
    assert path.read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    assert not plt.get_fignums()  # every figure closed, written or refused
