"""Shared fixtures: tiny random checkpoints of every family, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tiny_models import build_tiny

_CACHE: dict[str, tuple[Path, object]] = {}


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """`tiny_factory(model_type)` -> (folder, model in eval mode), saved once per session."""

    def make(model_type: str):
        if model_type not in _CACHE:
            folder = tmp_path_factory.mktemp(model_type) / "model"
            _CACHE[model_type] = (folder, build_tiny(model_type, folder))
        return _CACHE[model_type]

    return make
