"""Data mixes (`--data SOURCE[:SHARE]`, repeatable), chat records, .txt as one document, and their provenance.

Expected token streams are built here independently: each source tokenized alone with the model's own
tokenizer (documents + EOS), chats rendered with `apply_chat_template` directly.
"""

from __future__ import annotations

import json
import random
import shutil
import string

import pytest
import torch
from helpers import assert_one_line_error
from test_profile import assert_same_stats
from typer.testing import CliRunner

from moe_prune.artifacts.stats import Stats
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.lottery.recipe import LotteryParams
from moe_prune.runtime.data import fixed_chunks, load_texts
from moe_prune.runtime.data_plan import plan_data, read_plan
from moe_prune.runtime.sources import Mix, allocate, parse_source, parse_sources
from moe_prune.runtime.sources import mix as mix_sources
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate, lottery
from moe_prune.stages import profile as stage

SEQ = 16
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
CHATS = [
    [{"role": "user", "content": f"question {i}: {'ab' * i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    for i in range(12)
]


def load_mix(specs: list[str], tok, budget: int, unit: int = 1) -> Mix:
    """The mixed stream of `specs` for `budget` tokens: the data plan's sources through the mixer."""
    plan = plan_data(specs, budget, unit=unit)
    return mix_sources(read_plan(plan), tok, plan.tokens, unit=unit)


def tokenizer_of(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def words(seed: int, count: int, alphabet: str = string.ascii_lowercase) -> str:
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))) for _ in range(count))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """prose.txt (one document with blank lines), code.jsonl (plain records), chat.jsonl (`messages`)."""
    root = tmp_path_factory.mktemp("mix")
    prose = "\n\n".join(f"{words(i, 30)}.\n{words(100 + i, 12)}" for i in range(12)) + "\n"
    (root / "prose.txt").write_text(prose)
    code = [f"def f{i}(x):\n    return x * {i} + {words(200 + i, 3, string.digits)}" for i in range(40)]
    (root / "code.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in code))
    (root / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    return root


@pytest.fixture(scope="module")
def chat_model(tiny, tmp_path_factory):
    """The tiny mixtral with a chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny("mixtral"), folder)
    tok = tokenizer_of(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def stream(tok, texts: list[str]) -> list[int]:
    """Independent token stream: each document alone, then EOS."""
    return [i for t in texts for i in [*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id]]


def streams(tok, files) -> dict[str, list[int]]:
    code = [json.loads(line)["text"] for line in (files / "code.jsonl").read_text().splitlines()]
    alone = {"prose": stream(tok, [(files / "prose.txt").read_text()]), "code": stream(tok, code)}
    if tok.chat_template:
        alone["chat"] = stream(tok, [tok.apply_chat_template(m, tokenize=False) for m in CHATS])
    return alone


def is_aligned_window(window: list[int], source: list[int]) -> int:
    """The offset of `window` among `source`'s consecutive SEQ-token windows (ValueError if none)."""
    for start in range(0, len(source) - SEQ + 1, SEQ):
        if source[start : start + SEQ] == window:
            return start
    raise ValueError("not a window of the source")


# -- specs and allocation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "source", "share", "count"),
    [
        ("code.jsonl:0.5", "code.jsonl", 0.5, None),
        ("code.jsonl:.25", "code.jsonl", 0.25, None),
        ("code.jsonl:50%", "code.jsonl", 0.5, None),
        ("code.jsonl:20k", "code.jsonl", None, 20_000),
        ("code.jsonl:1.5M", "code.jsonl", None, 1_500_000),
        ("code.jsonl", "code.jsonl", None, None),
        ("allenai/c4:en", "allenai/c4:en", None, None),  # a hub config, not a share
        ("cnn_dailymail:3.0.0", "cnn_dailymail:3.0.0", None, None),
        ("allenai/c4:en:0.5", "allenai/c4:en", 0.5, None),
        ("task:arc_easy", "task:arc_easy", None, None),
        ("task:arc_easy:1.0", "task:arc_easy", 1.0, None),
        ("C:\\data\\corpus.txt", "C:\\data\\corpus.txt", None, None),
        ("C:\\data\\corpus.txt:0.5", "C:\\data\\corpus.txt", 0.5, None),
    ],
)
def test_spec_parsing(text, source, share, count):
    spec = parse_source(text)
    assert (spec.source, None if spec.share is None else float(spec.share), spec.count) == (source, share, count)
    assert spec.given == text


def test_allocation_is_exact_and_adds_up():
    specs = parse_sources(["a.jsonl:0.1", "b.jsonl:0.2", "c.jsonl:0.7"])  # 0.1 + 0.2 + 0.7 is 1 exactly here
    assert allocate(specs, 1000) == [100, 200, 700]
    thirds = allocate(parse_sources(["a.jsonl", "b.jsonl", "c.jsonl"]), 1001)
    assert sum(thirds) == 1001 and max(thirds) - min(thirds) == 1
    # counts first; fractions are of the rest; unshared sources split what fractions leave
    assert allocate(parse_sources(["a.jsonl:300", "b.jsonl:0.5", "c.jsonl"]), 1000) == [300, 350, 350]
    assert allocate(parse_sources(["a.jsonl:300", "b.jsonl:200"]), 1000) == [300, 200]


# -- the mix, token by token ------------------------------------------------------------------------------


def test_shares_give_exactly_the_requested_tokens_per_source(chat_model, files):
    tok = tokenizer_of(chat_model)
    alone = streams(tok, files)
    specs = [f"{files / 'prose.txt'}:0.5", f"{files / 'code.jsonl'}:25%", str(files / "chat.jsonl")]
    mix = load_mix(specs, tok, 800)
    want = {"prose": 400, "code": 200, "chat": 200}
    assert all(len(alone[name]) > n for name, n in want.items())  # every source holds more than its share
    expected = [t for name, n in want.items() for t in alone[name][:n]]
    assert mix.ids.tolist() == expected
    rows = mix.provenance()
    assert [(r["source"], r["tokens"], r["share_of_tokens"]) for r in rows] == [
        (str(files / "prose.txt"), 400, 0.5),
        (str(files / "code.jsonl"), 200, 0.25),
        (str(files / "chat.jsonl"), 200, 0.25),
    ]
    assert [r["format"] for r in rows] == ["text", "text", "chat"]
    assert [(r["share"], r["count"]) for r in rows] == [(0.5, None), (0.25, None), (None, None)]


def test_a_short_source_shrinks_every_share_alike(tiny, files):
    tok = tokenizer_of(tiny("mixtral"))
    alone = streams(tok, files)
    held = len(alone["code"])
    specs = [f"{files / 'prose.txt'}:0.5", f"{files / 'code.jsonl'}:0.5"]
    unit = 7
    mix = load_mix(specs, tok, 4 * held, unit=unit)
    total = 2 * held - (2 * held) % unit  # all of code twice over, rounded down to whole units
    assert total % 2 == 0 and total < 2 * held
    each = total // 2  # both shares kept equal
    assert [r["tokens"] for r in mix.provenance()] == [each, each]
    assert mix.ids.tolist() == alone["prose"][:each] + alone["code"][:each]
    assert len(mix.warnings) == 1 and mix.warnings[0].startswith(f"{specs[1]}: holds only {held:,} tokens")
    with pytest.raises(MoePruneError, match=f"code.jsonl:{held + 1}: holds {held:,} tokens, fewer than the"):
        load_mix([f"{files / 'code.jsonl'}:{held + 1}"], tok, 10 * held)


def test_chat_records_render_with_the_chat_template(chat_model, files, tmp_path):
    tok = tokenizer_of(chat_model)
    assert load_texts(str(files / "chat.jsonl"), tokenizer=tok) == [
        tok.apply_chat_template(m, tokenize=False) for m in CHATS
    ]
    mixed = tmp_path / "mixed.jsonl"  # text and chat records in one file keep their order
    mixed.write_text(json.dumps({"text": "plain"}) + "\n" + json.dumps({"messages": CHATS[1]}) + "\n")
    assert load_texts(str(mixed), tokenizer=tok) == ["plain", tok.apply_chat_template(CHATS[1], tokenize=False)]
    with pytest.raises(MoePruneError, match=r"mixed.jsonl: holds chat records \('messages'\), but the model's"):
        load_texts(str(mixed))


def test_malformed_chat_record_names_file_and_record(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + json.dumps({"messages": [{"content": "x"}]}) + "\n")
    with pytest.raises(MoePruneError, match=r"chat.jsonl: record 2 field 'messages' is not a list of chat messages"):
        load_texts(str(path))


# -- profile -------------------------------------------------------------------------------------------------


def profile_cli(*args: str):
    return CliRunner().invoke(app, ["profile", *args, "--seq-len", str(SEQ)])


def test_profile_mix_windows_come_from_each_source_and_provenance_says_so(chat_model, files, tmp_path, monkeypatch):
    seen = {}
    collect = stage._collect

    def spy(model, config, windows, *args, **kwargs):
        seen["windows"] = windows.clone()
        return collect(model, config, windows, *args, **kwargs)

    monkeypatch.setattr(stage, "_collect", spy)
    out = tmp_path / "s.npz"
    data = ["--data", f"{files / 'prose.txt'}:0.75", "--data", f"{files / 'chat.jsonl'}:0.25"]
    result = profile_cli(str(chat_model), *data, "--samples", "8", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    sources = Stats.load(out).provenance["sources"]
    assert [(s["source"], s["tokens"], s["format"]) for s in sources] == [
        (str(files / "prose.txt"), 96, "text"),
        (str(files / "chat.jsonl"), 32, "chat"),
    ]
    assert json.loads(result.stdout)["provenance"]["data"] == [data[1], data[3]]
    alone = streams(tokenizer_of(chat_model), files)
    windows = seen["windows"].tolist()
    assert len(alone["prose"]) > 4 * 96 and len(alone["chat"]) > 2 * SEQ  # so the windows are a seeded draw
    offsets = [is_aligned_window(w, alone["prose"]) for w in windows[:6]]
    assert offsets == sorted(set(offsets))  # distinct windows of prose.txt, in stream order
    assert offsets != list(range(0, 6 * SEQ, SEQ))  # drawn from the pool, not its first windows
    offsets = [is_aligned_window(w, alone["chat"]) for w in windows[6:]]
    assert offsets == sorted(set(offsets))


def test_one_source_draws_the_windows_it_always_drew(tiny, files):
    """README figures stay: one source without a share gives the windows of the old single-stream draw."""
    folder = tiny("mixtral")
    tok = tokenizer_of(folder)
    ids = torch.tensor(streams(tok, files)["code"])
    chunks = ids[: len(ids) // SEQ * SEQ].view(-1, SEQ)  # the old draw, written out: 5 of all windows, seeded
    old = chunks[torch.randperm(len(chunks), generator=torch.Generator().manual_seed(3))[:5].sort().values]
    assert torch.equal(stage.choose_windows(ids, SEQ, 5, seed=3), old)
    settings = stage.Settings(samples=5, seq_len=SEQ, seed=3, batch_size=5)
    result = stage.run(folder, str(files / "code.jsonl"), settings)
    assert result.stats.provenance["sources"][0]["tokens"] == 5 * SEQ == result.tokens


def test_shards_take_disjoint_windows_of_one_mixed_stream(tiny, files, tmp_path):
    folder = tiny("mixtral")
    data = [f"{files / 'prose.txt'}:0.5", f"{files / 'code.jsonl'}:0.5"]
    settings = stage.Settings(samples=6, seq_len=SEQ, batch_size=1)
    whole = stage.run(folder, data, settings)
    paths, per_source = [], []
    for index in range(2):
        part = stage.run(folder, data, stage.Settings(samples=6, seq_len=SEQ, batch_size=1, shard=(index, 2)))
        per_source.append([s["tokens"] for s in part.stats.provenance["sources"]])
        paths.append(tmp_path / f"part{index}.npz")
        part.stats.save(paths[-1])
    assert per_source == [[48, 0], [0, 48]]  # contiguous slices: the first half is prose, the second code
    assert [s["tokens"] for s in whole.stats.provenance["sources"]] == [48, 48]
    assert_same_stats(stage.combine(paths).arrays, whole.stats.arrays, rtol=1e-9)


# -- .txt as one document --------------------------------------------------------------------------------


def test_eval_reads_a_txt_file_as_one_document_unless_split(tiny, files, monkeypatch):
    folder = tiny("mixtral")
    tok = tokenizer_of(folder)
    scored = []
    nll_sum = evaluate.nll_sum

    def spy(model, chunks, *args, **kwargs):
        scored.append(chunks.clone())
        return nll_sum(model, chunks, *args, **kwargs)

    monkeypatch.setattr(evaluate, "nll_sum", spy)
    raw = (files / "prose.txt").read_text()
    evaluate.run(folder, EvalSpec(data=str(files / "prose.txt"), seq_len=SEQ, batch_size=64))
    assert torch.equal(scored[-1], fixed_chunks(stream(tok, [raw]), SEQ))  # every newline kept, one EOS at the end
    evaluate.run(folder, EvalSpec(data=str(files / "prose.txt"), seq_len=SEQ, batch_size=64, split_on="blank-lines"))
    paragraphs = raw.strip().split("\n\n")
    assert torch.equal(scored[-1], fixed_chunks(stream(tok, paragraphs), SEQ))


def test_documents_joined_without_eos_warn_once(tiny, files, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny("mixtral"), folder)
    tok = tokenizer_of(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    out = tmp_path / "s.npz"
    prose = str(files / "prose.txt")
    result = profile_cli(str(folder), "-d", prose, "--samples", "2", "--out", str(out))
    assert result.exit_code == 0 and "warning" not in result.output  # one document: nothing to separate
    code = str(files / "code.jsonl")  # many documents in each of two sources: joined within and between them
    result = profile_cli(
        str(folder),
        "-d",
        prose,
        "-d",
        code,
        "--split-on",
        "blank-lines",
        "--samples",
        "2",
        "--out",
        str(out),
        "--force",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("no EOS token: documents are joined with nothing between them") == 1, result.output


# -- one-line refusals -----------------------------------------------------------------------------------


# Extra options each command needs to reach its --data checks; nothing else differs between them.
SMALL = {
    "profile": ["--samples", "8", "--seq-len", str(SEQ)],
    "finetune": ["--tokens", "1000", "--seq-len", str(SEQ), "--batch-size", "2", "--eval-tokens", "0"],
}


@pytest.mark.parametrize(
    ("command", "data", "message"),
    [
        ("profile", "-d {code}:0", "--data {code}:0: token count 0 must be at least 1"),
        ("profile", "-d {code}:0.0", "--data {code}:0.0: share 0.0 is not in (0, 1]"),
        ("profile", "-d {code}:-0.5", "--data {code}:-0.5: share -0.5 is not in (0, 1]"),
        ("profile", "-d {code}:1.5", "--data {code}:1.5: share 1.5 is not in (0, 1]"),
        ("profile", "-d {code}:0.6 -d {prose}:0.6", "--data: shares 0.6 + 0.6 add up to 1.2, more than 1"),
        ("profile", "-d {code}:0.3 -d {prose}:0.5", "--data: shares 0.3 + 0.5 add up to 0.8; make them add up to 1"),
        ("profile", "-d {code}:1.0 -d {prose}", "--data: shares add up to 1, leaving nothing for {prose}"),
        ("profile", "-d {code}:20q", "--data {code}:20q: ':20q' is neither a share"),
        ("profile", "-d {code}:half", "--data {code}:half: ':half' is neither a share"),
        ("profile", "-d {code} -d {code}:0.5", "--data {code}: given more than once"),
        ("profile", "-d {missing}:0.5 -d {code}:0.5", "{missing}: data file not found"),
        ("profile", "-d {code}:1M", "token counts add up to 1,000,000, more than the 128 tokens of --samples"),
        ("profile", "-d {chat}", "{chat}: holds chat records ('messages'), but the model's tokenizer has no chat"),
        ("profile", "-d {prose} --split-on lines", "--split-on 'lines': expected none or blank-lines"),
        ("finetune", "-d {prose}:0.5 -d {code}:0.6", "--data: shares 0.5 + 0.6 add up to 1.1, more than 1"),
        ("finetune", "-d {prose}:20q", "':20q' is neither a share"),
        ("finetune", "-d {prose} -d {prose}", "given more than once"),
        ("finetune", "-d {prose}:0.5 -d {missing}:0.5", "{missing}: data file not found"),
        ("finetune", "-d {prose}:5k -d {code}", "token counts add up to 5,000, more than the 992 tokens of --tokens"),
        ("finetune", "-d task:arc_easy", "--data task:NAME: finetune reads files and hub datasets"),
        ("finetune", "-d {prose}:0.5 -d {code}:0.5 --split-on lines", "--split-on 'lines': expected none or"),
        ("finetune", "-d {chat} -d {code} --format completion", "--format completion reads one JSONL file of records"),
        ("finetune", "-d {chat}:1.0 --format chat", "--format chat reads one JSONL file of records"),
    ],
)  # fmt: skip
def test_bad_data_is_one_line_and_writes_nothing(command, data, message, tiny, files, tmp_path):
    names = {"code": files / "code.jsonl", "prose": files / "prose.txt", "chat": files / "chat.jsonl"}
    names["missing"] = tmp_path / "missing.jsonl"
    options = [word.format(**names) for word in data.split()]
    args = [command, str(tiny("mixtral")), *options, *SMALL[command], "--out", str(tmp_path / "out")]
    assert_one_line_error(CliRunner().invoke(app, args), message.format(**names))
    assert list(tmp_path.iterdir()) == []  # no output, no work folder, no temporary


def test_eval_refuses_a_share_in_one_line(tiny, files):
    result = CliRunner().invoke(app, ["eval", str(tiny("mixtral")), "--data", f"{files / 'code.jsonl'}:0.5"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "eval scores one source, without a share" in result.output


# -- lottery ---------------------------------------------------------------------------------------------


def test_lottery_profiles_a_mix_and_records_every_source(tiny, files, tmp_path):
    folder = tiny("mixtral")
    data = [f"{files / 'prose.txt'}:0.5", f"{files / 'code.jsonl'}:0.5"]
    with pytest.raises(MoePruneError, match="task:NAME: lottery reads files and hub datasets"):
        lottery.plan(LotteryParams(str(folder), "activation-norm", "task:arc_easy", finetune=False))
    out = tmp_path / "run"
    args = ["lottery", str(folder), "-c", "activation-norm", "--target-ratio", "0.25", "--rounds", "1"]
    args += ["--no-finetune", "--eval-tokens", "0", "--profile-samples", "4", "--profile-seq-len", str(SEQ)]
    result = CliRunner().invoke(app, [*args, "-d", data[0], "-d", data[1], "-o", str(out)])
    assert result.exit_code == 0, result.output
    recipe = json.loads((out / "recipe.json").read_text())
    assert [d["spec"] for d in recipe["inputs"]["data"]] == data
    assert all(d["sha256"].startswith("sha256:") for d in recipe["inputs"]["data"])
    sources = Stats.load(out / "round-01" / "stats.npz").provenance["sources"]
    assert [s["tokens"] for s in sources] == [2 * SEQ, 2 * SEQ]


def test_eval_split_reaches_a_hub_dataset(tiny, files, monkeypatch):
    """`eval --split` (as the README says): the hub reader gets it (hub itself stubbed: tests run offline)."""
    from moe_prune.runtime import data

    asked = []

    def hub(source, text_field, split):
        asked.append((source, split))
        return [(files / "prose.txt").read_text()]

    monkeypatch.setattr(data, "read_hub", hub)
    args = ["eval", str(tiny("mixtral")), "--data", "org/corpus:en", "--split", "validation", "--seq-len", str(SEQ)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert asked == [("org/corpus:en", "validation")]
