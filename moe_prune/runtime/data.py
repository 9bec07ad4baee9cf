"""Text data for forward passes: read documents, tokenize them into one stream, cut fixed-length chunks.

Shared by `eval` (perplexity) and `profile` (routing statistics), so both see the same tokens for
the same file. Everything here is deterministic: file order is kept, nothing is shuffled.

Local files, by suffix:
  .txt / .text / .md  the whole file is ONE document, exactly as written (newlines and all): running
                      text read as running text. `split_on="blank-lines"` makes each blank-line-separated
                      paragraph a document (inner newlines kept); documents are then joined by EOS.
  .jsonl              one JSON record per line; the document is `record[text_field]`, or a chat
                      (`record["messages"]`, a list of {role, content}) when the record has no text field.
  .json               a list of records (or of strings), or an object whose "data" holds that list.
  .parquet / .csv     one row per document; the document is the `text_field` column (parquet: or `messages`).
Anything else that is not an existing path is tried as a hub dataset id (`org/name`, optionally
`org/name:config`), streamed so that a huge corpus is never downloaded whole.

Reading is bounded: only regular files are read (a device such as a symlink to /dev/zero, or a pipe, is
refused), block by block and lazily, so reading stops once `max_chars` characters are collected; a JSONL
or CSV line, a .json file and a parquet row group (its uncompressed size, from the file's metadata, before
it is read) may hold LINE_CHARS_PER_CHAR characters per wanted one (at least their floors) and are
refused beyond. A document longer than PIECE_CHARS is tokenized piece by piece (`piecewise_ids`), with
the ids of one-piece tokenization, and only until the stream holds `max_tokens`.

Chats are kept as `Chat` documents until `render` writes them out with the model's own chat template
(`tokenizer.apply_chat_template(messages, tokenize=False)`): the text the model sees in chat use. A
tokenizer without a template is refused (one line naming the file): a made-up format would calibrate
on text the model never sees.
"""

from __future__ import annotations

import codecs
import csv
import itertools
import re
import stat
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from moe_prune.artifacts.common import describe, parse_json
from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.io.hub import HUB_TIMEOUT_S, offline, quiet_hub_logs
from moe_prune.runtime.chat import CHAT_FIELD, Chat, chat, render

TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet", ".csv")
SPLIT_ON = ("none", "blank-lines")  # how a text file is cut into documents (`--split-on`)
# A streamed hub dataset has no end we want to reach; stop after this many characters unless told otherwise.
HUB_DEFAULT_MAX_CHARS = 8_000_000
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
READ_BLOCK = 1 << 20  # bytes read from a data file at a time
# A JSONL or CSV line, a .json file or a parquet row group may hold this many characters (bytes) per
# character the run reads (JSON escapes, other fields), and at least the floors below.
LINE_CHARS_PER_CHAR = 16
LINE_FLOOR_CHARS = 1 << 20
JSON_FLOOR_BYTES = 64 << 20
PARQUET_FLOOR_BYTES = 256 << 20
# A document longer than this is tokenized in windows of about this many characters, overlapping by
# SEAM_CHARS (`piecewise_ids`): a fast tokenizer's memory grows with the text it is given at once.
PIECE_CHARS = 1 << 17
SEAM_CHARS = 1 << 11


class Truncated(str):
    """A document cut at `max_chars`: the text goes on, so no EOS follows it in a token stream."""


Document = str | Chat


def check_split_on(split_on: str) -> None:
    if split_on not in SPLIT_ON:
        raise MoePruneError(f"--split-on {split_on!r}: expected {' or '.join(SPLIT_ON)}")


