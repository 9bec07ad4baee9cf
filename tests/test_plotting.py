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
