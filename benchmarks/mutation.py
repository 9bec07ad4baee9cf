"""Mutation run (mutmut) over chosen modules with chosen tests: how many small code changes the tests catch.

    nice -n 19 python -m benchmarks.mutation                  # shares.py, sources.py, refit.py; their fast tests
    nice -n 19 python -m benchmarks.mutation --json out.json  # also the counts and survivors as JSON
    nice -n 19 python -m benchmarks.mutation --workers 1 --modules 'moe_prune/scoring/*' \
        --tests tests/test_score.py tests/test_reap.py tests/test_score_stability.py tests/test_selection_parts.py \
        tests/test_stability_parts.py tests/test_registry_parts.py \
        --deselect tests/test_score.py::test_random_needs_only_the_model --sample 200 --seed 22
    nice -n 19 python -m benchmarks.mutation --workers 1 --modules 'moe_prune/checkpoint/*' \
        --tests tests/test_prune.py tests/test_safetensors_io.py tests/test_bounded_json.py tests/test_quantized.py \
        tests/test_ragged.py tests/test_aux_loss.py tests/test_router_tail.py tests/test_mtp.py \
        --deselect tests/test_bounded_json.py::test_the_header_limit_is_safetensors_own \
        tests/test_quantized.py::test_cli_runs_release_shaped_fp8_with_default_options \
        'tests/test_quantized.py::test_read_float_equals_independent_dequantization[gpt_oss]' \
        tests/test_ragged.py::test_loads_without_moe_prune_in_a_fresh_process \
        tests/test_aux_loss.py::test_aux_loss_weight_evens_out_expert_use \
        tests/test_mtp.py::test_prune_gives_mtp_the_last_layers_experts \
        tests/test_mtp.py::test_merge_applies_the_last_layers_plan_to_mtp --sample 100 --seed 22

The slow lane of issue #22 (tens of minutes on 2 cores, so not part of `pytest`). mutmut (a maintained
tool, pinned in constraints.txt) changes one token at a time (a `<` into `<=`, a `+ 1` into `+ 2`, a string,
a default) and runs the tests that reach the changed function; a mutant no test fails on "survived". The
work tree's files are copied to a temporary folder, `[tool.mutmut]` is appended to the copy's pyproject.toml
and mutmut runs there: mutmut writes its `mutants/` tree beside the code, and the work tree is never
touched. Printed: killed / survived / no tests per file and per `--modules` pattern, the score killed /
(killed + survived + timeout) over the mutants the selected tests reach, and every survivor with its diff line.
The deselected tests above each take 10-110 s (a survivor runs every test that reaches its function).

`--sample N --seed S`: checkpoint/ and scoring/ have too many mutants for 2 cores, so N are drawn uniformly
(`random.Random(S).sample` over the sorted names of every mutant of the listed modules; mutmut has no
"generate only" command, so a run filtered to a name no mutant has generates them first) and only those
run; the score is printed with its 95% Wilson interval and the population size. Mutants in code that runs
at import (registration decorators) survive by construction: mutmut switches mutants at call time.

Recorded 2026-12-07 (mutmut 3.8.1, 2 CPU cores shared with 3 other sessions, load 7-13, one worker, nice 19):
- runtime/shares.py + runtime/sources.py, every mutant (467), tests test_share_rounding, test_data_mix,
  test_finetune_mix: 11.4 mutants a minute; 374 killed, 93 survived: 0.801. With the tests written for the
  survivors (test_take_windows, test_mix_parts) the 93 were run again: 60 killed, 1 timeout (the
  `rest += unit` loop never ends), 32 survive. Now 434 killed + 1 timeout of 467: 0.929 (0.931 counting the
  timeout). The 32: 28 equivalent (21 `zip(strict=...)` on lists of one length by construction, 2 `sum`
  without its `Fraction(0)` start, `if weights or True`, an `even` share no source uses, `rest >= 0` /
  `rest > 1` where a total of 0 or 1 token always fits, `windows < needed` where equal counts draw every
  window) and 4 that read more tokens ahead of a seeded draw (`pool`, `max_tokens`: `token_stream` stops only
  between batches of 256 documents for slow tokenizers, so no test pins the pool).
- scoring/ (892 mutants), a uniform sample of 200 (seed 22), tests as above without the *_parts files:
  24.6 mutants a minute; 142 killed, 58 survived: 0.710 [95%: 0.644-0.768].
  Survivors by file: stability.py 24 of 86, selection.py 18 of 70, registry.py 11 of 24, linalg.py 4 of 15,
  routing.py 1 of 1, weights.py 0 of 4. The 17 the new *_parts tests aim at were run again: 16 killed
  (`reshape(-2)` is equivalent: numpy takes any negative size as the unknown one), so the sample now scores
  158 / 200 = 0.790 [95%: 0.728-0.841].
- checkpoint/ (3228 mutants), a uniform sample of 100 (seed 22), tests as in the command above: 7.2 mutants a
  minute after 10 minutes of generating, collecting and clean runs; 86 killed, 12 survived, 2 without tests:
  0.878 [95%: 0.798-0.929]. Survivors: quantized.py 5 of 17, modeling_moe_prune.py 3 of 4 reached,
  expert_weights.py 2 of 5, validate.py 1 of 10, relayout.py 1 of 1.
- merging/refit.py: not run again (2026-12-06: 86 of 124 killed); tests/test_refit_solve.py kills the
  named survivors by hand-applied sabotage (ridge sign/scale, never-fired refusal, bias refusal, clamp).
The survivors are listed in the CHANGELOG entry of issue #22.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The share arithmetic of the 2026-12-06 run below (`_largest_remainder`, `allocate`, `_weights`, `parse_sources`)
# now lives in runtime/shares.py (as `largest_remainder`, `share_weights`); mixing stays in runtime/sources.py.
MODULES = ("moe_prune/runtime/shares.py", "moe_prune/runtime/sources.py", "moe_prune/merging/refit.py")
# The fast tests that guard the modules (mutmut runs, per mutant, those of them that reach the changed
# function). Tests that build and run the demo model are left out: with them the run checked ~5 mutants a
# minute on 2 busy cores, without them ~20.
TESTS = (
    "tests/test_share_rounding.py",
    "tests/test_data_mix.py::test_spec_parsing",
    "tests/test_data_mix.py::test_allocation_is_exact_and_adds_up",
    "tests/test_data_mix.py::test_bad_data_is_one_line_and_writes_nothing",
    "tests/test_merge_methods.py::test_least_squares_down_solves_the_normal_equations",
    "tests/test_refit_pass.py::test_auto_ridge_equals_a_float64_held_out_selection",
    "tests/test_refit_pass.py::test_spilled_downs_read_back_float32",
    "tests/test_refit_pass.py::test_range_check_refuses_what_fp16_cannot_hold",
    "tests/test_refit_pass.py::test_refusals_before_writing",
)
STATUS = re.compile(r"^\s*(?P<name>\S+): (?P<status>.+)$")
# mutmut 3 has no "generate only" command: a run filtered to a name no mutant has generates every mutant and
# records which tests reach which function, then stops on its "nothing matches" assertion.
NO_MUTANT = "no-such-mutant-generate-only"


def copy_tree(dest: Path, modules: list[str], tests: list[str]) -> None:
    """The work tree as it is now (tracked and new files, not ignored ones) under `dest`, plus the mutmut section."""
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=ROOT, check=True, capture_output=True).stdout
    names = [name for name in files.decode().split("\0") if name and (ROOT / name).is_file()]
    for name in names:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    # mutmut runs the tests in its `mutants/` copy; tests also read README.md, scripts/, benchmarks/ ...
    tops = sorted({name.split("/")[0] for name in names} - {"moe_prune", "tests", "pyproject.toml"})
    section = (
        "\n[tool.mutmut]\n"
        'source_paths = ["moe_prune"]\n'
        f"also_copy = {json.dumps(tops)}\n"
        f"only_mutate = {json.dumps(modules)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
    )
    with (dest / "pyproject.toml").open("a") as handle:
        handle.write(section)


def mutmut(work: Path, *args: str, log: Path | None = None, check: bool = True) -> str:
    """Run `mutmut ARGS` in `work`; its output (to `log` when given: the run's progress line is long)."""
    command = [sys.executable, "-m", "mutmut", *args]
    if log is None:
        return subprocess.run(command, cwd=work, check=check, capture_output=True, text=True).stdout
    with log.open("a") as out:
        subprocess.run(command, cwd=work, check=check, stdout=out, stderr=subprocess.STDOUT)
    return ""


def statuses(work: Path) -> dict[str, str]:
    """Every generated mutant's name and status ("killed", "survived", "no tests", "not checked", ...)."""
    found = {}
    for line in mutmut(work, "results", "--all", "true").splitlines():
        match = STATUS.match(line)
        if match:
            found[match["name"]] = match["status"].strip()
    return found


def draw(work: Path, size: int, seed: int, log: Path) -> tuple[list[str], int]:
    """`size` mutant names drawn uniformly (without replacement, seeded) from all mutants, and their number."""
    if not statuses(work):
        mutmut(work, "run", "--max-children", "1", NO_MUTANT, log=log, check=False)
    population = sorted(statuses(work))
    if not population:
        raise SystemExit(f"{log}: mutmut generated no mutants (see the log)")
    return sorted(random.Random(seed).sample(population, min(size, len(population)))), len(population)


def survivor_line(work: Path, name: str) -> str:
    """The changed line of one mutant (`+` side of its diff), for the list of survivors."""
    diff = mutmut(work, "show", name)
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else "?"


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion (sound at small counts and near 0 or 1)."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def file_of(name: str) -> str:
    """The source file a mutant name belongs to (`moe_prune.a.b.x_f__mutmut_3` -> `moe_prune/a/b.py`)."""
    module = name.partition("__mutmut_")[0].rpartition(".")[0]
    return module.replace(".", "/") + ".py"


def count(found: dict[str, str], key) -> dict[str, dict[str, int]]:
    """Status counts grouped by `key(mutant name)`."""
    groups: dict[str, dict[str, int]] = {}
    for name, status in found.items():
        counts = groups.setdefault(key(name), {})
        counts[status] = counts.get(status, 0) + 1
    return groups


def summarize(work: Path, modules: list[str], tests: list[str], only: list[str]) -> dict:
    """Counts per file, per listed module pattern and overall, the score with its interval, and each survivor."""
    found = statuses(work)
    if only:  # the sampled or named mutants (mutmut's patterns) only
        found = {name: s for name, s in found.items() if any(fnmatch.fnmatchcase(name, p) for p in only)}

    def pattern(name: str) -> str:
        return next((m for m in modules if fnmatch.fnmatch(file_of(name), m)), "other")

    total = count(found, lambda name: "all")["all"] if found else {}
    killed = total.get("killed", 0)
    reached = killed + total.get("survived", 0) + total.get("timeout", 0)
    survivors = [{"mutant": name, "changed": survivor_line(work, name)} for name, s in found.items() if s == "survived"]
    return {
        "files": count(found, file_of),
        "modules": count(found, pattern),
        "total": total,
        "score": killed / reached if reached else 0.0,
        "interval95": wilson(killed, reached),
        "survivors": survivors,
        "tests": tests,
    }


def report(summary: dict) -> None:
    """The counts, the score (with its interval when sampled) and the survivors, on stdout."""
    groups = {**summary["files"], **summary["modules"]}  # a module given as one file is printed once
    for name, counts in sorted(groups.items()):
        print(f"{name}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    low, high = summary["interval95"]
    sample = summary.get("sample")
    where = f" of a sample of {sample['size']} from {sample['population']} (seed {sample['seed']})" if sample else ""
    interval = f" [95%: {low:.3f}-{high:.3f}]" if sample else ""  # a run of every mutant is a count, not an estimate
    print(f"score (killed / reached by the tests){where}: {summary['score']:.3f}{interval}")
    for survivor in summary["survivors"]:
        print(f"  survived {survivor['mutant']}: {survivor['changed']}")


def arguments() -> argparse.Namespace:
    """The command line (defaults: the three modules above, their fast tests, every mutant)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="mutants tested at once (mutmut --max-children)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (to browse with mutmut)")
    parser.add_argument("--work", type=Path, default=None, help="go on in the folder an earlier --keep run left")
    parser.add_argument("--mutants", nargs="+", default=(), help="only these mutants (mutmut names, * allowed)")
    parser.add_argument("--modules", nargs="+", default=list(MODULES), help="files or globs (moe_prune/scoring/*)")
    parser.add_argument("--tests", nargs="+", default=list(TESTS), help="the pytest selection (files or node ids)")
    parser.add_argument("--deselect", nargs="+", default=[], help="node ids (or their prefixes) left out of --tests")
    parser.add_argument("--sample", type=int, default=None, help="run N mutants drawn uniformly from all of them")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample's draw")
    return parser.parse_args()


def main() -> None:
    """Copy the tree, run mutmut (all, named or sampled mutants), print and optionally save the summary."""
    args = arguments()
    work = args.work or Path(tempfile.mkdtemp(prefix="moe-prune-mutation-"))
    log = work / "mutmut-run.log"
    try:
        selection = [*args.tests, *(part for node in args.deselect for part in ("--deselect", node))]
        if args.work is None:
            copy_tree(work, args.modules, selection)
        print(f"mutating {', '.join(args.modules)} in {work} ({os.cpu_count()} CPUs, {args.workers} workers)")
        names, sample = list(args.mutants), None
        if args.sample is not None:
            names, population = draw(work, args.sample, args.seed, log)
            sample = {"size": len(names), "population": population, "seed": args.seed}
        mutmut(work, "run", "--max-children", str(args.workers), *names, log=log)
        summary = summarize(work, args.modules, selection, names)
        summary["sample"] = sample
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
    report(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
