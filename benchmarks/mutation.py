"""Mutation run (mutmut) over `runtime/shares.py`, `runtime/sources.py` and `merging/refit.py`: how many small code
changes the tests catch.

    nice -n 19 python -m benchmarks.mutation                  # the modules, their tests, 2 workers
    nice -n 19 python -m benchmarks.mutation --json out.json  # also the counts and survivors as JSON

The slow lane of issue #22 (tens of minutes on 2 cores, so not part of `pytest`). mutmut (a maintained
tool, pinned in constraints.txt) changes one token at a time (a `<` into `<=`, a `+ 1` into `+ 2`, a string,
a default) and runs the tests that reach the changed function; a mutant no test fails on "survived". The
work tree's files are copied to a temporary folder, `[tool.mutmut]` is appended to the copy's pyproject.toml
and mutmut runs there: mutmut writes its `mutants/` tree beside the code, and the work tree is never
touched. Printed: killed / survived / no tests per module, the score killed / (killed + survived +
timeout) over the mutants the selected tests reach, and every survivor with its diff line.

Recorded 2026-12-06 (2 CPU cores shared with other work, load ~15; mutmut 3.8.1): 681 mutants, too many for
the time left at ~20 a minute, so the run was stopped and finished with `--work` and `--mutants` over all of
refit.py and the share arithmetic of sources.py (`_largest_remainder`, `allocate`, `_weights`, `take`,
`parse_sources`; `load_mix`, `_looks_local` and some of `parse_source` were reached by the first run):
refit.py 86 killed / 38 survived (all 124); sources.py 130 killed / 62 survived / 4 without tests, 361 not
run (`mix`, `_fit`, `parse_source`, `read_source(s)`, `Mix.provenance`). Score 216 / 316 = 0.684. Every
mutant of `_largest_remainder` (the sabotage of issue #22, item 2) is killed. The survivors are listed in the
CHANGELOG entry of issue #22.
"""

from __future__ import annotations

import argparse
import json
import os
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
# The fast tests that guard the two modules (mutmut runs, per mutant, those of them that reach the changed
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


def copy_tree(dest: Path) -> None:
    """The work tree as it is now (tracked and new files, not ignored ones) under `dest`, plus the mutmut section."""
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=ROOT, check=True, capture_output=True).stdout
    for name in files.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    section = (
        "\n[tool.mutmut]\n"
        'source_paths = ["moe_prune"]\n'
        f"only_mutate = {json.dumps(list(MODULES))}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(list(TESTS))}\n"
    )
    with (dest / "pyproject.toml").open("a") as handle:
        handle.write(section)


def mutmut(work: Path, *args: str, log: Path | None = None) -> str:
    """Run `mutmut ARGS` in `work`; its output (to `log` when given: the run's progress line is long)."""
    command = [sys.executable, "-m", "mutmut", *args]
    if log is None:
        return subprocess.run(command, cwd=work, check=True, capture_output=True, text=True).stdout
    with log.open("w") as out:
        subprocess.run(command, cwd=work, check=True, stdout=out, stderr=subprocess.STDOUT)
    return ""


def survivor_line(work: Path, name: str) -> str:
    """The changed line of one mutant (`+` side of its diff), for the list of survivors."""
    diff = mutmut(work, "show", name)
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else "?"


def summarize(work: Path) -> dict:
    """Counts per module and overall, and each survivor (name, function, changed line)."""
    per_module: dict[str, dict[str, int]] = {}
    survivors = []
    for line in mutmut(work, "results", "--all", "true").splitlines():
        match = STATUS.match(line)
        if not match:
            continue
        name, status = match["name"], match["status"].strip()
        module = next((m for m in MODULES if name.startswith(m[:-3].replace("/", ".") + ".")), "other")
        counts = per_module.setdefault(module, {})
        counts[status] = counts.get(status, 0) + 1
        if status == "survived":
            survivors.append({"mutant": name, "changed": survivor_line(work, name)})
    total: dict[str, int] = {}
    for counts in per_module.values():
        for status, n in counts.items():
            total[status] = total.get(status, 0) + n
    reached = total.get("killed", 0) + total.get("survived", 0) + total.get("timeout", 0)
    score = total.get("killed", 0) / reached if reached else 0.0
    return {"modules": per_module, "total": total, "score": score, "survivors": survivors, "tests": list(TESTS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="mutants tested at once (mutmut --max-children)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (to browse with mutmut)")
    parser.add_argument("--work", type=Path, default=None, help="go on in the folder an earlier --keep run left")
    parser.add_argument("--mutants", nargs="+", default=(), help="only these mutants (mutmut names, * allowed)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="moe-prune-mutation-"))
    try:
        if args.work is None:
            copy_tree(work)
        env_note = f"{os.cpu_count()} CPUs, {args.workers} workers"
        print(f"mutating {', '.join(MODULES)} in {work} ({env_note})", flush=True)
        run = ["run", "--max-children", str(args.workers), *args.mutants]
        mutmut(work, *run, log=work / "mutmut-run.log")
        summary = summarize(work)
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
    for module, counts in summary["modules"].items():
        print(f"{module}: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    print(f"score (killed / reached by the tests): {summary['score']:.3f}")
    for survivor in summary["survivors"]:
        print(f"  survived {survivor['mutant']}: {survivor['changed']}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
