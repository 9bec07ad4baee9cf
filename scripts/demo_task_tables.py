"""Reproduce the README's task tables on the demo model: every number comes from the `moe-prune` CLI.

    python scripts/demo_task_tables.py [WORKDIR]

Runs `profile` (generic calibration split, and each task's own training split), `score`/`prune` or
`merge` at 25% and 50% of the experts dropped, and `eval --tasks`; prints Markdown tables. WORKDIR
(default: a temporary folder) keeps every mask, checkpoint and JSON result, so a rerun skips what is there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

TASKS = ["demo_arithmetic", "demo_translation", "demo_records", "demo_narrative", "demo_arithmetic_gen"]
RATIOS = (0.25, 0.5)
EXPERTS = 8  # the demo model's experts per layer
CRITERION = "soft-counts"
SEEDS = (0, 1, 2)
PROFILE = ["--samples", "64", "--seq-len", "256"]


def cli(*args: str | Path) -> None:
    subprocess.run(["moe-prune", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def accuracies(model: Path | None, tasks: list[str], out: Path) -> dict[str, float]:
    """Each task's accuracy (exact match for the generation task), cached in `out`."""
    if not out.exists():
        where = [str(model)] if model else []
        result = subprocess.run(
            ["moe-prune", "eval", *where, "--tasks", ",".join(tasks), "--no-perplexity", "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        out.write_text(result.stdout)
    results = json.loads(out.read_text())["tasks"]["model"]["results"]
    return {t: results[t].get("acc,none", results[t].get("exact_match,strip")) for t in tasks}


def pruned(work: Path, name: str, stats: Path, ratio: float, *score_args: str) -> Path:
    """Checkpoint with `ratio` of the experts dropped by `score` on `stats` (built once)."""
    folder = work / name
    if not folder.exists():
        mask = work / f"{name}.mask.json"
        cli("score", stats, "--ratio", ratio, "--out", mask, "--force", *score_args)
        cli("prune", "--mask", mask, "--out", folder)
    return folder


def merged(work: Path, stats: Path, ratio: float) -> Path:
    keep = round(EXPERTS * (1 - ratio))
    folder = work / f"merge-{keep}"
    if not folder.exists():
        cli("merge", "--stats", stats, "--keep", keep, "--out", folder)
    return folder


def row(label: str, values: list[dict[str, float]], tasks: list[str]) -> str:
    means = [sum(v[t] for v in values) / len(values) for t in tasks]
    return f"| {label} | " + " | ".join(f"{m:.3f}" for m in means) + " |"


def generic_table(work: Path, stats: Path) -> list[str]:
    lines = ["| model | " + " | ".join(t.removeprefix("demo_") for t in TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
    lines.append(row("original", [accuracies(None, TASKS, work / "original.tasks.json")], TASKS))
    for ratio in RATIOS:
        pct = f"{round(ratio * 100)}%"
        runs = {
            f"{CRITERION}, {pct} dropped": [("layer", ("-c", CRITERION))],
            f"{CRITERION} --global, {pct} dropped": [("global", ("-c", CRITERION, "--global"))],
            f"random, {pct} dropped (mean of {len(SEEDS)})": [
                (f"random{s}", ("-c", "random", "--seed", str(s))) for s in SEEDS
            ],
        }
        for label, variants in runs.items():
            values = []
            for tag, args in variants:
                model = pruned(work, f"{tag}-{ratio}", stats, ratio, *args)
                values.append(accuracies(model, TASKS, work / f"{tag}-{ratio}.tasks.json"))
            lines.append(row(label, values, TASKS))
        model = merged(work, stats, ratio)
        lines.append(
            row(
                f"merge (uncurl) to {round(EXPERTS * (1 - ratio))}",
                [accuracies(model, TASKS, work / f"merge-{ratio}.tasks.json")],
                TASKS,
            )
        )
    return lines


def task_aware_table(work: Path, generic: Path, ratio: float = 0.5) -> list[str]:
    """Per task: pruned with that task's statistics vs the generic calibration split vs random masks."""
    lines = [
        "| task | original | task statistics | generic statistics | random (mean of 3) |",
        "|---|---:|---:|---:|---:|",
    ]
    original = accuracies(None, TASKS, work / "original.tasks.json")
    generic_acc = accuracies(work / f"layer-{ratio}", TASKS, work / f"layer-{ratio}.tasks.json")
    randoms = [accuracies(work / f"random{s}-{ratio}", TASKS, work / f"random{s}-{ratio}.tasks.json") for s in SEEDS]
    for task in TASKS:
        stats = work / f"{task}.npz"
        if not stats.exists():
            cli("profile", "--task", task, "--out", stats, *PROFILE)
        model = pruned(work, f"{task}-{ratio}", stats, ratio, "-c", CRITERION)
        own = accuracies(model, [task], work / f"{task}-{ratio}.tasks.json")[task]
        floor = sum(r[task] for r in randoms) / len(randoms)
        lines.append(f"| {task} | {original[task]:.3f} | {own:.3f} | {generic_acc[task]:.3f} | {floor:.3f} |")
    return lines


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="demo-tasks-"))
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "generic.npz"
    if not stats.exists():
        cli("profile", "--out", stats, *PROFILE)
    print("\n".join(generic_table(work, stats)))
    print()
    print("\n".join(task_aware_table(work, stats)))


if __name__ == "__main__":
    main()
