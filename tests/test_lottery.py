"""`lottery`: rounds of the real stages on the demo model, --compare, bad input, resume, --recipe."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tensor_bytes
from typer.testing import CliRunner

from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.demo import DEMO_CALIBRATION, DEMO_HELDOUT, DEMO_MODEL_DIR
from moe_prune.lottery import agreement
from moe_prune.lottery.recipe import LotteryParams, Recipe
from moe_prune.lottery.schedule import drop_schedule, token_schedule
from moe_prune.scoring.selection import Budget
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, lottery, profile, score

CRITERION = "activation-norm"
CONTROL = lottery.EQUAL_BUDGET  # one-shot + one finetune of the lottery's tokens
# Lean settings: 16 x 128 calibration tokens, 4096 then 8192 training tokens, 2048 held-out tokens.
SMALL = dict(tokens_first=4096, lr=1e-3, seq_len=128, profile_samples=16, profile_seq_len=128, eval_tokens=2048)
CLI_SMALL = [
    "--tokens-first", "4096", "--lr", "1e-3", "--seq-len", "128", "--profile-samples", "16",
    "--profile-seq-len", "128", "--eval-tokens", "2048",
]  # fmt: skip


def invoke(*args: str):
    return CliRunner().invoke(app, ["lottery", *args])


def masks(folder: Path) -> dict[str, dict[int, tuple[int, ...]]]:
    """Every round's kept original experts, by round folder name."""
    return {p.parent.name: DropMask.read(p).keep for p in sorted(folder.glob("round-*/mask.json"))}


def dropped_by_manifest(checkpoint: Path) -> dict[int, set[int]]:
    """Original experts missing from a checkpoint, read from its own manifest (independent of the report)."""
    kept = Checkpoint.open(checkpoint).identity.original_ids
    return {layer: set(range(8)) - set(ids) for layer, ids in kept.items()}


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, dict, Path]:
    """One-shot, iterative, lottery and one-shot + finetune, 2 rounds to 50%, through the CLI (--json, --plot)."""
    root = tmp_path_factory.mktemp("lottery")
    out, png = root / "run", root / "agreement.png"
    args = ["-c", CRITERION, "--target-ratio", "0.5", "--rounds", "2", "--compare", *CLI_SMALL]
    result = invoke(*args, "--out", str(out), "--plot", str(png), "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout), png


def test_schedule_spreads_whole_experts_and_doubles_tokens():
    for experts, top_k, ratio, rounds in [(8, 2, 0.5, 2), (8, 2, 0.5, None), (8, 2, 0.375, 2), (16, 1, 0.75, 5)]:
        drops = drop_schedule(experts, top_k, ratio, rounds)
        assert sum(drops) == round(ratio * experts) and min(drops) >= 1
        assert len(drops) == (rounds or round(ratio * experts))
        assert drops == sorted(drops, reverse=True) and max(drops) - min(drops) <= 1
    assert token_schedule(200_000, 3) == [200_000, 2 * 200_000, 4 * 200_000]


def test_two_rounds_to_half_give_a_stock_checkpoint_with_half_the_experts(compared):
    from transformers import AutoModelForCausalLM

    out, report, png = compared
    final = Path(report["methods"]["lottery"]["final"])
    assert final == out / "lottery" / "round-02" / "finetuned"
    ckpt = Checkpoint.open(final)
    assert set(ckpt.config.experts_per_layer.values()) == {4}
    model = AutoModelForCausalLM.from_pretrained(final)  # stock transformers, no remote code
    assert model.config.num_local_experts == 4
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits).all()
    history = json.loads((final / "moe_prune.json").read_text())["history"]
    assert [h["stage"] for h in history] == ["prune", "finetune", "prune", "finetune"]
    assert [h["tokens"] for h in history if h["stage"] == "finetune"] == [4096, 8192]  # doubling budget
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rounds_match_the_stages_run_by_hand(compared):
    """Round 1 and one-shot equal `profile` + `score` called directly; round 2 drops what round 1 kept."""
    out, report, _ = compared
    settings = profile.Settings(samples=16, seq_len=128)
    stats = profile.run(DEMO_MODEL_DIR, str(DEMO_CALIBRATION), settings).stats
    for method, drop in (("one-shot", 4), ("lottery", 2), ("iterative", 2)):
        expected, _ = score.score(stats, DEMO_MODEL_DIR, CRITERION, budget=Budget(drop=drop))
        assert masks(out / method)["round-01"] == expected.keep
    lottery_rounds = report["methods"]["lottery"]["rounds"]
    for layer, gone in dropped_by_manifest(out / "lottery" / "round-02" / "finetuned").items():
        first, second = (set(r["dropped"][str(layer)]) for r in lottery_rounds)
        assert not first & second and first | second == gone and len(first) == len(second) == 2
    # Perplexity after each round is what `eval` measures on that round's checkpoint.
    for method in ("one-shot", "iterative", "lottery", CONTROL):
        for r in report["methods"][method]["rounds"]:
            ckpt = out / method / r["checkpoint"]
            measured = evaluate.run(
                ckpt, EvalSpec(data=str(DEMO_HELDOUT), seq_len=128, max_tokens=2048)
            ).model.perplexity
            assert math.isclose(r["perplexity"], measured, rel_tol=1e-6)


