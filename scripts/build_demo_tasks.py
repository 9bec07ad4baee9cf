"""Build the offline lm-eval task suite of the demo model (`moe_prune/demo/tasks/`).

Every item comes from a document the corpus generator (`demo_corpus.py`) draws with a seed other than
the training seed, over the SAME world (registry people, KL lexicon) the demo model memorised: the
facts are the ones it learned, the documents are new (any generated document that also occurs in the
training corpus is skipped). Each task has a `train` split (few-shot examples, and calibration text
for task-aware profiling) and a `test` split (what is evaluated), drawn from different seeds.

    python scripts/build_demo_tasks.py            # rewrites moe_prune/demo/tasks/data/*.jsonl

Tasks (multiple choice unless stated; chance 25% unless stated):
* demo_arithmetic: a worksheet's next line `a op b =`, the right result against 3 close distractors (±1, ±2, ±10).
* demo_translation: an English sentence; its KL translation against 3 with one word swapped for another KL word.
* demo_records: a CSV row `id,First Last,`; the person's city (a registry fact) against 3 other cities.
* demo_narrative: a story and the opening of one more sentence; the word class that fits (a place, an animal or
  an object) against one word of each other class (chance 33%).
* demo_arithmetic_gen: generation, the result of a worksheet's next line `a op b =`, exact match (chance ~0).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import demo_corpus as dc

TRAINING_SEED = 0  # scripts/build_demo.py --seed: the world the demo model learned
TRAINING_DOCS_PER_DOMAIN = 6000  # scripts/build_demo.py --n-docs-per-domain
SPLIT_SEEDS = {"train": 101, "test": 202}
SPLIT_SIZES = {"train": 50, "test": 200}
OUT = Path(__file__).resolve().parent.parent / "moe_prune" / "demo" / "tasks" / "data"

Item = dict[str, Any]


def _shuffle_choices(rng: random.Random, right: str, wrong: list[str]) -> tuple[list[str], int]:
    choices = [right, *wrong]
    rng.shuffle(choices)
    return choices, choices.index(right)


def arithmetic(rng: random.Random, world: dc.World) -> Item | None:
    """Context: a worksheet up to `a op b =`; choices: the result and three close wrong ones."""
    lines = dc._arithmetic(rng).split("\n")
    *before, last = lines
    question, answer = last.rsplit(" = ", 1)
    result = int(answer)
    wrong = sorted({result + d for d in (-10, -2, -1, 1, 2, 10)} - {result})
    wrong = [w for w in wrong if w >= 0]
    choices, gold = _shuffle_choices(rng, str(result), [str(w) for w in rng.sample(wrong, 3)])
    return {"context": "\n".join([*before, question + " ="]), "choices": choices, "gold": gold, "source": lines}


def _kl_words(world: dc.World) -> list[str]:
    return sorted(set(world.lexicon.values()))


def translation(rng: random.Random, world: dc.World) -> Item | None:
    """Context: earlier pairs, then `EN: ...\\nKL:`; choices: the KL sentence and three one-word corruptions."""
    pairs = [dc._kl_sentence(rng, world.lexicon) for _ in range(rng.randint(1, 3))]
    *before, (en, kl) = pairs
    words = kl[:-1].split(" ")  # drop the final '.', keep 'vo'
    kl_words = _kl_words(world)
    wrong: set[str] = set()
    while len(wrong) < 3:
        position = rng.randrange(len(words) - 1)  # never the 'vo' particle
        word = words[position]
        stem, dash, suffix = word.partition("-")
        tense = next((t for t in dc._KL_TENSE.values() if not dash and stem.lower().endswith(t)), "")
        bare = stem[: len(stem) - len(tense)] if tense else stem
        swap = rng.choice([w for w in kl_words if w != bare.lower()])
        swap = swap.capitalize() if bare[0].isupper() else swap
        corrupted = list(words)
        corrupted[position] = f"{swap}{tense}{dash}{suffix}"
        wrong.add(" ".join(corrupted) + ".")
    choices, gold = _shuffle_choices(rng, kl, sorted(wrong))
    context = "\n".join([*(f"EN: {e}\nKL: {k}" for e, k in before), f"EN: {en}\nKL:"])
    return {"context": context, "choices": choices, "gold": gold, "target": kl}


def records(rng: random.Random, world: dc.World) -> Item | None:
    """Context: a CSV table up to `id,First Last,`; choices: the person's city and three others."""
    start, n = rng.randint(1000, 9000), rng.randint(1, 5)
    names = rng.sample(sorted(world.people), n)
    lines = ["id,name,city,age,active"]
    lines += [f"{start + i},{nm},{','.join(map(str, world.people[nm]))}" for i, nm in enumerate(names[:-1])]
    city = world.people[names[-1]][0]
    lines.append(f"{start + n - 1},{names[-1]},")
    others = rng.sample([c for c in dc._CITIES if c != city], 3)
    choices, gold = _shuffle_choices(rng, city, others)
    return {"context": "\n".join(lines), "choices": choices, "gold": gold}


