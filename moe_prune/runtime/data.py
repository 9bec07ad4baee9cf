"""Text data for forward passes: read documents, tokenize them into one stream, cut fixed-length chunks.

Shared by `eval` (perplexity) and `profile` (routing statistics), so both see the same tokens for
the same file. Everything here is deterministic: file order is kept, nothing is shuffled. Local files are read by
`data_files`, hub datasets streamed by `data_hub`; this module is the entry point and the tokenizer side.

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

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.runtime.chat import Chat, render
from moe_prune.runtime.data_files import FILE_SUFFIXES, Document, read_file
from moe_prune.runtime.data_hub import read_hub

SPLIT_ON = ("none", "blank-lines")  # how a text file is cut into documents (`--split-on`)
# A streamed hub dataset has no end we want to reach; stop after this many characters unless told otherwise.
HUB_DEFAULT_MAX_CHARS = 8_000_000
# A document longer than this is tokenized in windows of about this many characters, overlapping by
# SEAM_CHARS (`piecewise_ids`): a fast tokenizer's memory grows with the text it is given at once.
PIECE_CHARS = 1 << 17
SEAM_CHARS = 1 << 11


class Truncated(str):
    """A document cut at `max_chars`: the text goes on, so no EOS follows it in a token stream."""


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
        documents = _take(read_file(path, text_field, split_on, max_chars), max_chars)
    elif source.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES or source.count("/") > 1:
        raise MoePruneError(f"{source}: data file not found")
    else:
        documents = _take(read_hub(source, text_field, split), max_chars or HUB_DEFAULT_MAX_CHARS)
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
