"""One typed spec per stage (`moe_prune.specs`): the command's options are the spec's fields, what the command
line gives becomes the spec the stage runs with, the recorded step reads back as the same spec, and the
fingerprint follows exactly the fields marked as deciding the result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from moe_prune.cli import app
from moe_prune.cli.spec_options import build, given, parameters, takes_spec
from moe_prune.errors import MoePruneError
from moe_prune.specs.allocate import AllocateSpec
from moe_prune.specs.eval import EvalSpec
from moe_prune.specs.fields import KEY, check_complete, fingerprint, from_record, option, record
from moe_prune.specs.finetune import FinetuneSpec
from moe_prune.specs.lottery import LotteryParams
from moe_prune.specs.merge import MergeSpec
from moe_prune.specs.profile import ProfileSpec
from moe_prune.specs.prune import PruneSpec
from moe_prune.specs.score import ScoreSpec
from moe_prune.specs.sweep import SweepSpec

GROUP = typer.main.get_command(app)
SPECS = {
    "profile": ProfileSpec,
    "finetune": FinetuneSpec,
    "lottery": LotteryParams,
    "sweep": SweepSpec,
    "eval": EvalSpec,
}


def flags_of(spec: type) -> dict[str, str]:
    """Field name -> the long flag its CLI twin should have."""
    out = {}
    for f in dataclasses.fields(spec):
        cli = f.metadata[KEY]
        out[f.name] = f.name if cli.argument else cli.flag(f.name)
    return out


@pytest.mark.parametrize("command", sorted(SPECS))
def test_every_spec_field_is_an_option_of_its_command(command: str) -> None:
    spec = SPECS[command]
    check_complete(spec)
    params = {p.name: p for p in GROUP.commands[command].params}
    for name, flag in flags_of(spec).items():
        assert name in params, f"{command}: field {name} has no option"
        if not flag.startswith("--"):
            continue  # an argument
        assert flag in (*params[name].opts, *params[name].secondary_opts), (command, name, params[name].opts)
        assert params[name].help == spec.__dataclass_fields__[name].metadata[KEY].help or command == "lottery"


def test_a_field_without_its_cli_twin_is_refused() -> None:
    @dataclass(frozen=True)
    class Half:
        kept: int = option(1, "An option.")
        forgotten: int = 2

    with pytest.raises(TypeError, match="forgotten"):
        check_complete(Half)
    with pytest.raises(TypeError, match="forgotten"):
        takes_spec(Half, "spec")(lambda spec: spec)


def test_the_command_line_becomes_the_spec_the_stage_runs_with(tmp_path: Path, monkeypatch) -> None:
    from moe_prune.stages import finetune

    seen: list[Any] = []

    def run(model: Any, data: Any, out: Any, options: FinetuneSpec, progress: Any = None) -> None:
        seen.append(options)
        raise MoePruneError("stopped after the options")

    monkeypatch.setattr(finetune, "run", run)
    args = ["finetune", "--out", str(tmp_path / "o"), "--tokens", "2k", "--train", "router,experts"]
    args += ["--top-k-anneal", "4:2", "--lr", "0.5", "--no-eos", "--save-every", "3", "--trust-remote-code"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "stopped after the options" in result.output, result.output
    want = FinetuneSpec(
        tokens=2000,
        train=("router", "experts"),
        top_k_anneal=(4, 2),
        lr=0.5,
        eos=False,
        save_every=3,
        trust_remote_code=True,
    )
    assert seen == [want]


def test_profile_options_are_parsed_into_its_spec() -> None:
    values = {name: None for name in flags_of(ProfileSpec)}
    values |= {"shard": "1/4", "buffer_memory": "2KB", "for_names": "reap,uncurl", "device_map": "auto"}
    values |= {"gradients": False, "sequential": True, "trust_remote_code": False}
    spec = build(ProfileSpec, values)
    assert spec == ProfileSpec(
        shard=(1, 4),
        buffer_memory=2000,
        for_names=("reap", "uncurl"),
        device="auto",
        device_map="auto",
        sequential=True,
    )
    with pytest.raises(MoePruneError, match="--shard '4/4'"):
        build(ProfileSpec, values | {"shard": "4/4"})
    with pytest.raises(MoePruneError, match="--device-map 'sideways'"):
        build(ProfileSpec, values | {"device_map": "sideways"})


def test_lottery_gets_only_the_fields_passed() -> None:
    values: dict[str, Any] = {name: None for name in flags_of(LotteryParams)}
    values |= {"finetune": False, "compare": False}  # yes/no flags not passed
    assert given(LotteryParams, values) == {}
    values |= {"finetune": True, "tokens_first": "1M", "data": ["a:1", "b:2"], "lr": 0.1}  # --no-finetune passed
    assert given(LotteryParams, values) == {"finetune": False, "tokens_first": 10**6, "data": ["a:1", "b:2"], "lr": 0.1}


def test_lottery_reuses_finetune_and_profile_fields() -> None:
    """Same default and parser as finetune's / profile's field: the lottery does not restate them."""
    lottery = LotteryParams.__dataclass_fields__
    finetune, profile = FinetuneSpec.__dataclass_fields__, ProfileSpec.__dataclass_fields__
    pairs = [(name, finetune[name]) for name in ("lr", "batch_size", "grad_accum", "weight_decay", "max_grad_norm")]
    pairs += [(f"profile_{name}", profile[name]) for name in ("samples", "seq_len", "batch_size")]
    for name, source in pairs:
        assert lottery[name].default == source.default, name
        assert lottery[name].metadata[KEY].type == source.metadata[KEY].type, name


def test_recorded_step_reads_back_as_the_same_spec() -> None:
    params = LotteryParams("m", "reap", ["a:1", "b:2"], target_ratio=0.25, rounds=3, finetune=False, lr=2e-4)
    assert from_record(LotteryParams, record(params), "recipe.json") == params
    changed = record(params) | {"lr": "fast"}
    with pytest.raises(MoePruneError, match=r"params\.lr must be a number"):
        from_record(LotteryParams, changed, "recipe.json")


def _other(value: Any) -> Any:
    """A different value of the same type."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, *value) if value else ("x",)
    return 7 if value is None else None