def load_documents(
    source: str, text_field: str = "text", split: str = "train", max_chars: int | None = None, split_on: str = "none"
) -> list[Document]:
    """Documents of a local file or hub dataset, in order; stops once `max_chars` characters are collected."""
    check_split_on(split_on)
    path = Path(source).expanduser()
    if path.is_dir():
        raise MoePruneError(f"{source}: is a folder; expected a {'/'.join(FILE_SUFFIXES)} file")
    if path.exists():
        documents = _take(_read_file(path, text_field, split_on, max_chars), max_chars)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES or source.count("/") > 1:
        raise MoePruneError(f"{source}: data file not found")
    else:
        documents = _read_hub(source, text_field, split, max_chars or HUB_DEFAULT_MAX_CHARS)
    if not documents:
        raise MoePruneError(f"{source}: contains no text")
    return documents


def load_texts(
    source: str,
    text_field: str = "text",
    split: str = "train",
    max_chars: int | None = None,
    split_on: str = "none",
    tokenizer: Any = None,
) -> list[str]:
    """`load_documents`, with chats rendered by `tokenizer`'s chat template (refused without a tokenizer)."""
    return render(load_documents(source, text_field, split, max_chars, split_on), tokenizer, source)


def _chars(doc: Document) -> int:
    return doc.chars() if isinstance(doc, Chat) else len(doc)


def _take(documents: Iterable[Document], max_chars: int | None) -> list[Document]:
    """Non-blank documents until `max_chars` characters; the text that crosses it is cut there (`Truncated`).

    `max_chars` is always many characters per token wanted, so the cut text is never short of tokens,
    and a one-document file of gigabytes is not tokenized whole for a small budget.
    """
    out: list[Document] = []
    total = 0
    for doc in documents:
        if isinstance(doc, str) and not doc.strip():
            continue
        if max_chars is not None and isinstance(doc, str) and total + len(doc) > max_chars:
            out.append(Truncated(doc[: max_chars - total]))
            break
        out.append(doc)
        total += _chars(doc)
        if max_chars is not None and total >= max_chars:
            break
    return out


def _read_file(path: Path, text_field: str, split_on: str, max_chars: int | None) -> Iterable[Document]:
    """The documents of a local file, read lazily: `_take` stops the reading once `max_chars` are collected."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise MoePruneError(f"{path}: unknown data format {suffix or '(no suffix)'}; use {', '.join(FILE_SUFFIXES)}")
    check_regular(path)
    if suffix == ".parquet":
        return _read_parquet(path, text_field, max_chars)
    if suffix in TEXT_SUFFIXES:
        if split_on == "none":  # one character more than wanted: `_take` then knows the text goes on
            return ["".join(_decoded(path, None if max_chars is None else max_chars + 1))]
        return _paragraphs(_decoded(path), max_chars)
    if suffix == ".jsonl":
        return _fields(_jsonl_records(path, _line_limit(max_chars)), text_field, path)
    if suffix == ".json":
        return _fields(_json_records(path, max_chars), text_field, path)
    return _read_csv(path, text_field, _line_limit(max_chars))


def check_regular(path: Path) -> None:
    """A device, pipe or socket (`/dev/zero`, `<(cmd)`) never ends or blocks: only regular files are read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise MoePruneError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(mode):
        raise MoePruneError(f"{path}: not a regular file (a device, pipe or socket); give a data file")


def _line_limit(max_chars: int | None) -> int | None:
    """Longest JSONL line or CSV line read: many characters per wanted one (JSON escapes, other fields)."""
    return None if max_chars is None else max(LINE_FLOOR_CHARS, LINE_CHARS_PER_CHAR * max_chars)


