"""Build supervised finetuning data for demo tasks: prompt/completion records from new seeded documents.

The prompt is the task's question as lm-eval renders it (`context`); the completion is the gold answer
after the task's target delimiter (" 27" for arithmetic, "Tokyo" for records), i.e. exactly the text
whose log-likelihood `eval --tasks` compares against the distractors. Items come from the task's own
generator in `build_demo_tasks.py` over the world the demo model learned, drawn with a seed of their own
(neither the train nor the test seed); an item whose context is also in the task's shipped train or test
split is skipped, so the evaluated questions are never trained on. `moe-prune finetune --format completion`
reads the output.

    python scripts/build_demo_sft.py     # rewrites moe_prune/demo/data/sft_records.jsonl, sft_arithmetic.jsonl
    python scripts/build_demo_sft.py --task records --items 100 --out /tmp/records_sft.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_demo_tasks as tasks
import demo_corpus as dc

SFT_SEED = 303  # build_demo_tasks.SPLIT_SEEDS uses 101 (train) and 202 (test)
ITEMS = 400
SHIPPED = ("records", "arithmetic")
ROOT = Path(__file__).resolve().parent.parent / "moe_prune" / "demo"
DATA = ROOT / "data"


def delimiter(task: str) -> str:
    """The task's `target_delimiter`, read from its YAML (what lm-eval puts between prompt and answer)."""
    text = (ROOT / "tasks" / f"demo_{task}.yaml").read_text(encoding="utf-8")
    found = re.search(r'^target_delimiter: "(.*)"$', text, re.MULTILINE)
    if found is None:
        raise SystemExit(f"demo_{task}.yaml: no target_delimiter")
    return found.group(1)


def shipped_contexts(task: str) -> set[str]:
    """Contexts of the task's shipped train and test splits: never trained on."""
    out = set()
    for split in tasks.SPLIT_SEEDS:
        for line in (tasks.OUT / f"{task}_{split}.jsonl").read_text(encoding="utf-8").splitlines():
            out.add(json.loads(line)["context"])
    return out


def answer(item: dict[str, Any]) -> str:
    """The gold answer: the right choice of a multiple-choice item, the target of a generation item."""
    return item["choices"][item["gold"]] if "choices" in item else item["target"]


def build(task: str, items: int) -> list[dict[str, str]]:
    """`items` prompt/completion records of `task`, seeded, unique, none from the shipped splits."""
    world = dc.make_world(random.Random(tasks.TRAINING_SEED))
    make = tasks.TASKS[task]
    rng = random.Random(SFT_SEED * 100 + list(tasks.TASKS).index(task))
    excluded = shipped_contexts(task)
    sep = delimiter(task)
    out: list[dict[str, str]] = []
    while len(out) < items:
        item = make(rng, world)
        if item is None or item["context"] in excluded:
            continue
        excluded.add(item["context"])
        out.append({"prompt": item["context"], "completion": sep + answer(item)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(tasks.TASKS), action="append", help="default: records and arithmetic")
    p.add_argument("--items", type=int, default=ITEMS)
    p.add_argument("--out", type=Path, help="output file (one --task only; default DATA/sft_<task>.jsonl)")
    args = p.parse_args()
    chosen = args.task or list(SHIPPED)
    if args.out is not None and len(chosen) != 1:
        p.error("--out needs exactly one --task")
    for task in chosen:
        path = args.out or DATA / f"sft_{task}.jsonl"
        records = build(task, args.items)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{path}: {len(records)} records")


if __name__ == "__main__":
    main()
