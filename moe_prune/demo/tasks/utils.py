"""Data loader of the demo tasks: reads the shipped JSONL next to this file, so no network is ever needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

DATA = Path(__file__).parent / "data"


def load(task: str, **_: Any) -> DatasetDict:
    """`train` (few-shot examples) and `test` (evaluated) splits of one demo task."""
    splits = {}
    for split in ("train", "test"):
        lines = (DATA / f"{task}_{split}.jsonl").read_text(encoding="utf-8").splitlines()
        splits[split] = Dataset.from_list([json.loads(line) for line in lines if line])
    return DatasetDict(splits)