# Sentence openings (from the corpus templates) and the word class that must come next.
_OPENINGS = [
    ("{name} walked to the", "place"),
    ("{name} walked to the {place} and saw a {adj}", "animal"),
    ("{time}, {name} found a {adj}", "object"),
    ("{name} gave the", "object"),
    ("{name} gave the {obj} to the", "animal"),
    ("The {adj} {animal} was sitting near the", "place"),
]
_CLASSES = {"place": dc._PLACES, "animal": dc._ANIMALS, "object": dc._OBJECTS}


def narrative(rng: random.Random, world: dc.World) -> Item | None:
    """Context: a story and the opening of one more sentence; choices: one word of each class (place/animal/object)."""
    slots = {
        "name": rng.choice(dc._NAMES),
        "animal": rng.choice(dc._ANIMALS),
        "adj": rng.choice(dc._ADJS),
        "place": rng.choice(dc._PLACES),
        "obj": rng.choice(dc._OBJECTS),
        "time": rng.choice(dc._TIMES),
    }
    story = dc._narrative(rng)
    opening, word_class = rng.choice(_OPENINGS)
    words = {c: rng.choice(ws) for c, ws in _CLASSES.items()}
    choices, gold = _shuffle_choices(rng, words[word_class], [w for c, w in words.items() if c != word_class])
    return {"context": f"{story} {opening.format(**slots)}", "choices": choices, "gold": gold}


def arithmetic_gen(rng: random.Random, world: dc.World) -> Item | None:
    """Context: a worksheet up to `a op b =`; the target is the result (exact match)."""
    lines = dc._arithmetic(rng).split("\n")
    *before, last = lines
    question, answer = last.rsplit(" = ", 1)
    return {"context": "\n".join([*before, question + " ="]), "target": answer, "source": lines}


TASKS: dict[str, Callable[[random.Random, dc.World], Item | None]] = {
    "arithmetic": arithmetic,
    "translation": translation,
    "records": records,
    "narrative": narrative,
    "arithmetic_gen": arithmetic_gen,
}


def training_texts() -> set[str]:
    """Every document the demo model could have trained on (the whole seed-0 corpus)."""
    return {d["text"] for d in dc.generate_corpus(TRAINING_SEED, TRAINING_DOCS_PER_DOMAIN)}


def build(seen: set[str]) -> dict[str, dict[str, list[Item]]]:
    """task -> split -> items; each task/split its own seeded stream, items unique within the task."""
    world = dc.make_world(random.Random(TRAINING_SEED))
    out: dict[str, dict[str, list[Item]]] = {}
    for t, (task, make) in enumerate(TASKS.items()):
        used: set[str] = set()
        out[task] = {}
        for split, seed in SPLIT_SEEDS.items():
            rng = random.Random(seed * 100 + t)
            items: list[Item] = []
            while len(items) < SPLIT_SIZES[split]:
                item = make(rng, world)
                if item is None or item["context"] in used:
                    continue
                if "\n".join(item.pop("source", [])) in seen:  # a worksheet the model trained on
                    continue
                used.add(item["context"])
                items.append(item)
            out[task][split] = items
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for task, splits in build(training_texts()).items():
        for split, items in splits.items():
            path = args.out / f"{task}_{split}.jsonl"
            path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
            print(f"{path}: {len(items)} items")


if __name__ == "__main__":
    main()
