"""Local data files read boundedly: the documents of a .txt/.md, .jsonl, .json, .parquet or .csv file.

Formats and limits are described in `runtime.data` (the one entry point). Only regular files are read,
block by block and lazily, so that reading stops once the run has what it needs; a JSONL or CSV line, a
.json file and a parquet row group larger than LINE_CHARS_PER_CHAR characters per wanted one (at least
their floors) are refused before they are read whole.
"""

from __future__ import annotations

import codecs
import csv
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from moe_prune.artifacts.common import describe, parse_json
from moe_prune.errors import MoePruneError
from moe_prune.runtime.chat import CHAT_FIELD, Chat, chat

TEXT_SUFFIXES = (".txt", ".text", ".md")
FILE_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".parquet", ".csv")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
READ_BLOCK = 1 << 20  # bytes read from a data file at a time
# A JSONL or CSV line, a .json file or a parquet row group may hold this many characters (bytes) per
# character the run reads (JSON escapes, other fields), and at least the floors below.
LINE_CHARS_PER_CHAR = 16
LINE_FLOOR_CHARS = 1 << 20
JSON_FLOOR_BYTES = 64 << 20
PARQUET_FLOOR_BYTES = 256 << 20
Document = str | Chat


def read_file(path: Path, text_field: str, split_on: str, max_chars: int | None) -> Iterable[Document]:
    """The documents of a local file, read lazily: `data._take` stops the reading once `max_chars` are collected."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise MoePruneError(f"{path}: unknown data format {suffix or '(no suffix)'}; use {', '.join(FILE_SUFFIXES)}")
    check_regular(path)
    if suffix == ".parquet":
        return _read_parquet(path, text_field, max_chars)
    if suffix in TEXT_SUFFIXES:
        if split_on == "none":  # one character more than wanted: `data._take` then knows the text goes on
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
    return (document(record, text_field, path, number) for number, record in enumerate(records, 1))


def document(record: Any, text_field: str, source: str | Path, number: int) -> Document:
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
            yield document({field: value}, field, path, number) if isinstance(value, str | list) else ""
