"""Text loading, token streams and fixed chunks (`moe_prune.runtime.data`)."""

from __future__ import annotations

import csv
import itertools
import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.runtime import data, data_files
from moe_prune.runtime.data import Truncated, clip_seq_len, fixed_chunks, load_texts, token_stream

DOCS = ["first document\nwith two lines", "second, with a comma", "third"]


class OrdTokenizer:
    """One token per character (its code point); counts how many documents it was asked to encode."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.encoded = 0

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        assert not add_special_tokens
        self.encoded += len(texts)
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def write(path, content: str):
    path.write_text(content, encoding="utf-8")
    return str(path)


def test_txt_is_one_document_exactly_as_written(tmp_path):
    """Running text read as running text: blank lines, indentation and the final newline all kept."""
    raw = "\n\n" + "\n \t\n".join(DOCS) + "\n\n\n  indented\n"
    for suffix in (".txt", ".md", ".text"):
        assert load_texts(write(tmp_path / f"a{suffix}", raw)) == [raw]


def test_txt_split_on_blank_lines(tmp_path):
    source = write(tmp_path / "a.txt", "\n\n" + "\n \t\n".join(DOCS) + "\n\n\n")
    assert load_texts(source, split_on="blank-lines") == DOCS


def test_txt_split_on_blank_lines_keeps_inner_newlines_and_indentation(tmp_path):
    paragraphs = ["def f():\n    return 1", "    indented first line\nsecond", "last"]
    source = write(tmp_path / "a.txt", "\r\n\r\n".join(p.replace("\n", "\r\n") for p in paragraphs) + "\n")
    got = load_texts(source, split_on="blank-lines")
    assert [g.replace("\r\n", "\n") for g in got] == paragraphs


def test_txt_without_blank_lines_is_one_document_either_way(tmp_path):
    source = write(tmp_path / "a.txt", "line one\nline two\n")
    assert load_texts(source, split_on="blank-lines") == ["line one\nline two"]
    assert load_texts(source) == ["line one\nline two\n"]


def test_unknown_split_on_is_refused(tmp_path):
    with pytest.raises(MoePruneError, match="--split-on 'lines': expected none or blank-lines"):
        load_texts(write(tmp_path / "a.txt", "x"), split_on="lines")


def test_jsonl_reads_text_field_and_skips_blank_lines(tmp_path):
    lines = [json.dumps({"body": d, "domain": "x"}) for d in DOCS]
    source = write(tmp_path / "a.jsonl", "\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    assert load_texts(source, text_field="body") == DOCS


@pytest.mark.parametrize("wrap", [lambda r: r, lambda r: {"data": r}])
def test_json_list_or_data_object(tmp_path, wrap):
    source = write(tmp_path / "a.json", json.dumps(wrap([{"text": d} for d in DOCS])))
    assert load_texts(source) == DOCS


def test_json_list_of_strings(tmp_path):
    assert load_texts(write(tmp_path / "a.json", json.dumps(DOCS))) == DOCS


def test_csv_column_with_embedded_newlines(tmp_path):
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([i, d] for i, d in enumerate(DOCS))
    assert load_texts(str(tmp_path / "a.csv")) == DOCS


def test_parquet_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "a.parquet")
    assert load_texts(str(tmp_path / "a.parquet")) == DOCS


def test_max_chars_cuts_the_document_that_crosses_it(tmp_path):
    source = write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": d}) for d in DOCS))
    got = load_texts(source, max_chars=len(DOCS[0]) + 3)
    assert got == [DOCS[0], DOCS[1][:3]]
    assert not isinstance(got[0], Truncated) and isinstance(got[1], Truncated)
    assert load_texts(source, max_chars=len(DOCS[0])) == DOCS[:1]


def test_max_chars_cuts_a_one_document_text_file(tmp_path):
    """A huge .txt is one document: it is cut, not tokenized whole, and the cut gets no EOS."""
    source = write(tmp_path / "a.txt", "abcdefghij" * 100)
    got = load_texts(source, max_chars=25)
    assert got == ["abcdefghij" * 2 + "abcde"] and isinstance(got[0], Truncated)
    assert token_stream(got, OrdTokenizer()).tolist() == [ord(c) for c in got[0]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", " \n\n \n", "contains no text"),
        ("empty.jsonl", "\n\n", "contains no text"),
        ("empty.json", "[]", "contains no text"),
        ("empty.csv", "text\n", "contains no text"),
        ("blank.jsonl", json.dumps({"text": "   "}), "contains no text"),
        ("nofield.jsonl", json.dumps({"body": "x"}), "record 1 has no field 'text'"),
        ("nofield.json", json.dumps([{"text": "x"}, {"body": "y"}]), "record 2 has no field 'text'"),
        ("nofield.csv", "body\nx\n", "no column 'text'"),
        ("badline.jsonl", '{"text": "a"}\n{oops\n', "line 2: the record is not valid JSON"),
        ("bad.json", "{oops", "not valid JSON"),
        ("object.json", json.dumps({"rows": []}), "expected a JSON list"),
        ("number.jsonl", json.dumps({"text": 3}), "is int, not text"),
        ("data.xml", "<a/>", "unknown data format .xml"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    source = write(tmp_path / name, content)
    with pytest.raises(MoePruneError, match=message) as info:
        load_texts(source)
    assert str(info.value).startswith(source)


def test_parquet_without_the_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(MoePruneError, match=r"no column 'text'.*body"):
        load_texts(str(tmp_path / "a.parquet"))


def test_empty_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "a.parquet")
    with pytest.raises(MoePruneError, match="contains no text"):
        load_texts(str(tmp_path / "a.parquet"))


def test_corrupt_parquet(tmp_path):
    source = write(tmp_path / "a.parquet", "not parquet at all")
    with pytest.raises(MoePruneError, match="not a readable parquet file"):
        load_texts(source)


def test_not_utf8(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(MoePruneError, match="not UTF-8"):
        load_texts(str(tmp_path / "a.txt"))


@pytest.mark.parametrize("source", ["missing.jsonl", "./missing", "/no/such/dir/file"])
def test_missing_file(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MoePruneError, match="data file not found"):
        load_texts(source)


def test_folder_is_refused(tmp_path):
    with pytest.raises(MoePruneError, match="is a folder"):
        load_texts(str(tmp_path))


def test_hub_dataset_in_offline_mode_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(MoePruneError, match=r"^no-such-org/no-such-dataset: .*offline mode"):
        load_texts("no-such-org/no-such-dataset")


def test_unreachable_hub_is_one_line_with_the_cause_kept(tmp_path, monkeypatch):
    """No retries, no logging: one quick question to the hub; the network error stays chained for debugging."""
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cause = ConnectionError("Name or service not known")

    def unreachable(self, *args, **kwargs):
        raise cause

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(MoePruneError, match=r"could not be reached .*Name or service not known") as info:
        load_texts("no-such-org/no-such-dataset")
    assert "\n" not in str(info.value) and info.value.__cause__ is cause


@pytest.mark.parametrize("max_chars", [None, 95])
def test_an_endless_hub_stream_stops_at_the_character_budget(tmp_path, monkeypatch, max_chars):
    """A streamed dataset is read lazily and cut at `max_chars` (HUB_DEFAULT_MAX_CHARS when not given)."""
    import datasets
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, *a, **k: None)
    monkeypatch.setattr(data, "HUB_DEFAULT_MAX_CHARS", 60)
    read = []

    def endless(*args, **kwargs):
        for n in itertools.count():
            read.append(n)
            yield {"text": f"record {n:03d}"}  # 10 characters

    monkeypatch.setattr(datasets, "load_dataset", endless)
    texts = load_texts("some-org/endless", max_chars=max_chars)
    budget = max_chars or 60
    assert sum(map(len, texts)) == budget and len(read) == -(-budget // 10)
    assert texts[0] == "record 000" and isinstance(texts[-1], Truncated) == (budget % 10 != 0)


def test_unknown_hub_dataset_says_so(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def missing(self, *args, **kwargs):
        raise RepositoryNotFoundError.__new__(RepositoryNotFoundError)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", missing)
    with pytest.raises(MoePruneError, match="no such dataset on the hub"):
        load_texts("no-such-org/no-such-dataset")


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl", "a.csv"])
def test_binary_file_with_nul_bytes_is_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"text\x00\x00\x01\x02 more")
    with pytest.raises(MoePruneError, match="NUL bytes at offset 4; a binary file") as info:
        load_texts(str(tmp_path / name))
    assert str(info.value).startswith(str(tmp_path / name))


def test_bad_jsonl_line_names_line_number_and_cause(tmp_path):
    source = write(tmp_path / "a.jsonl", '{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(MoePruneError, match=r"a.jsonl: line 4: the record is not valid JSON \(") as info:
        load_texts(source)
    assert info.value.__cause__ is not None


def test_token_stream_appends_eos_after_every_document():
    expected = [i for d in DOCS for i in [*map(ord, d), OrdTokenizer.eos_token_id]]
    assert token_stream(DOCS, OrdTokenizer()).tolist() == expected


def test_token_stream_without_eos_joins_documents_and_warns():
    tokenizer = OrdTokenizer()
    tokenizer.eos_token_id = None
    with pytest.warns(MoePruneWarning, match="no EOS token: documents are joined with nothing between them"):
        assert token_stream(DOCS, tokenizer).tolist() == [ord(c) for c in "".join(DOCS)]


def test_one_document_needs_no_separator_and_no_warning():
    tokenizer = OrdTokenizer()
    tokenizer.eos_token_id = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert token_stream(DOCS[:1], tokenizer).tolist() == [ord(c) for c in DOCS[0]]


def test_token_stream_stops_tokenizing_once_max_tokens_exist():
    tokenizer = OrdTokenizer()
    ids = token_stream(DOCS * 10, tokenizer, max_tokens=len(DOCS[0]) + 2, batch=1)
    assert tokenizer.encoded == 2
    assert ids.tolist() == token_stream(DOCS[:2], OrdTokenizer()).tolist()


def test_fixed_chunks_are_consecutive_windows_without_the_ragged_tail():
    ids = torch.arange(23)
    chunks = fixed_chunks(ids, 5)
    assert chunks.dtype == torch.long
    assert chunks.shape == (4, 5)
    assert [row.tolist() for row in chunks] == [list(range(s, s + 5)) for s in range(0, 20, 5)]


def test_fixed_chunks_respect_max_tokens():
    assert fixed_chunks(list(range(100)), 8, max_tokens=20).tolist() == [list(range(8)), list(range(8, 16))]


def test_fixed_chunks_errors():
    with pytest.raises(MoePruneError, match=r"^corpus.txt: has 7 tokens, fewer than one sequence of 8"):
        fixed_chunks(torch.arange(7), 8, source="corpus.txt")
    with pytest.raises(MoePruneError, match="max tokens 5 is fewer than one sequence of 8"):
        fixed_chunks(torch.arange(50), 8, max_tokens=5)
    with pytest.raises(MoePruneError, match="at least 2"):
        fixed_chunks(torch.arange(50), 1)


def test_clip_seq_len_to_context():
    config = SimpleNamespace(max_position_embeddings=64)
    assert clip_seq_len(256, config) == 64
    assert clip_seq_len(32, config) == 32
    assert clip_seq_len(256, SimpleNamespace()) == 256


# ---- bounded reading (issue #19) ------------------------------------------------------------------------------


def test_a_device_or_pipe_is_refused_before_reading(tmp_path):
    """A symlink to /dev/zero never ends and a pipe blocks: both are refused in one line naming the file."""
    import os

    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.jsonl")
    for name in ("zero.txt", "pipe.jsonl"):
        with pytest.raises(MoePruneError, match="not a regular file") as info:
            load_texts(str(tmp_path / name), max_chars=100)
        assert str(info.value).startswith(str(tmp_path / name))


def test_reading_stops_at_what_the_run_can_use(tmp_path, monkeypatch):
    """Bytes past the budget are never read: a bad byte there goes unseen, and is found when all is read."""
    monkeypatch.setattr(data_files, "READ_BLOCK", 16)
    (tmp_path / "a.txt").write_bytes(b"abcdefghij" * 10 + b"\xff")
    got = load_texts(str(tmp_path / "a.txt"), max_chars=20)
    assert got == ["abcdefghij" * 2] and isinstance(got[0], Truncated)
    with pytest.raises(MoePruneError, match="invalid byte at offset 100"):
        load_texts(str(tmp_path / "a.txt"))
    (tmp_path / "a.jsonl").write_bytes(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in DOCS) + b"{bad\n")
    assert load_texts(str(tmp_path / "a.jsonl"), max_chars=len("".join(DOCS))) == DOCS


def test_offsets_of_bad_bytes_count_from_the_start_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "READ_BLOCK", 7)
    (tmp_path / "a.txt").write_bytes("é".encode() * 20 + b"\xc3(" + b"x" * 30)
    with pytest.raises(MoePruneError, match="invalid byte at offset 40"):
        load_texts(str(tmp_path / "a.txt"))
    (tmp_path / "b.txt").write_bytes(b"y" * 33 + b"\x00")
    with pytest.raises(MoePruneError, match="NUL bytes at offset 33"):
        load_texts(str(tmp_path / "b.txt"))


@pytest.mark.parametrize("block", [1, 5, 64])
def test_blank_line_paragraphs_read_in_blocks_equal_the_whole_split(tmp_path, monkeypatch, block):
    import random

    rng = random.Random(block)
    parts = ["word", " ", "\n", "\n\n", "\n \t\n", "  indented", "\r\n", "\n\n\n"]
    raw = "".join(rng.choice(parts) for _ in range(3000))
    source = write(tmp_path / "a.txt", raw)
    expected = [p for p in data_files.split_text(raw, "blank-lines") if p.strip()]
    monkeypatch.setattr(data_files, "READ_BLOCK", block)
    assert load_texts(source, split_on="blank-lines") == expected


def test_blank_line_reading_stops_inside_a_paragraph_longer_than_the_run_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "READ_BLOCK", 16)
    (tmp_path / "a.txt").write_bytes(b"b\n\n" + b"a" * 400 + b"\xff")
    got = load_texts(str(tmp_path / "a.txt"), max_chars=20, split_on="blank-lines")
    assert got == ["b", "a" * 19] and isinstance(got[1], Truncated)


def test_a_jsonl_line_longer_than_the_run_reads_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "LINE_FLOOR_CHARS", 100)
    source = write(tmp_path / "a.jsonl", json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "x" * 200}) + "\n")
    assert load_texts(source, max_chars=14) == ["a", "x" * 13]  # line 2 has 212 characters, the limit 16 x 14
    with pytest.raises(MoePruneError, match=r"a.jsonl: line 2 is longer than 100 characters"):
        load_texts(source, max_chars=2)  # "a" and the start of line 2 (whose 212 characters are more than 100)


def test_a_json_file_over_its_cap_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "JSON_FLOOR_BYTES", 50)
    source = write(tmp_path / "a.json", json.dumps(DOCS * 3))
    assert load_texts(source, max_chars=100) == [*DOCS, DOCS[0], DOCS[1][:17]]
    with pytest.raises(MoePruneError, match=r"a.json: \d+ bytes of JSON, more than the 50 .*\.jsonl"):
        load_texts(source, max_chars=1)


def test_csv_field_over_the_csv_limit_is_one_line(tmp_path):
    source = write(tmp_path / "a.csv", 'text\nshort\n"' + "x" * 140_000 + '"\n')
    with pytest.raises(MoePruneError, match=r"a.csv: line \d+: not readable CSV \(field larger than field limit"):
        load_texts(source)
    assert load_texts(source, max_chars=3) == ["sho"]  # the long row lies past what the run reads


def test_parquet_row_groups_are_checked_before_reading_and_read_until_enough(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} " + "y" * 50 for i in range(40)]
    pq.write_table(pa.table({"text": texts, "other": ["z" * 5000] * 40}), tmp_path / "a.parquet", row_group_size=10)
    source = str(tmp_path / "a.parquet")
    assert load_texts(source) == texts
    monkeypatch.setattr(data_files, "PARQUET_FLOOR_BYTES", 2000)  # one group's text column is ~600 bytes
    assert load_texts(source, max_chars=10) == [texts[0][:10]]
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or real(self, i, **kw))
    load_texts(source, max_chars=12 * 57)
    assert read == [0, 1]
    monkeypatch.setattr(data_files, "PARQUET_FLOOR_BYTES", 100)
    with pytest.raises(MoePruneError, match=r"a.parquet: row group 0 holds \d+ bytes of column 'text'"):
        load_texts(source, max_chars=1)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": "user: hi"}, "record 1 field 'messages' is str, not a list of chat messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "message 1 has 'content' of type int, not text"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "'content' of type list, not text"),
        ({"messages": [{"role": "user"}]}, "message 1 has 'content' of type NoneType"),
    ],
)
def test_malformed_chats_are_refused_in_one_line(tmp_path, record, message):
    source = write(tmp_path / "a.jsonl", json.dumps(record) + "\n")
    with pytest.raises(MoePruneError, match=re.escape(message)) as info:
        load_texts(source)
    assert str(info.value).startswith(source) and "\n" not in str(info.value)


# ---- streamed tokenization: the ids of one-piece tokenization --------------------------------------------------


def _bpe(kind: str):
    """A small BPE tokenizer trained here: byte-level (GPT-2 style) or metaspace (SentencePiece/Llama style)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "byte-level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"], initial_alphabet=alphabet)
    tok.train_from_iterator([_text(1, 3000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _text(seed: int, words: int, runs: bool = True) -> str:
    """Words, punctuation, emoji and blank lines; with `runs`, runs of spaces and newlines longer than a seam's
    margin, where windows disagree and must grow."""
    import random

    rng = random.Random(seed)
    vocab = ["the", "trader", "sold", "crates", "at", "dawn", "déjà", "vu", "🙂", "x" * 40, "1234", "(", "):", "\t"]
    seps = [" ", " ", " ", "  ", "\n", "\n\n", "", "    ", " " * 150, "\n" * 120]  # runs longer than a seam margin
    seps = seps if runs else seps[:-2]
    return "".join(rng.choice(vocab) + rng.choice(seps) for _ in range(words))


def _demo_tokenizer():
    from transformers import AutoTokenizer

    from moe_prune.demo import DEMO_MODEL_DIR

    return AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)


@pytest.fixture(scope="module", params=["demo", "byte-level", "metaspace"])
def fast_tokenizer(request):
    return _demo_tokenizer() if request.param == "demo" else _bpe(request.param)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_piecewise_ids_equal_one_piece_tokenization_where_naive_cuts_do_not(fast_tokenizer):
    text = _text(2, 6000)
    whole = _ids(fast_tokenizer, text)
    piece, overlap = 1500, 256
    cuts, at = [0], 0
    while at < len(text):
        at = data._cut(text, at + piece, at + piece // 2)
        cuts.append(at)
    naive = [i for a, b in itertools.pairwise(cuts) for i in _ids(fast_tokenizer, text[a:b])]
    assert naive != whole  # the seams matter for this tokenizer and text
    assert data.piecewise_ids(text, fast_tokenizer, None, piece, overlap) == whole
    for limit in (1, 999, len(whole) - 1, len(whole), len(whole) + 5):
        assert data.piecewise_ids(text, fast_tokenizer, limit, piece, overlap) == whole[:limit]


def test_a_seam_without_agreement_grows_the_window_and_stays_exact(fast_tokenizer, monkeypatch):
    text = _text(3, 3000)
    real, calls = data._seam, []

    def stubborn(*args):
        calls.append(1)
        return None if len(calls) % 3 else real(*args)

    monkeypatch.setattr(data, "_seam", stubborn)
    assert data.piecewise_ids(text, fast_tokenizer, None, 1000, 200) == _ids(fast_tokenizer, text)
    assert len(calls) > 6


class _Spy:
    """A fast tokenizer that records the longest text it was asked to encode at once."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest, self.total = tokenizer, 0, 0

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, texts, **kwargs):
        lengths = [len(t) for t in ([texts] if isinstance(texts, str) else texts)]
        self.longest, self.total = max(self.longest, *lengths), self.total + sum(lengths)
        return self.tokenizer(texts, **kwargs)


def test_token_stream_tokenizes_a_long_document_in_pieces_and_stops_at_max_tokens(monkeypatch):
    tokenizer = _demo_tokenizer()
    monkeypatch.setattr(data, "PIECE_CHARS", 2000)
    monkeypatch.setattr(data, "SEAM_CHARS", 300)
    text = _text(4, 8000, runs=False)
    whole = _ids(tokenizer, text)
    spy = _Spy(tokenizer)
    ids = token_stream(["short one", text, "after"], spy, batch=2).tolist()
    eos = tokenizer.eos_token_id
    assert ids == [*_ids(tokenizer, "short one"), eos, *whole, eos, *_ids(tokenizer, "after"), eos]
    assert spy.longest <= 2000 + 300
    spy = _Spy(tokenizer)
    cut = token_stream([Truncated(text)], spy, max_tokens=3000, batch=2).tolist()
    assert cut == whole[:3000]
    assert spy.longest <= 2000 + 300 and spy.total < len(text) // 2  # the rest of the text is never tokenized