def _decoded(path: Path, max_chars: int | None = None) -> Iterator[str]:
    """The UTF-8 text of `path` in blocks of READ_BLOCK bytes, at most `max_chars` characters of it.

    Refused at the first invalid byte or NUL (a binary file), naming its offset.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = chars = 0  # bytes before this block; characters before this block
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise MoePruneError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    with handle:
        while max_chars is None or chars < max_chars:
            try:
                block = handle.read(READ_BLOCK)
            except OSError as exc:
                raise MoePruneError(f"{path}: cannot read ({exc.strerror or exc})") from exc
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                raise MoePruneError(f"{path}: not UTF-8 text (invalid byte at offset {at}; a binary file?)") from exc
            if "\x00" in text:
                at = chars + text.index("\x00")
                raise MoePruneError(f"{path}: holds NUL bytes at offset {at}; a binary file, not text")
            if max_chars is not None:
                text = text[: max_chars - chars]
            if text:
                yield text
            if not block:
                return
            offset += len(block)
            chars += len(text)


def text_lines(path: Path, limit: int | None) -> Iterator[tuple[int, str]]:
    """(number, line) of a UTF-8 file read block by block, newline kept; a line over `limit` characters is refused.

    The caller checks that `path` is a regular file (`check_regular`).
    """
    number = 0
    rest = ""
    for block in _decoded(path):
        *lines, rest = (rest + block).split("\n")
        for line in lines:
            _check_line(path, number + 1, line, limit)
            number += 1
            yield number, line + "\n"
        _check_line(path, number + 1, rest, limit)
    if rest:
        yield number + 1, rest


def _check_line(path: Path, number: int, line: str, limit: int | None) -> None:
    if limit is not None and len(line) > limit:
        raise MoePruneError(
            f"{path}: line {number} is longer than {limit:,} characters, more than this run reads "
            "(one record per line expected)"
        )


def _paragraphs(blocks: Iterable[str], max_chars: int | None) -> Iterator[str]:
    """`split_text(text, "blank-lines")` of text that arrives in blocks, holding about one paragraph at a time.

    Text is split up to its last non-blank character, so a separator is never cut; more than `max_chars`
    characters without a complete paragraph are all this run can use, so reading stops there.
    """
    buffer = ""
    for block in blocks:
        buffer += block
        end = len(buffer.rstrip())
        *done, last = _BLANK_LINES.split(buffer[:end])
        yield from (_paragraph(p) for p in done)
        buffer = last + buffer[end:]
        if max_chars is not None and len(buffer) > max_chars:
            break
    yield from split_text(buffer, "blank-lines")


def _paragraph(text: str) -> str:
    return text.lstrip("\r\n").rstrip()


def split_text(raw: str, split_on: str = "none") -> list[str]:
    """A text file's documents: the whole text, or (blank-lines) its paragraphs without the blank lines between.

    Nothing inside a paragraph is touched (indentation, newlines); only the line breaks that end it go.
    """
    if split_on == "none":
        return [raw]
    return [_paragraph(p) for p in _BLANK_LINES.split(raw)]


def _jsonl_records(path: Path, limit: int | None) -> Iterator[Any]:
    for number, line in text_lines(path, limit):
        if line.strip():
            yield parse_json(line, f"{path}: line {number}", "the record", limit=len(line))  # bounded by `limit`


def _json_records(path: Path, max_chars: int | None) -> list[Any]:
    """A .json file is parsed whole, so its size is capped first (large record sets belong in JSONL)."""
    cap = None if max_chars is None else max(JSON_FLOOR_BYTES, LINE_CHARS_PER_CHAR * max_chars)
    size = path.stat().st_size
    if cap is not None and size > cap:
        raise MoePruneError(
            f"{path}: {size:,} bytes of JSON, more than the {cap:,} this run reads (a .json file is parsed whole); "
            "give large record sets as .jsonl, read record by record"
        )
    text = "".join(_decoded(path))
    obj = parse_json(text, str(path), "the data", limit=len(text))  # its size was checked against `cap`
    if isinstance(obj, dict) and "data" in obj:
        obj = obj["data"]
    if not isinstance(obj, list):
        raise MoePruneError(f"{path}: expected a JSON list of records or an object with a 'data' list")
    return obj


def _fields(records: Iterable[Any], text_field: str, path: Path) -> Iterator[Document]:
    """The document of every record (plain strings are their own text)."""
    return (_document(record, text_field, path, number) for number, record in enumerate(records, 1))


def _document(record: Any, text_field: str, source: str | Path, number: int) -> Document:
    """`record[text_field]` as text, or a chat: that field or `messages` holding a list of messages."""
    where = f"{source}: record {number}"
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or (text_field not in record and CHAT_FIELD not in record):
        raise MoePruneError(f"{where} has no field {text_field!r} (nor {CHAT_FIELD!r}; use --text-field)")
    field = text_field if text_field in record else CHAT_FIELD
    value = record[field]
    if isinstance(value, str) and field != CHAT_FIELD:
        return value
    if isinstance(value, list):
        return chat(value, number, f"{where} field {field!r}")
    expected = "a list of chat messages" if field == CHAT_FIELD else "text"
    raise MoePruneError(f"{where} field {field!r} is {type(value).__name__}, not {expected}")


def _read_csv(path: Path, text_field: str, limit: int | None) -> Iterator[str]:
    """One document per row; csv's own error (e.g. a field over its 131,072-character limit) is one line."""
    reader = csv.DictReader(line for _, line in text_lines(path, limit))
    try:
        names = reader.fieldnames or []
        if text_field not in names:
            raise MoePruneError(
                f"{path}: no column {text_field!r} (columns: {', '.join(names) or 'none'}; use --text-field)"
            )
        for row in reader:
            yield row[text_field] or ""
    except csv.Error as exc:
        raise MoePruneError(f"{path}: line {reader.line_num}: not readable CSV ({exc})") from exc


