"""Text data for forward passes: read documents, tokenize them into one stream, cut fixed-length chunks.

Shared by `eval` (perplexity) and `profile` (routing statistics), so both see the same tokens for
the same file. Everything here is deterministic: file order is kept, nothing is shuffled.

Local files, by suffix:
  .txt / .text / .md  one document per blank-line-separated paragraph (a file without blank lines
                      is one document); paragraphs keep their inner newlines.
  .jsonl              one JSON record per line; the document is `record[text_field]`.
  .json               a list of records (or of strings), or an object whose "data" holds that list.
  .parquet / .csv     one row per document; the document is the `text_field` column.
Anything else that is not an existing path is tried as a hub dataset id (`org/name`, optionally
`org/name:config`), streamed so that a huge corpus is never downloaded whole.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moe_prune.artifacts.common import describe
from moe_prune.errors import MoePruneError
from moe_prune.runtime.hub import HUB_TIMEOUT_S, offline, quiet_hub_logs

TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet", ".csv")
# A streamed hub dataset has no end we want to reach; stop after this many characters unless told otherwise.
HUB_DEFAULT_MAX_CHARS = 8_000_000
_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")


def load_texts(source: str, text_field: str = "text", split: str = "train", max_chars: int | None = None) -> list[str]:
    """Documents of a local file or hub dataset, in order; stops once `max_chars` characters are collected."""
    path = Path(source).expanduser()
    if path.is_dir():
        raise MoePruneError(f"{source}: is a folder; expected a {'/'.join(FILE_SUFFIXES)} file")
    if path.exists():
        texts = _take(_read_file(path, text_field), max_chars)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES or source.count("/") > 1:
        raise MoePruneError(f"{source}: data file not found")
    else:
        texts = _read_hub(source, text_field, split, max_chars or HUB_DEFAULT_MAX_CHARS)
    if not texts:
        raise MoePruneError(f"{source}: contains no text")
    return texts


def _take(texts: Iterable[str], max_chars: int | None) -> list[str]:
    """Non-blank documents until `max_chars` characters are reached (the last one is kept whole)."""
    out: list[str] = []
    total = 0
    for text in texts:
        if not text.strip():
            continue
        out.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return out


def _read_file(path: Path, text_field: str) -> Iterable[str]:
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
        return [p.strip() for p in _PARAGRAPH.split(raw)]
    raise MoePruneError(f"{path}: unknown data format {suffix or '(no suffix)'}; use {', '.join(FILE_SUFFIXES)}")


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


def _fields(records: list[Any], text_field: str, path: Path) -> list[str]:
    """`record[text_field]` of every record (plain strings are their own text)."""
    texts = []
    for number, record in enumerate(records, 1):
        if isinstance(record, str):
            texts.append(record)
            continue
        if not isinstance(record, dict) or text_field not in record:
            raise MoePruneError(f"{path}: record {number} has no field {text_field!r} (use --text-field)")
        value = record[text_field]
        if not isinstance(value, str):
            raise MoePruneError(f"{path}: record {number} field {text_field!r} is {type(value).__name__}, not text")
        texts.append(value)
    return texts


def _read_csv(raw: str, text_field: str, path: Path) -> list[str]:
    reader = csv.DictReader(io.StringIO(raw))
    if text_field not in (reader.fieldnames or []):
        columns = ", ".join(reader.fieldnames or []) or "none"
        raise MoePruneError(f"{path}: no column {text_field!r} (columns: {columns}; use --text-field)")
    return [row[text_field] or "" for row in reader]


def _read_parquet(path: Path, text_field: str) -> list[str]:
    """Through pyarrow (a dependency of `datasets`): reads one column, writes no cache files."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if text_field not in names:
            raise MoePruneError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}; use --text-field)")
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except MoePruneError:
        raise
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise MoePruneError(f"{path}: not a readable parquet file ({describe(exc)})") from exc
    return [value if isinstance(value, str) else "" for value in column]


def _read_hub(source: str, text_field: str, split: str, max_chars: int) -> list[str]:
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
    if text_field not in first:
        raise MoePruneError(f"{source}: no field {text_field!r} (fields: {', '.join(first)}; use --text-field)")
    records = itertools.chain([first], stream)
    return _take((str(r.get(text_field) or "") for r in records), max_chars)


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

    No BOS or other special tokens are added inside documents; a tokenizer without an EOS token
    joins documents directly. Tokenizes `batch` documents at a time and stops once `max_tokens`
    tokens exist, so a small evaluation of a large file does not tokenize all of it.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), batch):
        for doc in tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            if eos is not None:
                ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids, dtype=torch.long)


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