def test_agreement_is_the_set_arithmetic_of_the_final_checkpoints(compared):
    _, report, _ = compared
    finals = {m: dropped_by_manifest(Path(report["methods"][m]["final"])) for m in ("one-shot", "iterative", "lottery")}
    rows = report["agreement"]
    assert {(r["first"], r["second"]) for r in rows} == set(agreement.PAIRS)
    for row in rows:
        a, b = finals[row["first"]][row["layer"]], finals[row["second"]][row["layer"]]
        assert (row["both_drop"], row["disagree"], row["both_keep"]) == (len(a & b), len(a ^ b), 8 - len(a | b))
        assert math.isclose(row["jaccard"], len(a & b) / len(a | b))


def test_table_output_and_finished_run_is_not_redone(compared, tmp_path):
    out, report, _ = compared
    again = invoke("-c", CRITERION, "--target-ratio", "0.5", "--rounds", "2", "--compare", *CLI_SMALL, "-o", str(out))
    assert again.exit_code == 1 and "already holds this finished lottery run" in again.output
    other = invoke(
        "-c", CRITERION, "--rounds", "2", "--compare", *CLI_SMALL[:-2], "--eval-tokens", "1024", "-o", str(out)
    )
    assert other.exit_code == 1 and "params.eval_tokens (2048 there, 1024 now)" in other.output
    assert json.loads((out / "report.json").read_text())["methods"] == report["methods"]  # nothing lost


def test_one_shot_finetuned_has_one_shots_mask_and_the_lotterys_tokens(compared):
    """The control arm: one-shot's mask, then one finetune of exactly the tokens the lottery's rounds trained."""
    from transformers import AutoModelForCausalLM

    out, report, _ = compared
    assert list(report["methods"]) == ["one-shot", "iterative", "lottery", CONTROL]
    lottery_final = out / "lottery" / "round-02" / "finetuned"
    history = json.loads((lottery_final / "moe_prune.json").read_text())["history"]
    lottery_tokens = sum(h["tokens"] for h in history if h["stage"] == "finetune")  # from the checkpoint itself
    assert lottery_tokens == sum(r["tokens"] for r in report["methods"]["lottery"]["rounds"]) == 4096 + 8192
    arm = report["methods"][CONTROL]
    assert [r["tokens"] for r in arm["rounds"]] == [lottery_tokens] == [arm["trained"]]
    final = Path(arm["final"])
    assert final == out / CONTROL / "round-01" / "finetuned"
    own = json.loads((final / "moe_prune.json").read_text())["history"]
    assert [h["stage"] for h in own] == ["prune", "finetune"] and own[-1]["tokens"] == lottery_tokens
    assert masks(out / CONTROL) == masks(out / "one-shot")
    assert dropped_by_manifest(final) == dropped_by_manifest(out / "one-shot" / "round-01" / "pruned")
    assert tensor_bytes(final) != tensor_bytes(out / "one-shot" / "round-01" / "pruned")  # it did train
    model = AutoModelForCausalLM.from_pretrained(final)  # stock transformers
    assert model.config.num_local_experts == 4
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits).all()


