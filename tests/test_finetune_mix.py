"""`finetune --data SOURCE[:SHARE]` repeated: a mix trains each source on exactly its share of the tokens trained.

Expected rows are built here independently: each source tokenized alone with the model's tokenizer
(documents + EOS), its first tokens taken. One source without a share must give the rows finetune always
gave (the README's measurements were made with them): the old computation is spelled out here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from moe_prune.checkpoint.source import Checkpoint
from moe_prune.cli import app
from moe_prune.demo import DEMO_CALIBRATION, DEMO_MODEL_DIR
from moe_prune.errors import MoePruneError
from moe_prune.runtime.data import fixed_chunks, load_texts, token_stream
from moe_prune.runtime.sources import parse_sources
from moe_prune.stages import finetune
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.sft import load_rows
from moe_prune.training.state import work_folder

SEQ = 16
# 2 rows of 16 per step; 1000 tokens are 31 whole steps = 992 tokens trained: a mix is cut to those.
SMALL = dict(seq_len=SEQ, batch_size=2, eval_tokens=0, lr=1e-3)
TOKENS = 1000
TRAINED = 992


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """prose.txt (one document, letters and spaces) and code.jsonl (records of another alphabet)."""
    root = tmp_path_factory.mktemp("ftmix")
    (root / "prose.txt").write_text(" ".join(f"word{i % 97} and more" for i in range(400)) + "\n")
    code = [f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(120)]
    (root / "code.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in code))
    (root / "records.jsonl").write_text(json.dumps({"prompt": "1 + 1 =", "completion": " 2"}) + "\n")
    return root


def stream(tok, texts: list[str]) -> list[int]:
    """Independent token stream: each document alone, then EOS."""
    return [i for t in texts for i in [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]]


def source_streams(tok, files: Path) -> dict[str, list[int]]:
    code = [json.loads(line)["text"] for line in (files / "code.jsonl").read_text().splitlines()]
    return {"prose": stream(tok, [(files / "prose.txt").read_text()]), "code": stream(tok, code)}


@pytest.fixture
def trained_rows(monkeypatch) -> list:
    """The rows each finetune run hands to its training loop, in order of runs."""
    seen = []
    real = finetune.TrainingLoop

    def spy(**kwargs):
        seen.append(kwargs["data"])
        return real(**kwargs)

    monkeypatch.setattr(finetune, "TrainingLoop", spy)
    return seen


def test_one_source_without_a_share_gives_the_rows_finetune_always_gave():
    """The text path as it was before mixes: all chunks of the stream tokenized up to (at least) the budget."""
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    budget, seq_len = 3000, 64
    old = fixed_chunks(token_stream(load_texts(str(DEMO_CALIBRATION), "text", max_chars=budget * 16), tok, budget), 64)
    assert old.numel() > budget  # more than the budget: a mix (cut at exactly the budget) would differ
    for data in (str(DEMO_CALIBRATION), parse_sources([str(DEMO_CALIBRATION)])):  # the library and the stage
        rows = load_rows(data, "text", tok, seq_len, budget, trained=budget - 1000)
        assert rows.sequences.ids.equal(old)
        assert [s["tokens"] for s in rows.sources] == [old.numel()] and rows.sources[0]["share"] is None


def test_one_source_run_trains_on_the_old_rows(tiny, files, trained_rows, tmp_path):
    folder = tiny("mixtral")
    tok = AutoTokenizer.from_pretrained(folder)
    source = str(files / "code.jsonl")
    finetune.run(folder, source, tmp_path / "ft", FinetuneOptions(tokens=TOKENS, **SMALL))
    old = fixed_chunks(token_stream(load_texts(source, "text", max_chars=TOKENS * 16), tok, TOKENS), SEQ)
    assert trained_rows[0].ids.equal(old)


def test_a_mix_trains_each_source_on_exactly_its_share(tiny, files, trained_rows, tmp_path):
    folder = tiny("mixtral")
    tok = AutoTokenizer.from_pretrained(folder)
    data = [f"{files / 'prose.txt'}:0.25", f"{files / 'code.jsonl'}:75%"]
    out = tmp_path / "ft"
    result = finetune.run(folder, data, out, FinetuneOptions(tokens=TOKENS, **SMALL))

    shares = {"prose": TRAINED // 4, "code": TRAINED - TRAINED // 4}
    expected = [i for name, ids in source_streams(tok, files).items() for i in ids[: shares[name]]]
    assert trained_rows[0].ids.flatten().tolist() == expected  # each source's first tokens, in order given
    assert result.tokens_trained == TRAINED and result.epochs == 1.0  # every row trains exactly once
    assert result.data == data
    entry = Checkpoint.open(out).manifest.history[-1]
    for sources in (result.sources, entry["sources"]):
        assert [(s["source"], s["share"], s["tokens"]) for s in sources] == [
            (str(files / "prose.txt"), 0.25, shares["prose"]),
            (str(files / "code.jsonl"), 0.75, shares["code"]),
        ]
    assert entry["data"] == data and entry["options"]["split_on"] == "none"


def test_resume_of_a_mix_is_refused_when_the_shares_or_split_on_change(tiny, files, tmp_path):
    """The same rows asked another way (a count instead of a fraction) or another --split-on is another run."""
    folder = tiny("mixtral")
    prose, code = str(files / "prose.txt"), str(files / "code.jsonl")
    out = tmp_path / "ft"
    saving = FinetuneOptions(tokens=TOKENS, save_every=1, **SMALL)

    def interrupt(p: finetune.Progress) -> None:
        if p.phase == "train" and p.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune.run(folder, [f"{prose}:0.25", f"{code}:0.75"], out, saving, interrupt)
    resume = FinetuneOptions(**{**saving.__dict__, "resume": True})
    for data, options, named in (
        ([f"{prose}:{TRAINED // 4}", code], resume, "shares"),
        (
            [f"{prose}:0.25", f"{code}:0.75"],
            FinetuneOptions(**{**resume.__dict__, "split_on": "blank-lines"}),
            "split_on",
        ),
    ):
        with pytest.raises(MoePruneError, match=f"was saved by another run \\(.*{named}"):
            finetune.run(folder, data, out, options)
    result = finetune.run(folder, [f"{prose}:0.25", f"{code}:0.75"], out, resume)
    assert result.resumed_from == 1 and not work_folder(out).exists()  # saved after step 1


def test_lottery_finetunes_on_its_mix_and_records_both_sources(tiny, files, tmp_path):
    folder = tiny("mixtral")
    data = [f"{files / 'prose.txt'}:0.5", f"{files / 'code.jsonl'}:0.5"]
    out = tmp_path / "run"
    args = ["lottery", str(folder), "-c", "activation-norm", "--target-ratio", "0.25", "--rounds", "1"]
    args += ["--tokens-first", "128", "--seq-len", str(SEQ), "--batch-size", "2", "--eval-tokens", "0"]
    args += ["--profile-samples", "4", "--profile-seq-len", str(SEQ), "--split-on", "blank-lines"]
    result = CliRunner().invoke(app, [*args, "-d", data[0], "-d", data[1], "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["params"]["data"] == data
    assert [d["spec"] for d in recipe["inputs"]["data"]] == data
    entry = Checkpoint.open(out / "round-01" / "finetuned").manifest.history[-1]
    assert entry["data"] == data and entry["options"]["split_on"] == "blank-lines"
    assert [(s["source"], s["tokens"]) for s in entry["sources"]] == [
        (str(files / "prose.txt"), 64),
        (str(files / "code.jsonl"), 64),
    ]
