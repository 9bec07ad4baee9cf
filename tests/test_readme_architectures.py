"""The README's architecture list is what scripts/architectures_table.py prints from the code's own statuses.

The script reads every status from what the tests hold to behaviour: the table rows, the derivation, REFUSED and
tests/test_derived.py's UNSUPPORTED and KNOWN_FAILURES (strict xfails: a check that starts passing, or stops,
fails there). So a README row that claims more or less than the code does fails here; regenerate the list with
`python scripts/architectures_table.py` and paste it into the README.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

from moe_prune.architectures.derive_models import moe_causal_lm_types

ROOT = Path(__file__).resolve().parents[1]
HEAD = re.compile(r"^\d+ MoE causal-LM model types in transformers: .*$", re.MULTILINE)


def readme_block() -> list[str]:
    """The README's generated block: the count line, then the table rows up to the first blank line."""
    text = (ROOT / "README.md").read_text()
    found = HEAD.search(text)
    assert found, "README.md has no architecture list"
    lines = text[found.start() :].splitlines()
    table = lines[2:]
    return [lines[0], "", *table[: table.index("") if "" in table else len(table)]]


def test_readme_lists_every_moe_type_once():
    """Fast: the rows name exactly the MoE causal LMs of the installed transformers."""
    rows = [line.split("|")[1].strip() for line in readme_block()[4:]]
    assert sorted(rows) == sorted(moe_causal_lm_types())


@pytest.mark.slow
def test_readme_architecture_list_is_the_scripts_output():
    spec = importlib.util.spec_from_file_location("architectures_table", ROOT / "scripts" / "architectures_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        script.main()
    assert readme_block() == printed.getvalue().strip().splitlines()