def test_one_shot_finetuned_resumes_and_retrains_the_same_weights(compared, tmp_path, monkeypatch):
    """Its folder removed from a finished run: the rerun makes only that arm again (statistics and the mask
    shared with one-shot), with the same weights."""
    compare_out, report, _ = compared
    out = tmp_path / "run"
    shutil.copytree(compare_out, out)
    shutil.rmtree(out / CONTROL)
    (out / "report.json").unlink()
    calls: list[str] = []
    real_finetune = lottery.finetune.run
    monkeypatch.setattr(lottery.profile, "run", lambda *a, **k: calls.append("profile"))
    monkeypatch.setattr(lottery.score, "score", lambda *a, **k: calls.append("score"))
    monkeypatch.setattr(
        lottery.finetune,
        "run",
        lambda model, data, o, options: (calls.append(options.tokens), real_finetune(model, data, o, options))[1],
    )
    params = LotteryParams(str(DEMO_MODEL_DIR), CRITERION, str(DEMO_CALIBRATION), rounds=2, compare=True, **SMALL)
    result = lottery.run(params, out)
    assert calls == [4096 + 8192] and result.resumed
    assert [m.rounds[0].reused for m in result.methods.values()] == [True, True, True, False]
    final = out / CONTROL / "round-01" / "finetuned"
    assert tensor_bytes(final) == tensor_bytes(Path(report["methods"][CONTROL]["final"]))  # CPU, one thread


BAD = [
    (["-c", "activation-nrom"], "unknown criterion 'activation-nrom' (did you mean 'activation-norm'?)"),
    (["-c", CRITERION, "--target-ratio", "0.875"], "keeps 1 of 8 experts per layer, fewer than top-k 2"),
    (["-c", CRITERION, "--target-ratio", "0.3"], "is 2.4 experts, not a whole number; use 0.25 or 0.375"),
    (["-c", CRITERION, "--rounds", "5"], "drops 4 experts per layer, which 5 rounds cannot share"),
    (["-c", CRITERION, "--compare", "--no-finetune"], "drop --no-finetune"),
    (["-c", CRITERION, "--data", "missing.jsonl"], "missing.jsonl: data file not found"),
    (["--target-ratio", "0.5"], "pass --criterion"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    out = tmp_path / "run"
    result = invoke(*args, "-o", str(out))
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and message in " ".join(result.output.split())
    assert "Traceback" not in result.output and not out.exists()


def test_bad_recipes_and_existing_outputs_are_refused(tmp_path):
    mask = tmp_path / "mask.json"
    ckpt = Checkpoint.open(DEMO_MODEL_DIR)
    mask.write_text(DropMask.create(ckpt.identity, {layer: list(range(8)) for layer in range(4)}, "x").dumps())
    recipe, _, _ = lottery.plan(LotteryParams(str(DEMO_MODEL_DIR), CRITERION, str(DEMO_CALIBRATION)))
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**recipe.to_dict(), "version": 99}))
    holder = tmp_path / "holder"  # a folder holding the input model: --force must not delete it
    shutil.copytree(DEMO_MODEL_DIR, holder / "model")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [
        (["--recipe", str(mask)], "not a moe-prune/lottery-recipe file"),
        (["--recipe", str(future)], "moe-prune/lottery-recipe version 99 is not supported"),
        (["--recipe", str(future), "--lr", "1"], "--recipe sets every parameter; do not also pass lr"),
        (["-c", CRITERION, "-o", str(existing)], "already exists and holds no lottery run; pass --force"),
        ([str(holder / "model"), "-c", CRITERION, "-o", str(holder), "--force"], "is, holds or lies inside the input"),
    ]
    for args, message in cases:
        result = invoke(*args, *([] if "-o" in args else ["-o", str(tmp_path / "run")]))
        assert result.exit_code == 1 and result.output.startswith("error:"), result.output
        assert message in " ".join(result.output.split()), result.output
    assert (existing / "keep.txt").read_text() == "mine" and not (tmp_path / "run").exists()
    assert (holder / "model" / "config.json").exists()