def _read_parquet(path: Path, text_field: str, max_chars: int | None) -> Iterator[Document]:
    """Through pyarrow (a dependency of `datasets`): one column, row group by row group, no cache files.

    Each row group's uncompressed size of that column (from the file's metadata) is checked before the
    group is read, so one group cannot decompress into more memory than the run can use.
    """
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
        groups = parquet.metadata.num_row_groups
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise MoePruneError(f"{path}: not a readable parquet file ({describe(exc)})") from exc
    field = text_field if text_field in names or CHAT_FIELD not in names else CHAT_FIELD
    if field not in names:
        raise MoePruneError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}; use --text-field)")
    cap = None if max_chars is None else max(PARQUET_FLOOR_BYTES, LINE_CHARS_PER_CHAR * max_chars)
    number = 0
    for group in range(groups):
        meta = parquet.metadata.row_group(group)
        size = sum(
            meta.column(i).total_uncompressed_size
            for i in range(meta.num_columns)
            if meta.column(i).path_in_schema.split(".")[0] == field
        )
        if cap is not None and size > cap:
            raise MoePruneError(
                f"{path}: row group {group} holds {size:,} bytes of column {field!r} uncompressed, more than the "
                f"{cap:,} this run reads at once; write the file with smaller row groups"
            )
        try:
            column = parquet.read_row_group(group, columns=[field]).column(field).to_pylist()
        except Exception as exc:  # pyarrow raises several types for damaged pages
            raise MoePruneError(f"{path}: not a readable parquet file ({describe(exc)})") from exc
        for value in column:
            number += 1
            yield _document({field: value}, field, path, number) if isinstance(value, str | list) else ""


def _read_hub(source: str, text_field: str, split: str, max_chars: int) -> list[Document]:
    """Stream `org/name[:config]` from the hub (not covered by tests: they run offline).

    The hub is asked once, quietly, whether the dataset exists before `datasets` streams it: offline,
    `datasets` would retry for half a minute and log every retry.
    """
    name, _, config = source.partition(":")
    with quiet_hub_logs():
        _probe_hub(source, name)
        try:
            from datasets import load_dataset

            stream = iter(load_dataset(name, config or None, split=split, streaming=True))
            first = next(stream, None)
        except Exception as exc:  # hub and dataset-script errors have many types; all mean the same to the user
            raise MoePruneError(f"{source}: could not be loaded as a hub dataset ({describe(exc)})") from exc
    if first is None:
        return []
    if text_field not in first and CHAT_FIELD not in first:
        raise MoePruneError(f"{source}: no field {text_field!r} (fields: {', '.join(first)}; use --text-field)")
    records = itertools.chain([first], stream)
    return _take((_document(r, text_field, source, n) for n, r in enumerate(records, 1)), max_chars)