# What a run may change without being another run: how it is saved, shown and held (finetune's output side);
# every lottery parameter is in its recipe's fingerprint.
OUTPUT_ONLY = {
    FinetuneSpec: {"save_every", "max_shard_size", "force", "resume", "eval_data", "eval_tokens", "trust_remote_code"},
    LotteryParams: set(),
}


@pytest.mark.parametrize("spec", [FinetuneSpec, LotteryParams])
def test_fingerprint_changes_with_exactly_the_fields_that_decide_the_result(spec: type) -> None:
    base = spec("m", "c", "d") if spec is LotteryParams else spec()
    for f in dataclasses.fields(spec):
        changed = dataclasses.replace(base, **{f.name: _other(getattr(base, f.name))})
        assert (fingerprint(changed) != fingerprint(base)) == (f.name not in OUTPUT_ONLY[spec]), f.name
        assert record(changed) != record(base), f.name  # the recorded step has every field


@pytest.mark.parametrize(
    "spec", [ProfileSpec, FinetuneSpec, SweepSpec, EvalSpec, PruneSpec, MergeSpec, ScoreSpec, AllocateSpec]
)
def test_the_options_defaults_are_the_specs_defaults(spec: type) -> None:
    """Nothing passed on the command line is the library's default spec (each CLI default parses to the field's)."""
    defaults = {p.name: p.default for p in parameters(spec)}
    assert build(spec, defaults) == spec()
    assert given(LotteryParams, {p.name: p.default for p in parameters(LotteryParams, unset=True)}) == {}