def test_interrupted_run_resumes_without_redoing_round_one(compared, tmp_path, monkeypatch):
    """Same settings as the --compare fixture's lottery: the resumed run ends with its masks and weights."""
    compare_out, _, _ = compared
    params = LotteryParams(
        str(DEMO_MODEL_DIR), CRITERION, str(DEMO_CALIBRATION), rounds=2, **{**SMALL, "eval_tokens": 0}
    )
    out = tmp_path / "run"
    calls: list[str] = []
    real_profile, real_finetune = lottery.profile.run, lottery.finetune.run

    def counted_profile(model, *args, **kwargs):
        calls.append(f"profile {Path(model).parent.name}")
        return real_profile(model, *args, **kwargs)

    def failing_finetune(model, data, ft_out, *args, **kwargs):
        calls.append(f"finetune {Path(ft_out).parent.name}")
        if Path(ft_out).parent.name == "round-02":
            raise RuntimeError("injected failure")
        return real_finetune(model, data, ft_out, *args, **kwargs)

    monkeypatch.setattr(lottery.profile, "run", counted_profile)
    monkeypatch.setattr(lottery.finetune, "run", failing_finetune)
    with pytest.raises(RuntimeError, match="injected"):
        lottery.run(params, out)
    assert (out / "round-01" / "round.json").exists() and not (out / "round-02" / "round.json").exists()
    assert not (out / "round-02" / "finetuned").exists() and not (out / "report.json").exists()
    round_one = {p: p.stat().st_mtime_ns for p in (out / "round-01").rglob("*")}

    calls.clear()
    monkeypatch.setattr(
        lottery.finetune, "run", lambda *a, **k: (calls.append("finetune round-02"), real_finetune(*a, **k))[1]
    )
    result = lottery.run(params, out)
    assert calls == ["finetune round-02"]  # round 1 untouched, round 2 reuses its stats, mask and pruned model
    assert round_one == {p: p.stat().st_mtime_ns for p in (out / "round-01").rglob("*")}
    assert result.resumed and [r.reused for r in result.methods["lottery"].rounds] == [True, False]
    assert masks(out) == masks(compare_out / "lottery")
    final = out / "round-02" / "finetuned"
    assert tensor_bytes(final) == tensor_bytes(compare_out / "lottery" / "round-02" / "finetuned")  # CPU, one thread


def test_recipe_reproduces_the_masks_and_refuses_changed_inputs(tmp_path):
    """Iterative pruning with the paper's default of one expert per layer per round (4 rounds)."""
    data = tmp_path / "calibration.jsonl"
    data.write_bytes(DEMO_CALIBRATION.read_bytes())
    first = tmp_path / "first"
    args = ["-c", CRITERION, "--no-finetune", "-d", str(data), "--profile-samples", "16", "--profile-seq-len", "128"]
    result = invoke(*args, "--eval-tokens", "0", "-o", str(first))
    assert result.exit_code == 0, result.output
    recipe = json.loads((first / "recipe.json").read_text())
    assert recipe["schedule"]["drops_per_round"] == [1, 1, 1, 1]
    assert recipe["inputs"]["data"]["sha256"] == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    assert recipe["tool_version"] and recipe["params"]["seed"] == 0 and recipe["schedule"]["profile_seed"] == 0

    second = tmp_path / "second"
    result = invoke("--recipe", str(first / "recipe.json"), "-o", str(second), "--json")
    assert result.exit_code == 0, result.output
    assert len(masks(first)) == 4 and masks(second) == masks(first)
    assert Recipe.read(second / "recipe.json").fingerprint() == Recipe.read(first / "recipe.json").fingerprint()

    data.write_text(data.read_text().replace("a", "b", 1))
    changed = invoke("--recipe", str(first / "recipe.json"), "-o", str(tmp_path / "third"))
    assert changed.exit_code == 1 and "inputs have changed since it was written: data.sha256" in changed.output
    assert not (tmp_path / "third").exists()


def test_a_first_round_failing_after_its_profile_keeps_the_folder_to_resume(tmp_path, monkeypatch):
    """Only a run that wrote nothing but its recipe is removed on failure; round 1's statistics are kept."""
    params = LotteryParams(
        str(DEMO_MODEL_DIR), CRITERION, str(DEMO_CALIBRATION), rounds=1, **{**SMALL, "eval_tokens": 0}
    )

    def failing_prune(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(lottery.prune, "run", failing_prune)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        lottery.run(params, out)
    assert (out / "round-01" / "stats.npz").exists() and (out / "recipe.json").exists()
    monkeypatch.setattr(lottery.profile, "run", lambda *a, **k: pytest.fail("round 1's profile was not reused"))
    monkeypatch.setattr(lottery.prune, "run", failing_prune)
    with pytest.raises(RuntimeError, match="injected"):
        lottery.run(params, out)  # resumes: the statistics are reused, the failure comes again at prune
