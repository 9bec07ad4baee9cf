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

Chats are kept as `Chat` documents until `render` writes them out with the model's own chat template
(`tokenizer.apply_chat_template(messages, tokenize=False)`): the text the model sees in chat use. A
tokenizer without a template is refused (one line naming the file): a made-up format would calibrate
on text the model never sees.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moe_prune.artifacts.common import describe
from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.runtime.chat import CHAT_FIELD, Chat, chat, render
from moe_prune.runtime.hub import HUB_TIMEOUT_S, offline, quiet_hub_logs

TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet", ".csv")
SPLIT_ON = ("none", "blank-lines")  # how a text file is cut into documents (`--split-on`)
# A streamed hub dataset has no end we want to reach; stop after this many characters unless told otherwise.
HUB_DEFAULT_MAX_CHARS = 8_000_000
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


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
        documents = _take(_read_file(path, text_field, split_on), max_chars)
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


def _read_file(path: Path, text_field: str, split_on: str) -> Iterable[Document]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, text_field)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MoePruneError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}; a binary file?)") from exc
    except OSError as exc:
        raise MoePruneError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if "\x00" in raw:
        raise MoePruneError(f"{path}: holds NUL bytes at offset {raw.index(chr(0))}; a binary file, not text")
    if suffix == ".jsonl":
        return _fields(_jsonl_records(raw, path), text_field, path)
    if suffix == ".json":
        return _fields(_json_records(raw, path), text_field, path)
    if suffix == ".csv":
        return _read_csv(raw, text_field, path)
    if suffix in TEXT_SUFFIXES:
        return split_text(raw, split_on)
    raise MoePruneError(f"{path}: unknown data format {suffix or '(no suffix)'}; use {', '.join(FILE_SUFFIXES)}")


def split_text(raw: str, split_on: str = "none") -> list[str]:
    """A text file's documents: the whole text, or (blank-lines) its paragraphs without the blank lines between.

    Nothing inside a paragraph is touched (indentation, newlines); only the line breaks that end it go.
    """
    if split_on == "none":
        return [raw]
    return [p.lstrip("\r\n").rstrip() for p in _BLANK_LINES.split(raw)]


def _jsonl_records(raw: str, path: Path) -> list[Any]:
    records = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as exc:
            raise MoePruneError(f"{path}: line {number} is not valid JSON ({describe(exc)})") from exc
    return records


def _json_records(raw: str, path: Path) -> list[Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MoePruneError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except RecursionError:
        raise MoePruneError(f"{path}: JSON nested too deeply") from None
    if isinstance(obj, dict) and "data" in obj:
        obj = obj["data"]
    if not isinstance(obj, list):
        raise MoePruneError(f"{path}: expected a JSON list of records or an object with a 'data' list")
    return obj


def _fields(records: list[Any], text_field: str, path: Path) -> list[Document]:
    """The document of every record (plain strings are their own text)."""
    return [_document(record, text_field, path, number) for number, record in enumerate(records, 1)]


def _document(record: Any, text_field: str, source: str | Path, number: int) -> Document:
    """`record[text_field]` as text, or a chat: that field or `messages` holding a list of messages."""
    where = f"{source}: record {number}"
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or (text_field not in record and CHAT_FIELD not in record):
        raise MoePruneError(f"{where} has no field {text_field!r} (nor {CHAT_FIELD!r}; use --text-field)")
    field = text_field if text_field in record else CHAT_FIELD
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return chat(value, number, f"{where} field {field!r}")
    raise MoePruneError(f"{where} field {field!r} is {type(value).__name__}, not text")


def _read_csv(raw: str, text_field: str, path: Path) -> list[str]:
    reader = csv.DictReader(io.StringIO(raw))
    if text_field not in (reader.fieldnames or []):
        columns = ", ".join(reader.fieldnames or []) or "none"
        raise MoePruneError(f"{path}: no column {text_field!r} (columns: {columns}; use --text-field)")
    return [row[text_field] or "" for row in reader]


def _read_parquet(path: Path, text_field: str) -> list[Document]:
    """Through pyarrow (a dependency of `datasets`): reads one column, writes no cache files."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        field = text_field if text_field in names or CHAT_FIELD not in names else CHAT_FIELD
        if field not in names:
            raise MoePruneError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}; use --text-field)")
        column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    except MoePruneError:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise MoePruneError(f"{path}: not a readable parquet file ({describe(exc)})") from exc
    return [
        _document({field: value}, field, path, number) if isinstance(value, str | list) else ""
        for number, value in enumerate(column, 1)
    ]


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
    evaluation of a large file does not tokenize all of it.
    """
    eos = tokenizer.eos_token_id
    if len(texts) > 1:
        warn_if_no_eos(tokenizer)
    ids: list[int] = []
    for start in range(0, len(texts), batch):
        chunk = texts[start : start + batch]
        for text, doc in zip(chunk, tokenizer(chunk, add_special_tokens=False)["input_ids"], strict=True):
            ids.extend(doc)
            if eos is not None and not isinstance(text, Truncated):
                ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


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