def _probe_hub(source: str, name: str) -> None:
    """One quick request: a clear line when offline, unreachable or unknown, instead of retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    if offline():
        raise MoePruneError(
            f"{source}: not a local file, and hub datasets cannot be reached in offline mode "
            "(HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)"
        )
    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError as exc:
        raise MoePruneError(f"{source}: not a local file, and no such dataset on the hub (or it is private)") from exc
    except Exception as exc:  # connection, TLS, proxy and HTTP errors of several libraries
        raise MoePruneError(
            f"{source}: not a local file, and the hub dataset could not be reached ({describe(exc)})"
        ) from exc


def token_stream(texts: list[str], tokenizer: Any, max_tokens: int | None = None, batch: int = 256) -> torch.Tensor:
    """All documents tokenized and concatenated, each followed by EOS so documents do not run together.

    No BOS or other special tokens are added inside documents (a chat template writes its own). A
    `Truncated` document (cut at `max_chars`) gets no EOS: its text goes on. A tokenizer without an EOS
    token joins documents directly, with a warning: the last word of one then runs into the next.
    Tokenizes `batch` documents at a time and stops once `max_tokens` tokens exist, so a small
    evaluation of a large file does not tokenize all of it. A document longer than PIECE_CHARS (a .txt
    file is one) is tokenized piece by piece (`piecewise_ids`, fast tokenizers): memory stays flat in
    its length, and the stream stops inside it at exactly `max_tokens`.
    """
    eos = tokenizer.eos_token_id
    if len(texts) > 1:
        warn_if_no_eos(tokenizer)
    pieces = bool(getattr(tokenizer, "is_fast", False))
    ids: list[int] = []

    def add(text: str, doc: list[int]) -> None:
        ids.extend(doc)
        if eos is not None and not isinstance(text, Truncated):
            ids.append(eos)

    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        short: list[str] = []
        for text in [*chunk, None]:
            if text is not None and not (pieces and len(text) > PIECE_CHARS):
                short.append(text)
                continue
            if short:
                for done, doc in zip(short, tokenizer(short, add_special_tokens=False)["input_ids"], strict=True):
                    add(done, doc)
                short = []
            if text is None:
                break
            left = None if max_tokens is None else max_tokens - len(ids)
            doc = piecewise_ids(text, tokenizer, left)
            if left is not None and len(doc) >= left:
                ids.extend(doc[:left])
                return torch.tensor(ids, dtype=torch.long)
            add(text, doc)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


def piecewise_ids(
    text: str, tokenizer: Any, limit: int | None = None, piece: int | None = None, overlap: int | None = None
) -> list[int]:
    """The ids `tokenizer(text)` gives (at least the first `limit`), tokenizing windows of about `piece` characters.

    Windows are cut after a newline (else a space) and overlap by about `overlap` characters. Tokens within
    `overlap // 4` characters of a cut may differ from one-piece tokenization (a word cut in two, a prefix
    space); so the window's tokens are kept up to a seam inside the overlap where both windows hold the
    same tokens at the same character offsets, through to the last trusted one, and the next window's
    tokens from there on. Without such a seam the window doubles and is tokenized again (pathological text,
    such as runs of spaces longer than the margin, costs more time and memory, never other ids).
    A tokenizer that gives no offsets (a slow one) tokenizes the text in one piece.
    """
    if not getattr(tokenizer, "is_fast", False):
        return tokenizer([text], add_special_tokens=False)["input_ids"][0]
    piece = piece or PIECE_CHARS
    overlap = overlap or SEAM_CHARS
    margin = max(1, overlap // 4)
    out: list[int] = []
    start, seam = 0, 0  # window start; tokens before `seam` are in `out`
    end = _cut(text, piece, piece // 2)
    tokens = _encode(tokenizer, text, start, end)
    while end < len(text) and (limit is None or len(out) < limit):
        after = _cut(text, end - overlap, end - overlap - overlap // 2)
        after = max(after, start + 1)
        after_end = _cut(text, after + piece, after + piece // 2)
        following = _encode(tokenizer, text, after, after_end)
        joint = _seam(tokens, following, max(after + margin, seam), end - margin)
        if joint is None:  # no agreement: a window twice as long, tokenized again from `start`
            end = _cut(text, start + 2 * (end - start), end + 1)
            tokens = [t for t in _encode(tokenizer, text, start, end) if t[0] >= seam]
            continue
        out.extend(t[2] for t in tokens if t[0] < joint)
        tokens = [t for t in following if t[0] >= joint]
        start, end, seam = after, after_end, joint
    if end >= len(text):
        out.extend(t[2] for t in tokens)
    return out if limit is None else out[:limit]


Token = tuple[int, int, int]  # (start, end) character offsets in the whole text, id


def _encode(tokenizer: Any, text: str, start: int, end: int) -> list[Token]:
    encoded = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
    spans = encoded["offset_mapping"]
    return [(a + start, b + start, i) for i, (a, b) in zip(encoded["input_ids"], spans, strict=True)]


def _seam(tokens: list[Token], following: list[Token], low: int, high: int) -> int | None:
    """The first token start >= `low` in `following` where both windows hold the same tokens up to `high`."""
    joint = next((t[0] for t in following if low <= t[0] < high), None)
    if joint is None:
        return None
    mine = [t for t in tokens if joint <= t[0] < high]
    theirs = [t for t in following if joint <= t[0] < high]
    return joint if mine and mine == theirs else None


def _cut(text: str, target: int, low: int) -> int:
    """A cut near `target` (not before `low`): after the last newline, else the last space; the end of `text`."""
    if target >= len(text):
        return len(text)
    low = max(low, 0)
    for mark in ("\n", " "):
        at = text.rfind(mark, low, target)
        if at >= 0:
            return at + 1
    return target


def warn_if_no_eos(tokenizer: Any) -> None:
    """Documents are about to be joined: say so when nothing can separate them (the CLI prints it once)."""
    if tokenizer.eos_token_id is None:
        warnings.warn(
            "the tokenizer has no EOS token: documents are joined with nothing between them (the end of one "
            "runs into the start of the next); give running text as one document (.txt without --split-on)",
            MoePruneWarning,
            stacklevel=3,
        )


def fixed_chunks(
    ids: torch.Tensor | list[int], seq_len: int, max_tokens: int | None = None, source: str = "data"
) -> torch.Tensor:
    """[N, seq_len] consecutive windows of the first `max_tokens` tokens; the ragged tail is dropped.

    `source` (the data file or dataset the tokens came from) is named when there are too few tokens.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if seq_len < 2:
        raise MoePruneError(f"sequence length must be at least 2 (got {seq_len})")
    if max_tokens is not None and max_tokens < seq_len <= ids.numel():
        raise MoePruneError(f"max tokens {max_tokens} is fewer than one sequence of {seq_len}")
    usable = ids.numel() if max_tokens is None else min(ids.numel(), max_tokens)
    count = usable // seq_len
    if count == 0:
        raise MoePruneError(f"{source}: has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    return ids[: count * seq_len].reshape(count, seq_len).clone()


def clip_seq_len(seq_len: int, hf_config: Any) -> int:
    """`seq_len` capped at the model's context length, so position embeddings are never exceeded."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    limit = getattr(text, "max_position_embeddings", None)
    return min(seq_len, limit) if isinstance(limit, int) and limit > 0 else seq_len
