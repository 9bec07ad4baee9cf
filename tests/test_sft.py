"""`finetune --format chat|completion`: the loss falls on response tokens only, as the mean over a whole step.

The loss and gradient of a step are checked against an independent float64 computation with stock
transformers (tokenized here by the documented rules), with one and two (simulated) processes; prompt
and padding positions carry nothing; both chat renderings (template, plain); one-line refusals of
malformed records; resume; and the demo: SFT on a task's prompt/completion pairs lowers its response loss.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from tiny_models import save_char_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from moe_prune.architectures.config import ModelConfig
from moe_prune.cli import app
from moe_prune.demo import DEMO_DATA_DIR, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.stages import finetune, prune
from moe_prune.training.batches import IGNORE, BatchPlan
from moe_prune.training.loop import TrainingLoop
from moe_prune.training.losses import RouterEntropy, token_cross_entropy
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.sft import load_examples
from moe_prune.training.state import work_folder

SFT_RECORDS = DEMO_DATA_DIR / "sft_records.jsonl"
# Responses of very different lengths: a mean of per-batch means would weigh their tokens differently.
PAIRS = [
    ("The cat sat on the", " mat"),
    ("12 + 30 =", " 42\n13 + 1 = 14\n7 * 3 = 21\n9 - 4 = 5"),
    ("EN: The dog runs.\nKL:", " Pine-ko miloai vo."),
    ("id,name,city,age,active\n7036,Lena Silva,", "Tokyo"),
    ("Once upon a time", " a fox walked to the river and saw a small bird near the old bridge."),
    ("", "Paris is far."),
    ("8 * 4 =", " 32"),
    ("Nora walked to the", " market"),
]
TEMPLATE = (
    "{% for m in messages %}<s>{{ m.role }}\n{{ m.content }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    assert not getattr(tok, "chat_template", None), "the demo tokenizer has no chat template (the plain path)"
    assert tok("", add_special_tokens=True).input_ids == []  # no BOS: the documented rendering is prompt+completion
    return tok


def expected_example(tok, prompt: str, completion: str) -> tuple[list[int], int]:
    """(ids, first response position) by the documented rule: prompt, completion, EOS tokenized apart."""
    head = tok(prompt, add_special_tokens=False).input_ids
    return head + tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id], len(head)


def stock64(folder: Path):
    """The stock transformers model in float64 (eager experts: the grouped matmul takes no float64)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64, experts_implementation="eager")


@pytest.fixture(scope="module")
def per_example(tokenizer) -> list[tuple[float, dict[str, torch.Tensor], int]]:
    """For each of PAIRS: (Σ response-token NLL, its gradient, response tokens), float64 stock model, unpadded."""
    model = stock64(DEMO_MODEL_DIR)
    out = []
    for prompt, completion in PAIRS:
        ids, start = expected_example(tokenizer, prompt, completion)
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        positions = range(max(start, 1), len(ids))
        nll = -sum(logprobs[t - 1, ids[t]] for t in positions)
        model.zero_grad()
        nll.backward()
        out.append((float(nll.detach()), flat({n: p.grad for n, p in model.named_parameters()}), len(positions)))
    return out


