"""Tiny trained Mixtral-style demo MoE shipped with moe-prune, plus its data.

Lets users and tests try pruning/merging offline: a 4-layer, 8-expert, top-2
model trained on a synthetic six-domain corpus (see `scripts/demo_corpus.py`),
rebuilt reproducibly by ``scripts/build_demo.py``.
"""

from pathlib import Path

DEMO_DIR: Path = Path(__file__).parent
DEMO_MODEL_DIR: Path = DEMO_DIR / "model"
DEMO_DATA_DIR: Path = DEMO_DIR / "data"
DEMO_CALIBRATION: Path = DEMO_DATA_DIR / "calibration.jsonl"
DEMO_HELDOUT: Path = DEMO_DATA_DIR / "heldout.jsonl"
DEMO_ALIAS = "demo"  # names the shipped demo model wherever a model is asked for

__all__ = ["DEMO_ALIAS", "DEMO_CALIBRATION", "DEMO_DATA_DIR", "DEMO_DIR", "DEMO_HELDOUT", "DEMO_MODEL_DIR"]
