"""`eval --tasks`: lm-eval on moe-prune's loaded model, the offline demo suite, and its one-line errors."""

from __future__ import annotations

import json
import random
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from hostile_tasks import TASK, TASK_CODE, base_yaml

from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.demo import DEMO_MODEL_DIR
from moe_prune.stages import merge, prune
from moe_prune.stages import tasks as stage
from moe_prune.stages.task_code import DEMO_TASKS_DIR, check_task_yamls

runner = CliRunner()
DATA = DEMO_TASKS_DIR / "data"
# Demo task -> (metric key in lm-eval's results, chance level).
DEMO = {
    "demo_arithmetic": ("acc,none", 0.25),
    "demo_translation": ("acc,none", 0.25),
    "demo_records": ("acc,none", 0.25),
    "demo_narrative": ("acc,none", 1 / 3),
    "demo_arithmetic_gen": ("exact_match,strip", 0.0),
}


def eval_json(args: list[str]) -> dict:
    result = runner.invoke(app, ["eval", *args, "--no-perplexity", "--json"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


def refused(args: list[str], pattern: str, written=None) -> None:
    """Exit 1, exactly one stderr line containing `pattern`, nothing on stdout, `written` not created."""
    result = runner.invoke(app, ["eval", *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, (result.stderr, result.exception)
    assert pattern in lines[0], lines[0]
    assert result.stdout == ""
    assert written is None or not written.exists()


def docs(task: str, limit: int) -> list[dict]:
    lines = (DATA / f"{task.removeprefix('demo_')}_test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:limit]]


@torch.inference_mode()
def independent_predictions(task: str, delimiter: str, limit: int, folder=DEMO_MODEL_DIR) -> list[int]:
    """argmax over choices of Σ log p(continuation token | context, earlier continuation tokens), stock transformers."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    predictions = []
    for doc in docs(task, limit):
        context = tokenizer(doc["context"]).input_ids
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(delimiter + choice).input_ids
            ids = torch.tensor([context + continuation])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            positions = torch.arange(len(context) - 1, ids.shape[1] - 1)
            scores.append(float(logprobs[positions, ids[0, len(context) :]].sum()))
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions


def test_multiple_choice_accuracy_equals_independent_loglikelihood(tmp_path):
    limit = 30
    samples = tmp_path / "samples.jsonl"
    out = eval_json(
        ["--tasks", "demo_arithmetic,demo_translation", "--limit", str(limit), "--log-samples", str(samples)]
    )
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    for task, delimiter in (("demo_arithmetic", " "), ("demo_translation", " ")):
        predicted = independent_predictions(task, delimiter, limit)
        gold = [d["gold"] for d in docs(task, limit)]
        expected = sum(p == g for p, g in zip(predicted, gold, strict=True)) / limit
        assert out["tasks"]["model"]["results"][task]["acc,none"] == pytest.approx(expected)
        logged = sorted((r for r in records if r["task"] == task), key=lambda r: r["doc_id"])
        assert [r["acc"] for r in logged] == [float(p == g) for p, g in zip(predicted, gold, strict=True)]
    config = out["tasks"]["model"]["config"]
    assert config["limit"] == limit and config["seeds"]["random_seed"] == 0 and config["lm_eval_version"] == "0.4.13"
    assert out["tasks"]["model"]["n_shot"]["demo_arithmetic"] == 0


def test_ragged_and_merged_checkpoints_evaluate(tmp_path, demo_stats):
    ckpt = Checkpoint.open(DEMO_MODEL_DIR)
    rng = random.Random(0)
    keep = {
        layer: sorted(rng.sample(list(ckpt.identity.original_ids[layer]), 8 - 2 * (i % 2) - i // 2))
        for i, layer in enumerate(ckpt.identity.moe_layers)
    }
    assert len({len(k) for k in keep.values()}) > 1
    prune.run(DEMO_MODEL_DIR, DropMask.create(ckpt.identity, keep, "test"), tmp_path / "ragged")
    merge.run(DEMO_MODEL_DIR, demo_stats, tmp_path / "merged", 4)
    for folder in ("ragged", "merged"):
        out = eval_json([str(tmp_path / folder), "--tasks", "demo_records", "--limit", "8", "--baseline", "demo"])
        results = out["tasks"]["model"]["results"]["demo_records"]
        assert 0 <= results["acc,none"] <= 1
        assert out["tasks"]["baseline"]["model"] == "demo"


def test_baseline_table_and_perplexity_together():
    result = runner.invoke(app, ["eval", "--tasks", "demo_records", "--limit", "4", "--max-tokens", "512"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "perplexity" in result.stdout and "demo_records" in result.stdout and "acc" in result.stdout
    assert result.stderr.strip() == ""  # transient bars leave only newlines


def test_unknown_task(tmp_path):
    refused(
        ["--tasks", "demo_records,no_such_task_xyz", "--log-samples", str(tmp_path / "s.jsonl")],
        "unknown task 'no_such_task_xyz'",
        tmp_path / "s.jsonl",
    )


def test_limit_zero(tmp_path):
    refused(
        ["--tasks", "demo", "--limit", "0", "--log-samples", str(tmp_path / "s.jsonl")], "--limit", tmp_path / "s.jsonl"
    )


def test_malformed_task_yaml(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\ndoc_to_text: [unclosed\n")
    refused(["--tasks", "mine", "--include-path", str(tasks)], "mine.yaml: malformed task YAML")


def test_hub_task_offline_names_the_task(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hubby.yaml").write_text(
        "task: hubby\ndataset_path: moe-prune-tests/not-cached-anywhere\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\ndoc_to_target: 0\n"
    )
    out = tmp_path / "s.jsonl"
    refused(
        ["--tasks", "hubby", "--include-path", str(tasks), "--log-samples", str(out)],
        "task 'hubby': its data is not available offline",
        out,
    )


def test_without_lm_eval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    refused(["--tasks", "demo"], "pip install 'moe-prune[tasks]'")


def demo_accuracies(folder, limit: int) -> dict[str, float]:
    settings = stage.TaskSettings(list(DEMO), limit=limit, batch_size=32)
    results = stage.run(folder, settings).model.results
    return {task: results[task][key] for task, (key, _) in DEMO.items()}


def test_demo_original_above_chance_and_random_half_masks_below(tmp_path):
    original = demo_accuracies(DEMO_MODEL_DIR, 60)
    for task, (_, chance) in DEMO.items():
        assert original[task] >= chance + 0.25, (task, original[task], chance)
    ckpt = Checkpoint.open(DEMO_MODEL_DIR)
    masked = []
    for seed in range(3):
        rng = random.Random(seed)
        keep = {
            layer: sorted(rng.sample(list(ids), len(ids) // 2)) for layer, ids in ckpt.identity.original_ids.items()
        }
        prune.run(DEMO_MODEL_DIR, DropMask.create(ckpt.identity, keep, "random"), tmp_path / f"r{seed}")
        masked.append(demo_accuracies(tmp_path / f"r{seed}", 60))
    mean_masked = sum(sum(m.values()) for m in masked) / (len(masked) * len(DEMO))
    assert mean_masked < sum(original.values()) / len(DEMO) - 0.05, (original, masked)


# -- task-aware profiling (UNCURL / SEER: statistics of the task's own data) ------------------------------------


def test_profile_on_a_task_uses_its_training_documents(tmp_path):
    from moe_prune.artifacts.stats import Stats
    from moe_prune.demo import DEMO_DIR
    from moe_prune.runtime.data import fixed_chunks, token_stream

    out = tmp_path / "task.npz"
    result = CliRunner().invoke(
        app, ["profile", "--task", "demo_arithmetic", "--samples", "1000", "--seq-len", "64", "--out", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    provenance = Stats.load(out).provenance
    assert provenance["data"] == "task:demo_arithmetic" and provenance["split"] == "train"
    rows = [json.loads(line) for line in (DEMO_DIR / "tasks/data/arithmetic_train.jsonl").read_text().splitlines()]
    texts = [f"{r['context']} {r['choices'][r['gold']]}" for r in rows]  # independent rendering of the docs
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    assert provenance["sequences_available"] == len(fixed_chunks(token_stream(texts, tokenizer), 64))


def test_profile_refuses_to_calibrate_on_the_evaluated_split(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    # Including a shipped YAML is allowed without --trust-remote-code: its `!function` is moe-prune's own.
    (folder / "only_test.yaml").write_text(
        f"include: {DEMO_TASKS_DIR / 'demo_arithmetic.yaml'}\ntask: only_test\n"
        "training_split: null\nfewshot_split: null\n"
    )
    out = tmp_path / "s.npz"
    argv = ["profile", "--task", "only_test", "--include-path", str(folder), "--seq-len", "64", "--out", str(out)]
    result = CliRunner().invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "only_test" in lines[0] and "evaluates" in lines[0]
    assert not out.exists()


# -- a tokenizer without BOS/EOS -----------------------------------------------------------------------------


def test_tokenizer_without_bos_or_eos_scores_like_stock_transformers(tmp_path):
    """lm-eval's prefix and end-of-text tokens come from config.json when the tokenizer names none."""
    copy = tmp_path / "nobos"
    shutil.copytree(DEMO_MODEL_DIR, copy)
    path = copy / "tokenizer_config.json"
    config = json.loads(path.read_text())
    del config["bos_token"], config["eos_token"]
    path.write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(copy)
    assert tokenizer.bos_token_id is None and tokenizer.eos_token_id is None
    limit = 20
    out = eval_json([str(copy), "--tasks", "demo_arithmetic,demo_arithmetic_gen", "--limit", str(limit)])
    predicted = independent_predictions("demo_arithmetic", " ", limit, copy)
    gold = [d["gold"] for d in docs("demo_arithmetic", limit)]
    expected = sum(p == g for p, g in zip(predicted, gold, strict=True)) / limit
    assert out["tasks"]["model"]["results"]["demo_arithmetic"]["acc,none"] == pytest.approx(expected)
    assert "exact_match,strip" in out["tasks"]["model"]["results"]["demo_arithmetic_gen"]
    for name in ("config.json", "generation_config.json"):
        config = json.loads((copy / name).read_text())
        config.update(bos_token_id=None, eos_token_id=None)  # null, not absent: the class has defaults
        (copy / name).write_text(json.dumps(config))
    refused([str(copy), "--tasks", "demo_arithmetic", "--limit", "2"], "neither the tokenizer nor config.json")


# -- task folders are code: refused without --trust-remote-code ----------------------------------------------


@pytest.mark.parametrize("construct", sorted(TASK_CODE))
def test_task_folder_code_runs_only_with_trust_remote_code(tmp_path, construct):
    """The hostile task folders of tests/hostile_tasks.py: refused in one line, and their code really runs
    when trusted (so the refusal is what keeps the marker away)."""
    folder, marker = tmp_path / "tasks", tmp_path / "ran"
    folder.mkdir()
    TASK_CODE[construct](folder, marker)
    argv = ["--tasks", TASK, "--include-path", str(folder), "--limit", "2", "--no-perplexity"]
    refused(argv, f"{folder / TASK}.yaml")
    assert not marker.exists()
    runner.invoke(app, ["eval", *argv, "--trust-remote-code"])
    assert marker.exists()


READERS = {
    "profile --task": lambda stats: ["profile", "--task", TASK, "--seq-len", "32"],
    "profile --data task:": lambda stats: ["profile", "--data", f"task:{TASK}", "--seq-len", "32"],
    "sweep --tasks": lambda stats: [
        *("sweep", "--stats", str(stats), "--criteria", "usage-frequency", "--ratios", "0.5", "--random-seeds", "1"),
        *("--seq-len", "64", "--max-tokens", "256", "--tasks", TASK, "--limit", "2"),
    ],
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_other_task_readers_run_task_folder_code_only_with_trust_remote_code(tmp_path, reader, demo_stats):
    folder, marker, out, stats = tmp_path / "tasks", tmp_path / "ran", tmp_path / "out", tmp_path / "stats.npz"
    folder.mkdir()
    TASK_CODE["function"](folder, marker)
    demo_stats.save(stats)
    argv = [*READERS[reader](stats), "--include-path", str(folder), "--out", str(out)]
    result = runner.invoke(app, argv)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert f"{folder / TASK}.yaml" in lines[0] and "!function" in lines[0]
    assert not marker.exists() and not out.exists()
    result = runner.invoke(app, [*argv, "--trust-remote-code"])
    assert result.exit_code == 0, result.stderr
    assert marker.exists() and out.exists()


def test_code_free_task_folder_scores_like_the_demo_task(tmp_path):
    """The same documents as a JSON-files task with plain templates (no code, no flag): same accuracy."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "plain.yaml").write_text(base_yaml("plain"))
    limit = 12
    out = eval_json(["--tasks", "plain,demo_arithmetic", "--include-path", str(folder), "--limit", str(limit)])
    results = out["tasks"]["model"]["results"]
    assert results["plain"]["acc,none"] == pytest.approx(results["demo_arithmetic"]["acc,none"])
    predicted = independent_predictions("demo_arithmetic", " ", limit)
    gold = [d["gold"] for d in docs("demo_arithmetic", limit)]
    assert results["plain"]["acc,none"] == pytest.approx(
        sum(p == g for p, g in zip(predicted, gold, strict=True)) / limit
    )


def test_sandbox_keeps_loops_and_filters_and_refuses_mutation(tmp_path):
    """lm-eval's ordinary template features render in the sandbox; mutating a document does not."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    fancy = (
        "{% for c in choices %}{{ loop.index }}={{ c | trim }};{% endfor %}{{ context | regex_replace('=', ' = ') }}"
    )
    (folder / "fancy.yaml").write_text(base_yaml("fancy").replace('"{{context}}"', f'"{fancy}"'))
    out = eval_json(["--tasks", "fancy", "--include-path", str(folder), "--limit", "2"])
    assert 0 <= out["tasks"]["model"]["results"]["fancy"]["acc,none"] <= 1
    (folder / "fancy.yaml").write_text(base_yaml("fancy").replace('"{{context}}"', '"{{ choices.append(1) }}"'))
    refused(["--tasks", "fancy", "--include-path", str(folder), "--limit", "2"], "sandbox")


@pytest.mark.parametrize(
    ("yaml", "refusal"),
    [
        ("include: base.yaml\ntask: mine\n", None),  # an include inside the folder: its own YAML is checked
        ("include: missing.yaml\ntask: mine\n", "`include: missing.yaml`: no such file"),
        (f"include: {DEMO_TASKS_DIR / 'demo_records.yaml'}\ntask: mine\n", None),  # shipped: trusted
        ("task: mine\nmetric_list:\n  - metric: bleu\n    hf_evaluate: true\n", "loads the metric through HF evaluate"),
        ("task: mine\nmetric_list:\n  - metric: ./my_metric\n", "`metric_list[0].metric: ./my_metric` is not"),
        ("task: mine\ndataset_path: ./loader.py\n", "python dataset loader script"),
        ("task: mine\ndoc_to_text: !function os.system\n", "`doc_to_text: !function os.system` runs Python"),
    ],
)
def test_task_yaml_code_constructs(tmp_path, yaml, refusal):
    """What check_task_yamls lets through without --trust-remote-code, and its one line for the rest."""
    (tmp_path / "base.yaml").write_text(base_yaml("base"))
    (tmp_path / "mine.yaml").write_text(yaml)
    check_task_yamls(tmp_path, trust_remote_code=True)
    if refusal is None:
        check_task_yamls(tmp_path)
        return
    with pytest.raises(stage.MoePruneError) as caught:
        check_task_yamls(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'mine.yaml'}: ") and refusal in str(caught.value)
