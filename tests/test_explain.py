"""Derivation notes reach the user: a derived family whose routing could not be read warns when it is used,
and `moe-prune score --model M --explain` prints how M's architecture is read and what was assumed.

gemma4_text is the derived family of this transformers whose routing the derivation cannot read (its
router scales the logits it returns); the demo (mixtral) is a table row with no notes.
"""

from __future__ import annotations

import json
import warnings

import pytest
from typer.testing import CliRunner

from moe_prune.architectures import derivation_notes, find_adapter
from moe_prune.cli import app
from moe_prune.errors import MoePruneWarning
from tests.test_derived import _build, tiny_overrides
from tests.tiny_models import save_char_tokenizer

NOTED = "gemma4_text"


@pytest.fixture(scope="module")
def noted(tmp_path_factory):
    folder = tmp_path_factory.mktemp(NOTED) / "model"
    _build(NOTED, folder, tiny_overrides(NOTED))
    save_char_tokenizer(folder)
    return folder


def test_a_derived_family_with_notes_warns_whenever_it_is_used():
    notes = derivation_notes(NOTED)
    assert notes and "routing" in notes[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert find_adapter(NOTED) is not None
        assert find_adapter("mixtral") is not None  # a table row: no warning
    messages = [str(w.message) for w in caught if w.category is MoePruneWarning]
    assert messages == [f"{NOTED} (derived from transformers): {notes[0]}; " + messages[0].split("; ")[-1]]
    assert "--explain" in messages[0]
    assert derivation_notes("mixtral") == ()


def test_score_explain_prints_the_derivation_and_its_notes(noted):
    runner = CliRunner()
    result = runner.invoke(app, ["score", "--model", str(noted), "--explain", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert (found["model_type"], found["source"]) == (NOTED, "derived")
    assert list(found["notes"]) == list(derivation_notes(NOTED))
    assert found["adapter"]["router"] == find_adapter(NOTED).router

    text = runner.invoke(app, ["score", "--model", str(noted), "--explain"])
    assert text.exit_code == 0 and f"note: {derivation_notes(NOTED)[0]}" in text.stdout
    assert "derived from transformers" in text.stdout

    demo = runner.invoke(app, ["score", "--model", "demo", "--explain"])
    assert demo.exit_code == 0 and "hand-written table row" in demo.stdout and "note: none" in demo.stdout


def test_explain_without_a_model_is_one_line():
    result = CliRunner().invoke(app, ["score", "--explain"])
    assert result.exit_code == 1
    assert "--explain needs --model" in result.output and "Traceback" not in result.output