class SimulatedProcess:
    """What the loop uses of accelerate, as process `index` of `processes`; the test averages gradients (DDP)."""

    device = torch.device("cpu")

    def __init__(self, index: int, processes: int) -> None:
        self.process_index, self.num_processes = index, processes

    def no_sync(self, model):
        return nullcontext()

    def autocast(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        assert op == "sum"  # the test adds the processes' shares itself
        return tensor


def one_step(rows, batch_size: int, grad_accum: int, process: int, processes: int) -> tuple[float, dict]:
    """One SGD step (lr 1, no clipping) of the real loop on one process: (its loss share, -Δweights = its grad)."""
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = list(before)
    options = FinetuneOptions(
        batch_size=batch_size, grad_accum=grad_accum, lr=1.0, warmup_ratio=0, max_grad_norm=0, format="completion"
    )
    loop = TrainingLoop(
        accelerator=SimulatedProcess(process, processes),
        wrapped=model,
        inner=model,
        config=ModelConfig.load(DEMO_MODEL_DIR / "config.json"),
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data=rows,
        batches=BatchPlan(len(rows), batch_size, grad_accum, processes, seed=0),
        options=options,
        steps=1,
        top_k=(2, 2),
        trainable=names,
        routers=set(),
        selected=set(names),
    )
    losses, _, tokens = loop.run(0, lambda *a: None)
    assert tokens == rows.loss_tokens(torch.arange(len(rows)))  # every process counts the whole step
    return losses[0], {n: before[n] - p.detach() for n, p in model.named_parameters()}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.double().flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize(("batch_size", "grad_accum", "processes"), [(2, 4, 1), (2, 2, 2)])
def test_step_loss_and_gradient_are_the_mean_over_all_response_tokens(
    tokenizer, per_example, tmp_path, batch_size, grad_accum, processes
):
    """One step covers all 8 examples: its loss and gradient equal the independent float64 response-only mean."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    rows, warnings = load_examples(str(data), "completion", tokenizer, seq_len=128)
    assert not warnings and len(rows) == batch_size * grad_accum * processes
    shares = [one_step(rows, batch_size, grad_accum, p, processes) for p in range(processes)]
    loss = sum(share for share, _ in shares)
    grad = sum(flat(g) for _, g in shares) / processes  # DDP averages the processes' gradients

    count = sum(n for _, _, n in per_example)
    assert loss == pytest.approx(sum(nll for nll, _, _ in per_example) / count, rel=1e-5)
    expected = sum(g for _, g, _ in per_example) / count
    error = float((grad - expected).norm() / expected.norm())
    assert error < 1e-4, error

    # The check can tell: a mean of per-example means weighs tokens differently and is far outside the tolerance.
    mean_of_means = sum(g / n for _, g, n in per_example) / len(per_example)
    assert float((mean_of_means - expected).norm() / expected.norm()) > 100 * max(error, 1e-6)


def test_prompt_and_padding_positions_carry_no_loss(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    rows, _ = load_examples(str(data), "completion", tokenizer, seq_len=128)
    ids, targets, mask = rows.batch(torch.arange(len(rows)))
    assert mask is not None and int(mask.sum()) == sum(len(expected_example(tokenizer, *p)[0]) for p in PAIRS)
    for n, pair in enumerate(PAIRS):  # labels: the ids from the completion on, IGNORE before and on padding
        expected, start = expected_example(tokenizer, *pair)
        assert ids[n, : len(expected)].tolist() == expected
        assert targets[n].tolist() == [IGNORE] * start + expected[start:] + [IGNORE] * (ids.shape[1] - len(expected))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(*ids.shape, 50, generator=generator)
    targets = torch.where(targets == IGNORE, IGNORE, targets % 50)  # fit the 50-way random logits
    loss = token_cross_entropy(logits, targets, "sum")
    silent = targets[:, 1:] == IGNORE  # positions predicting a prompt or padding token
    changed = logits.clone()
    changed[:, :-1][silent] = torch.randn(int(silent.sum()), 50, generator=generator) * 10
    assert torch.equal(token_cross_entropy(changed, targets, "sum"), loss)
    changed[:, :-1][~silent] += torch.randn(int((~silent).sum()), 50, generator=generator)
    assert not torch.isclose(token_cross_entropy(changed, targets, "sum"), loss)


def test_router_entropy_penalty_leaves_padding_out(tokenizer, tmp_path):
    """The penalty of a padded batch (mask set as the loop sets it) equals the token-weighted mean over the
    examples run one by one without padding."""
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    rows, _ = load_examples(str(data), "completion", tokenizer, seq_len=128)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    config = ModelConfig.load(DEMO_MODEL_DIR / "config.json")
    expected, tokens = 0.0, 0
    with torch.no_grad(), RouterEntropy(model, config) as entropy:
        for n in range(len(rows)):
            length = int(rows.lengths[n])
            model(input_ids=rows.ids[n : n + 1, :length])
            expected += float(entropy.mean()) * length
            tokens += length
            entropy.clear()
        ids, _, mask = rows.batch(torch.arange(len(rows)))
        entropy.mask = mask.reshape(-1).bool()
        model(input_ids=ids, attention_mask=mask)
        assert float(entropy.mean()) == pytest.approx(expected / tokens, rel=1e-5)


def test_no_eos_ends_plain_examples_with_their_response(tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    rows, _ = load_examples(str(data), "completion", tokenizer, seq_len=128, eos=False)
    for n, pair in enumerate(PAIRS):
        expected, start = expected_example(tokenizer, *pair)
        assert rows.ids[n, : rows.lengths[n]].tolist() == expected[:-1]  # all but the EOS
        assert rows.labels[n, start : rows.lengths[n]].tolist() == expected[start:-1]


def test_chat_without_a_template_is_the_documented_plain_rendering(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "12 + 30 ="},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 8 * 4?"},
        {"role": "assistant", "content": "32"},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    rows, _ = load_examples(str(data), "chat", tokenizer, seq_len=128)
    parts = [
        ("system: Answer briefly.\nuser: 12 + 30 =\nassistant: ", False),
        ("42\n", True),
        ("user: And 8 * 4?\nassistant: ", False),
        ("32\n", True),
    ]
    ids, labels = [], []
    for text, loss in parts:
        part = tokenizer(text, add_special_tokens=False).input_ids
        ids += part
        labels += part if loss else [IGNORE] * len(part)
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    assert rows.ids[0].tolist() == ids and rows.labels[0].tolist() == labels


@pytest.fixture(scope="module")
def templated(tmp_path_factory) -> Path:
    """The demo model whose tokenizer has a chat template (assistant turns end with </s>)."""
    folder = tmp_path_factory.mktemp("templated") / "model"
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)
    model.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_chat_template_assistant_turns_are_the_only_loss(templated, tmp_path):
    tok = AutoTokenizer.from_pretrained(templated)
    messages = [
        {"role": "user", "content": "Where does Lena Silva live?"},
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": "And 8 * 4?"},
        {"role": "assistant", "content": "32, I think."},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "id": 7}])
    rows, _ = load_examples(str(data), "chat", tok, seq_len=256)
    ids, labels = rows.ids[0].tolist(), rows.labels[0].tolist()
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)  # the template's text, whole
    assert all(label in (IGNORE, token) for token, label in zip(ids, labels, strict=True))
    runs = itertools.groupby(zip(ids, labels, strict=True), key=lambda pair: pair[1] != IGNORE)
    spans = [[token for token, _ in run] for loss, run in runs if loss]  # consecutive loss-carrying tokens
    assert [tok.decode(s) for s in spans] == ["Tokyo</s>\n", "32, I think.</s>\n"]


def test_chat_template_finetune_runs_end_to_end(templated, tmp_path):
    records = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in PAIRS]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    options = FinetuneOptions(tokens=2 * 4 * 64, seq_len=64, batch_size=4, lr=1e-3, eval_tokens=0, format="chat")
    result = finetune.run(templated, str(data), tmp_path / "ft", options)
    assert result.steps == 2 and result.format == "chat" and result.loss_tokens > 0
    assert json.loads((tmp_path / "ft" / "moe_prune.json").read_text())["history"][-1]["options"]["format"] == "chat"


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3", "llama4_text", "gpt_oss"])
def test_padded_batches_give_each_family_the_unpadded_loss(model_type, tiny_factory, tmp_path):
    """The first step's loss (8 padded examples, 2 micro-batches) equals the examples scored one by one."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_factory(model_type)[0], folder)
    save_char_tokenizer(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    options = FinetuneOptions(
        tokens=8 * 96, seq_len=96, batch_size=4, grad_accum=2, lr=1e-3, eval_tokens=0, format="completion"
    )
    result = finetune.run(folder, str(data), tmp_path / "ft", options)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in PAIRS:
            ids, start = expected_example(tok, prompt, completion)
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            total -= sum(float(logprobs[t - 1, ids[t]]) for t in range(max(start, 1), len(ids)))
            count += len(ids) - max(start, 1)
    assert result.steps == 1 and result.loss_tokens == count
    assert result.train_loss_first == pytest.approx(total / count, rel=1e-4)


def test_truncation_keeps_the_start_and_skips_examples_without_a_response_token(tokenizer, tmp_path):
    long_prompt = "1 + 1 = 2\n" * 20
    data = write_jsonl(
        tmp_path / "long.jsonl",
        [
            {"prompt": "Nora walked to the", "completion": " market and then home" * 5},
            {"prompt": long_prompt, "completion": " x"},
        ],
    )
    rows, warnings = load_examples(str(data), "completion", tokenizer, seq_len=16)
    full, start = expected_example(tokenizer, "Nora walked to the", " market and then home" * 5)
    assert len(rows) == 1 and rows.ids[0].tolist() == full[:16] and rows.labels[0, start:].tolist() == full[start:16]
    assert any("keep their first 16 tokens" in w for w in warnings)
    assert any("1 example(s) skipped" in w and "line 2" in w for w in warnings)
    with pytest.raises(MoePruneError, match="no example keeps a response token within --seq-len 4"):
        load_examples(str(data), "completion", tokenizer, seq_len=4)


BAD_RECORDS = {
    "not JSON": ('{"prompt": "a", "completion": ', "line 2: the record is not valid JSON"),
    "not an object": ('["a", "b"]', "line 2: expected a JSON object, got a list"),
    "missing field": ('{"prompt": "a"}', "line 2: no field 'completion'"),
    "wrong type": ('{"prompt": 3, "completion": "b"}', "line 2: field 'prompt' must be a string, not an integer"),
    "empty response": ('{"prompt": "a", "completion": "  "}', "line 2: field 'completion' is empty"),
    "chat record": ('{"messages": []}', "line 2: no field 'prompt' (a chat record? use --format chat)"),
}
BAD_CHATS = {
    "no messages": ('{"prompt": "a", "completion": "b"}', "no field 'messages' (a prompt/completion record?"),
    "not a list": ('{"messages": "hi"}', "line 2: field 'messages' must be a list, not a string"),
    "content type": (
        '{"messages": [{"role": "user", "content": ["x"]}]}',
        "message 1 field 'content' must be a string",
    ),
    "no role": ('{"messages": [{"content": "x"}]}', "line 2: message 1 has no field 'role'"),
    "ends with user": ('{"messages": [{"role": "user", "content": "x"}]}', "must end with an assistant message"),
    "empty assistant": ('{"messages": [{"role": "assistant", "content": ""}]}', "message 1 (assistant) is empty"),
}


@pytest.mark.parametrize(
    ("fmt", "line", "message"),
    [("completion", *v) for v in BAD_RECORDS.values()] + [("chat", *v) for v in BAD_CHATS.values()],
    ids=[*BAD_RECORDS, *BAD_CHATS],
)
def test_malformed_records_are_one_line_naming_file_and_line(tmp_path, fmt, line, message):
    good = {
        "completion": '{"prompt": "a", "completion": "b"}',
        "chat": '{"messages": [{"role": "assistant", "content": "b"}]}',
    }
    data = tmp_path / "data.jsonl"
    data.write_text(good[fmt] + "\n" + line + "\n")
    out = tmp_path / "ft"
    result = CliRunner().invoke(
        app, ["finetune", "--out", str(out), "--format", fmt, "--data", str(data), "--tokens", "4k"]
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert f"{data}: " in lines[0] and message in lines[0], lines[0]
    assert not out.exists() and not work_folder(out).exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "completion"], "--format completion needs --data FILE"),
        (["--format", "jsonl"], "--format jsonl: use one of text, chat, completion"),
        (["--format", "chat", "--data", "org/dataset"], "org/dataset: not a file"),
    ],
)
def test_format_option_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["finetune", "--out", str(tmp_path / "ft"), *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.stderr


def test_resume_of_an_sft_run_equals_the_uninterrupted_run(tmp_path):
    from helpers import tensor_bytes

    options = FinetuneOptions(
        tokens=6 * 4 * 128, seq_len=128, batch_size=2, grad_accum=2, lr=1e-3, eval_tokens=0, format="completion"
    )
    whole = finetune.run(DEMO_MODEL_DIR, str(SFT_RECORDS), tmp_path / "whole", options)
    assert whole.steps == 6 and whole.loss_tokens == 6 * 4 * 2  # each record's answer is one token, then EOS

    def interrupt(p: finetune.Progress) -> None:
        if p.phase == "train" and p.step == 3:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    saving = FinetuneOptions(**{**options.__dict__, "save_every": 2})
    with pytest.raises(KeyboardInterrupt):
        finetune.run(DEMO_MODEL_DIR, str(SFT_RECORDS), out, saving, interrupt)
    as_text = FinetuneOptions(**{**saving.__dict__, "format": "text", "text_field": "prompt", "resume": True})
    with pytest.raises(MoePruneError, match="another run"):
        finetune.run(DEMO_MODEL_DIR, str(SFT_RECORDS), out, as_text)
    result = finetune.run(DEMO_MODEL_DIR, str(SFT_RECORDS), out, FinetuneOptions(**{**saving.__dict__, "resume": True}))
    assert result.resumed_from == 2
    assert tensor_bytes(out) == tensor_bytes(tmp_path / "whole")


def test_sft_on_demo_records_lowers_their_held_out_response_loss(pruned_demo, tokenizer, tmp_path):
    """Held-out = the first 16 records scored on response tokens; `before` equals an independent computation."""
    records = [json.loads(line) for line in SFT_RECORDS.read_text().splitlines()]
    held_out = write_jsonl(tmp_path / "held_out.jsonl", records[:16])
    train = write_jsonl(tmp_path / "train.jsonl", records[16:])
    options = FinetuneOptions(
        tokens=24 * 8 * 80,
        seq_len=80,
        batch_size=8,
        lr=1e-3,
        eval_tokens=16 * 80,
        eval_data=str(held_out),
        format="completion",
    )
    result = finetune.run(pruned_demo, str(train), tmp_path / "ft", options)
    model = stock64(pruned_demo)
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records[:16]:
            ids, start = expected_example(tokenizer, r["prompt"], r["completion"])
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
            total -= sum(float(logprobs[t - 1, ids[t]]) for t in range(start, len(ids)))
            count += len(ids) - start
    assert result.eval_format == "completion" and result.before.loss == pytest.approx(total / count, rel=1e-5)
    assert result.after.loss < result.before.loss - 1.0, (result.before.loss, result.after.loss)


def test_shipped_sft_data_is_what_the_script_builds(tmp_path):
    for task in ("records", "arithmetic"):
        out = tmp_path / f"{task}.jsonl"
        script = Path(__file__).parents[1] / "scripts" / "build_demo_sft.py"
        subprocess.run(
            [sys.executable, str(script), "--task", task, "--out", str(out)], check=True, capture_output=True
        )
        assert out.read_bytes() == (DEMO_DATA_DIR / f"sft_{task}.jsonl").read_bytes()
        test = {
            json.loads(line)["context"]
            for line in (DEMO_DATA_DIR.parent / "tasks" / "data" / f"{task}_test.jsonl").read_text().splitlines()
        }
        assert not test & {json.loads(line)["prompt"] for line in out.read_text().splitlines()}


@pytest.mark.slow
def test_sft_raises_the_records_accuracy_of_the_half_pruned_demo_model(demo_stats, tmp_path):
    """The README's demo measurement, smaller: SFT on records prompt/completion pairs (never the test split)."""
    pytest.importorskip("lm_eval")
    from moe_prune.scoring.selection import Budget
    from moe_prune.stages import tasks
    from moe_prune.stages.score import score

    mask, _ = score(demo_stats, None, "soft-counts", budget=Budget(ratio=0.5))
    prune.run(DEMO_MODEL_DIR, mask, tmp_path / "p50")
    options = FinetuneOptions(tokens=50_000, seq_len=128, lr=3e-4, eval_tokens=0, format="completion", eos=False)
    finetune.run(tmp_path / "p50", str(SFT_RECORDS), tmp_path / "sft", options)

    def accuracy(folder: Path) -> float:
        settings = tasks.TaskSettings(["demo_records"], batch_size=32)
        return tasks.run(folder, settings).model.results["demo_records"]["acc,none"]

    before, after = accuracy(tmp_path / "p50"), accuracy(tmp_path / "sft")
    print(f"records accuracy of the half-pruned demo model: {before:.3f} -> {after:.3f} after SFT")
    assert after > before + 0.1, (before, after)