def test_eval_sequential_reaches_the_stage_and_refuses_tasks(monkeypatch) -> None:
    from moe_prune.stages import evaluate

    seen: list[Any] = []

    def run(model: Any, spec: Any, progress: Any = None) -> None:
        seen.append(spec.sequential)
        raise MoePruneError("stopped before evaluating")

    monkeypatch.setattr(evaluate, "run", run)
    result = CliRunner().invoke(app, ["eval", "--sequential", "--max-tokens", "64"])
    assert result.exit_code == 1 and "stopped before evaluating" in result.output and seen == [True], result.output
    result = CliRunner().invoke(app, ["eval", "--sequential", "--tasks", "demo"])
    assert result.exit_code == 1 and "--tasks runs lm-eval on the whole model" in result.output, result.output


@pytest.mark.parametrize(
    "command",
    [
        ["allocate", "--ratio", "0.5", "--stats", "missing.npz", "-o", "mask.json", "--skip-layers"],
        ["merge", "--stats", "missing.npz", "--keep", "2", "-o", "out", "--skip-layers"],
    ],
)
def test_skip_layers_one_grammar_in_allocate_and_merge(command: list[str]) -> None:
    """One parser (`specs.parse.layer_numbers`) for both commands: a blank part is refused the same way."""
    result = CliRunner().invoke(app, [*command, "0,,2"])
    assert result.exit_code == 1, result.output
    assert "--skip-layers '0,,2': expected comma-separated layer numbers such as 0 or 0,3" in result.output


def test_layer_numbers_sorted_once_each() -> None:
    from moe_prune.specs.parse import layer_numbers

    assert layer_numbers("3,0,3", "--skip-layers") == [0, 3]
    assert layer_numbers(["0,3", " 5"], "--skip-layers") == [0, 3, 5]
    with pytest.raises(MoePruneError, match=r"^--skip-layers 'a': expected comma-separated layer numbers"):
        layer_numbers("a", "--skip-layers")


def test_budget_evals_help_says_top_k_search_spends_its_own() -> None:
    """README: --top-k search evaluates up to --budget-evals more candidates; the help must not say 'at most' alone."""
    result = CliRunner().invoke(app, ["allocate", "--help"], env={"COLUMNS": "400"})
    line = next(text for text in result.output.splitlines() if "--budget-evals" in text)
    assert "per search" in line and "--top-k search adds up to as many again" in line, line


def test_profile_resume_fingerprint_places_every_result_field() -> None:
    """The resume fingerprint is read off ProfileSpec's result-affecting fields (`stages.profile.resume_options`):
    each is in it (`RESUMED`) or pinned by the windows' token ids / never resumed (`NOT_RESUMED`), so a field added
    to the spec cannot be left out of what a resumed run must match (the golden values are
    tests/test_resume_fingerprints.py's)."""
    from moe_prune.specs.profile import NOT_RESUMED, RESUMED

    resumed = [name for group in RESUMED for name in group]
    assert len(set(resumed)) == len(resumed) and not set(resumed) & set(NOT_RESUMED)
    assert set(fingerprint(ProfileSpec())) == set(resumed) | set(NOT_RESUMED)


@pytest.mark.parametrize("field", ["batch_size", "dtype", "gradients", "expert_outputs", "refit_stats", "for_names"])
def test_profile_resume_fingerprint_changes_with_each_resumed_field(field: str) -> None:
    """Each RESUMED field, changed alone, changes the fingerprint (an old partial does not resume a different run)."""
    from dataclasses import fields, replace

    from moe_prune.runtime.distributed import World
    from moe_prune.stages.profile import resume_options

    base = ProfileSpec()
    default = next(f.default for f in fields(ProfileSpec) if f.name == field)
    changed = {"batch_size": 3, "dtype": "bfloat16", "for_names": ("reap",)}.get(field, not default)
    world = World(rank=0, size=1)
    assert resume_options(replace(base, **{field: changed}), world) != resume_options(base, world)
