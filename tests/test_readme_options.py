"""The README and `--help` agree: every command has a row in the README's stage table and a section, every
option of a command is named in its section (or under "Common options"), and every example line in the README
uses options its command has. Yes/no flags show no value in `--help`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from moe_prune.cli import app

README = (Path(__file__).parent.parent / "README.md").read_text()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)
OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
# A command line: `moe-prune [--debug] COMMAND ...`, after a prompt or environment assignments.
COMMAND = re.compile(r"\s*(?:\$\s*)?(?:\w+=\S*\s+)*moe-prune(?:\s+--[\w-]+)*\s+(\w+)(.*)")
COMMON = "Common options"  # a README heading whose options count for every command

# Gaps at the time this test was written: the README must name these (then delete them here; strict).
UNDOCUMENTED: dict[str, set[str]] = {}


def section(heading: str) -> str:
    """The README text from the first heading starting with `heading` to the next heading of level 2 or 3."""
    start = re.search(rf"^#{{2,3}} {re.escape(heading)}", README, re.M)
    if start is None:
        return ""
    end = re.search(r"^#{2,3} ", README[start.end() :], re.M)
    return README[start.start() : start.end() + end.start()] if end else README[start.start() :]


def options(name: str) -> list[tuple[str, ...]]:
    """Each option of command `name` as its long names (`--perplexity`, `--no-perplexity`)."""
    params = GROUP.commands[name].params
    return [
        tuple(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
        for p in params
        if p.param_type_name == "option"
    ]


def undocumented(name: str) -> set[str]:
    text = section(f"`moe-prune {name}")
    if not text or f"| `moe-prune {name}` |" not in README:
        return {"*"}
    named = set(OPTION.findall(text)) | set(OPTION.findall(section(COMMON)))
    return {names[0] for names in options(name) if not named & set(names)}


def help_of(*args: str) -> str:
    """`--help` as a user sees it, on a terminal wide enough that no option name is cut."""
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_named_in_the_readme(name):
    help_text = help_of(name)
    for names in options(name):
        assert names[0] in help_text, names  # the options compared are the ones --help shows
    missing, known = undocumented(name), UNDOCUMENTED.get(name, set())
    assert missing <= known, f"README does not name {sorted(missing - known)} of `moe-prune {name}`"
    assert known <= missing, f"README now names {sorted(known - missing)}: delete them from UNDOCUMENTED"


def example_lines() -> list[str]:
    """Lines of the README's shell code blocks (continuations joined), split at pipes and &&."""
    lines, inside, shell = [], False, False
    for line in README.replace("\\\n", " ").splitlines():
        if line.startswith("```"):
            inside, shell = not inside, line.strip("`").strip() in ("", "bash", "sh", "console", "shell")
            continue
        if inside and shell:
            lines += re.split(r"&&|\||;", line.split(" #")[0])  # a comment may name another command's options
    return [part for part in lines if COMMAND.match(part)]


def test_readme_examples_use_options_their_command_has():
    examples = example_lines()
    assert len(examples) > 20
    for line in examples:
        match = COMMAND.match(line)
        assert match and match.group(1) in COMMANDS, line
        known = {o for names in options(match.group(1)) for o in names} | {"--help"}
        assert set(OPTION.findall(match.group(2))) <= known, line


@pytest.mark.parametrize("name", COMMANDS)
def test_yes_no_flags_show_no_value(name):
    """`--force <bool>` invited `--force true`, which then read `true` as the model folder."""
    assert "<bool>" not in help_of(name) and "<bool>" not in help_of()
    flags = [p.opts[0] for p in GROUP.commands[name].params if p.param_type_name == "option" and p.is_flag]
    assert all(f"{flag} " in help_of(name) for flag in flags), flags


@pytest.mark.parametrize(("name", "needed"), [("finetune", []), ("lottery", ["--criterion", "soft-counts"])])
def test_data_help_does_not_offer_tasks_where_they_are_refused(name, needed, tmp_path):
    args = [name, *needed, "--data", "task:demo_records", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "reads files and hub datasets" in result.output, result.output
    assert "task:NAME" not in help_of(name) and "task:NAME" in help_of("profile")
    assert not (tmp_path / "out").exists()
