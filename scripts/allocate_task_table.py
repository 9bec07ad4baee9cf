"""Demo held-out perplexity and task accuracy of uniform, global and searched allocations (issue #23's table).

    python scripts/allocate_task_table.py [WORKDIR] [RATIO ...]

The README's `allocate` protocol: statistics from `profile --samples 32 --seq-len 256`; per criterion
(soft-counts, activation-norm, reap) and ratio (default 0.25 and 0.75): uniform = `score -c C --ratio R`,
searched = `allocate -c C --ratio R` (its defaults: KL, 16 windows, 64 candidates, seed 0), global = the
search's global start (soft-counts' `score --global`; another criterion's order inside soft-counts' global
counts, as `allocate` starts from); each `prune`d, then `eval`: perplexity on the first 8,192 held-out tokens
(seq 256) and mean `acc` of four demo tasks, 40 documents each. Identical masks are evaluated once.
WORKDIR (default: a temporary folder) keeps every mask, checkpoint and JSON result; a rerun skips them.
Runs the `moe-prune` of this interpreter (`python -m moe_prune`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TASKS = ["demo_arithmetic", "demo_translation", "demo_records", "demo_narrative"]
CRITERIA = ("soft-counts", "activation-norm", "reap")
EVAL = ["--max-tokens", "8192", "--seq-len", "256", "--batch-size", "16", "--limit", "40"]


def cli(*args: str | Path, json_out: Path | None = None) -> None:
    """One `moe-prune` command; with `json_out`, its --json document is saved there."""
    words = [sys.executable, "-m", "moe_prune", *map(str, args)]
    result = subprocess.run(words, check=True, capture_output=True, text=True)
    if json_out is not None:
        json_out.write_text(result.stdout)


def global_start(stats: Path, criterion: str, counts: list[int], out: Path) -> None:
    """The mask of `allocate`'s global start: `criterion`'s order inside each layer, the global counts."""
    from moe_prune.allocation import plan
    from moe_prune.artifacts.mask import DropMask
    from moe_prune.artifacts.stats import Stats
    from moe_prune.checkpoint.source import Checkpoint
    from moe_prune.demo import DEMO_MODEL_DIR
    from moe_prune.scoring import get_criterion
    from moe_prune.scoring.registry import Inputs, evaluate

    loaded, crit = Stats.load(stats), get_criterion(criterion)
    config = Checkpoint.open(DEMO_MODEL_DIR).config
    numbers = tuple(config.moe_layers)
    layers = plan.Layers(
        numbers,
        tuple(config.experts_in_layer(n) for n in numbers),
        tuple(config.top_k_in_layer(n) for n in numbers),
        (True,) * len(numbers),
        config.n_group,
    )
    table = plan.DropTable(layers, crit.direction, *evaluate(crit, Inputs(loaded.identity, loaded, None, 0, 2048)))
    ids = loaded.identity.original_ids
    drops = table.drops(tuple(counts))
    keep = {n: [e for s, e in enumerate(ids[n]) if s not in set(d)] for n, d in zip(numbers, drops, strict=True)}
    out.write_text(DropMask.create(loaded.identity, keep, criterion).dumps())


def masks(work: Path, stats: Path, criterion: str, ratio: float) -> dict[str, Path]:
    """uniform, global and searched masks of `criterion` at `ratio` (made once)."""
    tag = f"{criterion}-{ratio:g}"
    found = {name: work / f"{tag}.{name}.json" for name in ("uniform", "global", "searched")}
    if not found["uniform"].exists():
        cli("score", stats, "-c", criterion, "--ratio", ratio, "--out", found["uniform"])
    report = work / f"{tag}.allocate.json"
    if not found["searched"].exists():
        cli("allocate", "--stats", stats, "-c", criterion, "--ratio", ratio, "--json", "--out", found["searched"],
            json_out=report)  # fmt: skip
    if not found["global"].exists():
        global_start(stats, criterion, json.loads(report.read_text())["counts"]["global"], found["global"])
    return found


def measured(work: Path, mask: Path | None) -> dict[str, float]:
    """Perplexity and mean task accuracy of the pruned model (or the original), cached by mask content."""
    key = (
        "original"
        if mask is None
        else hashlib.sha256(
            json.dumps({k: v["keep"] for k, v in json.loads(mask.read_text())["layers"].items()}).encode()
        ).hexdigest()[:12]
    )
    out = work / f"eval-{key}.json"
    if not out.exists():
        where: list[str | Path] = []
        if mask is not None:
            folder = work / f"model-{key}"
            if not folder.exists():
                cli("prune", "--mask", mask, "--out", folder)
            where = [folder]
        cli("eval", *where, "--tasks", ",".join(TASKS), *EVAL, "--json", json_out=out)
    doc = json.loads(out.read_text())
    results = doc["tasks"]["model"]["results"]
    accuracy = sum(results[t]["acc,none"] for t in TASKS) / len(TASKS)
    return {"perplexity": doc["model"]["perplexity"], "accuracy": accuracy}


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="allocate-tasks-"))
    ratios = [float(r) for r in sys.argv[2:]] or [0.25, 0.75]
    work.mkdir(parents=True, exist_ok=True)
    stats = work / "demo.npz"
    if not stats.exists():
        cli("profile", "--out", stats, "--samples", "32", "--seq-len", "256")
    original = measured(work, None)
    print(f"| (original) | 0% | {original['perplexity']:.3f} / {original['accuracy']:.1%} | | |")
    print("| criterion | drop | uniform (ppl / acc) | global | searched |")
    print("|---|---|---:|---:|---:|")
    for ratio in ratios:
        for criterion in CRITERIA:
            cells = [measured(work, path) for path in masks(work, stats, criterion, ratio).values()]
            text = " | ".join(f"{c['perplexity']:.3f} / {c['accuracy']:.1%}" for c in cells)
            print(f"| {criterion} | {ratio:.0%} | {text} |", flush=True)


if __name__ == "__main__":
    main()
