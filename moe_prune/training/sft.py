"""Prompt/response data of `finetune --format chat|completion`: the loss falls on response tokens only.

Records are JSONL, one JSON object per line (blank lines skipped, other fields ignored):

  completion  {"prompt": str, "completion": str}: rendered as prompt + completion + EOS, a plain
              concatenation (put any separator, e.g. a space, in the strings themselves).
  chat        {"messages": [{"role": str, "content": str}, ...]}, ending with an assistant turn; every
              assistant turn carries loss. With the tokenizer's chat template where it has one: an
              assistant turn is what the template adds after the generation prompt (its content and
              end-of-turn marker). Without one, a plain rendering: "role: content\\n" per message, the
              assistant's content after an "assistant: " header, EOS after the last message.

Prompt and response parts are tokenized separately, as at inference, where the prompt is tokenized
alone and the response follows it. A plain rendering starts with the tokenizer's default leading
special tokens (a BOS where the tokenizer adds one); template text is tokenized as rendered (templates
write their own). EOS and end-of-turn markers carry loss, so the model learns to stop; `--no-eos`
leaves the EOS of plain renderings out, for continuation data whose text goes on after the response.

Length: an example longer than --seq-len keeps its first --seq-len tokens (a response cut short still
trains on what is left); one with no response token left to predict (position 0 predicts nothing) is
skipped with a warning, and data with no example left is refused. Rows are right-padded (pad token,
else EOS) to the longest example; labels are -100 on prompt and padding tokens.

A malformed record is refused in one line naming the file and line: not JSON, not an object, a missing
or non-string field, an empty response, a conversation without a final assistant turn. The file is read
record by record and only until the run has its examples (later records are not read, nor checked); a
line longer than the run can use (LINE_CHARS_PER_CHAR x 16 characters per --seq-len token, at least a
million) and a file that is not a regular one (a device, a pipe) are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_prune.artifacts.common import describe, json_type, parse_json, require_type
from moe_prune.errors import MoePruneError
from moe_prune.runtime.data_files import LINE_CHARS_PER_CHAR, LINE_FLOOR_CHARS, check_regular, text_lines
from moe_prune.runtime.sources import CHARS_PER_TOKEN_BOUND, SourceSpec
from moe_prune.training.batches import IGNORE, Sequences
from moe_prune.training.text import Rows, is_mix, text_rows

Segments = list[tuple[str, bool]]  # (text, carries loss), in order


@dataclass(frozen=True)
class Record:
    """One validated record: (role, content) turns; a completion record is (("prompt", p), ("completion", c))."""

    where: str  # "file: line N", for messages
    turns: tuple[tuple[str, str], ...]


def read_records(path: Path, fmt: str, limit: int | None = None) -> list[Record]:
    """Every record of a JSONL file in `fmt` ("chat" or "completion"), validated; refused in one line."""
    records = list(iter_records(path, fmt, limit))
    if not records:
        raise MoePruneError(f"{path}: holds no records")
    return records


def iter_records(path: Path, fmt: str, limit: int | None = None) -> Iterator[Record]:
    """The records of a JSONL file one by one, read as they are asked for; a line over `limit` characters
    (or a file that is not a regular one: a device, a pipe) is refused in one line."""
    if not path.is_file():
        raise MoePruneError(f"{path}: not a file; --format chat|completion reads a local JSONL file")
    check_regular(path)
    for number, line in text_lines(path, limit):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        obj = parse_json(line, where, "the record", limit=len(line))  # the line is bounded by `limit`
        if not isinstance(obj, dict):
            raise MoePruneError(f"{where}: expected a JSON object, got {json_type(obj)}")
        yield Record(where, _chat_turns(obj, where) if fmt == "chat" else _completion_turns(obj, where))


def _completion_turns(obj: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    for name in ("prompt", "completion"):
        if name not in obj:
            hint = " (a chat record? use --format chat)" if "messages" in obj else ""
            raise MoePruneError(f"{where}: no field {name!r}{hint}")
        require_type(obj[name], str, where, f"field {name!r}")
    if not obj["completion"].strip():
        raise MoePruneError(f"{where}: field 'completion' is empty (nothing to train on)")
    return (("prompt", obj["prompt"]), ("completion", obj["completion"]))


def _chat_turns(obj: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    if "messages" not in obj:
        hint = " (a prompt/completion record? use --format completion)" if "prompt" in obj else ""
        raise MoePruneError(f"{where}: no field 'messages'{hint}")
    messages = require_type(obj["messages"], list, where, "field 'messages'")
    turns = []
    for i, message in enumerate(messages, 1):
        require_type(message, dict, where, f"message {i}")
        for name in ("role", "content"):
            if name not in message:
                raise MoePruneError(f"{where}: message {i} has no field {name!r}")
            require_type(message[name], str, where, f"message {i} field {name!r}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise MoePruneError(f"{where}: message {i} (assistant) is empty (nothing to train on)")
        turns.append((message["role"], message["content"]))
    if not turns or turns[-1][0] != "assistant":
        last = f"a {turns[-1][0]!r} message" if turns else "no message"
        raise MoePruneError(f"{where}: a conversation must end with an assistant message (it ends with {last})")
    return tuple(turns)


def render(record: Record, fmt: str, tokenizer: Any) -> tuple[Segments, bool]:
    """(segments, plain): the record's text in order, each part marked response or not; `plain` when no
    chat template wrote it (then the tokenizer's leading special tokens come first and EOS follows)."""
    if fmt == "completion":
        (_, prompt), (_, completion) = record.turns
        return [(prompt, False), (completion, True)], True
    if getattr(tokenizer, "chat_template", None):
        return _template_segments(record, tokenizer), False
    segments: Segments = []
    for role, content in record.turns:
        if role == "assistant":
            segments += [("assistant: ", False), (content + "\n", True)]
        else:
            segments.append((f"{role}: {content}\n", False))
    return segments, True


def _template_segments(record: Record, tokenizer: Any) -> Segments:
    """Each assistant turn = the template's rendering up to it minus the rendering up to its generation prompt."""
    messages = [{"role": role, "content": content} for role, content in record.turns]
    segments: Segments = []
    done = ""
    for i, (role, _) in enumerate(record.turns):
        if role != "assistant":
            continue
        prompt = _apply_template(tokenizer, messages[:i], True, record.where)
        full = _apply_template(tokenizer, messages[: i + 1], False, record.where)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise MoePruneError(
                f"{record.where}: the chat template renders earlier turns differently once message {i + 1} "
                "follows, so the assistant's tokens cannot be told apart; give one assistant turn per record"
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    return segments


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 errors and the template's own raise_exception(): the record is refused
        raise MoePruneError(f"{where}: the tokenizer's chat template refuses it ({describe(exc)})") from exc
    assert isinstance(text, str), type(text)
    return text


def tokenize(segments: Segments, plain: bool, tokenizer: Any, eos: bool = True) -> tuple[list[int], list[int]]:
    """(ids, labels) of rendered segments: labels are the ids on response tokens, IGNORE elsewhere; a plain
    rendering ends with EOS when `eos`."""
    ids: list[int] = _leading_special_tokens(tokenizer) if plain else []
    labels: list[int] = [IGNORE] * len(ids)
    for text, loss in _merged(segments):
        part = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if loss else [IGNORE] * len(part)
    if plain and eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def _leading_special_tokens(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before a text by default (a BOS for Llama-style ones; EOS never)."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [i for i in ids if i != tokenizer.eos_token_id]


def _merged(segments: Segments) -> Segments:
    """Neighbouring parts of the same kind joined: a prompt is tokenized as one text, as at inference."""
    out: Segments = []
    for text, loss in segments:
        if out and out[-1][1] == loss:
            out[-1] = (out[-1][0] + text, loss)
        elif text:
            out.append((text, loss))
    return out


def load_examples(
    source: str, fmt: str, tokenizer: Any, seq_len: int, max_examples: int | None = None, eos: bool = True
) -> tuple[Sequences, list[str]]:
    """The first `max_examples` usable examples of `source` as padded rows, and warnings (truncation, skips)."""
    limit = max(LINE_FLOOR_CHARS, LINE_CHARS_PER_CHAR * CHARS_PER_TOKEN_BOUND * seq_len)
    rows: list[tuple[list[int], list[int]]] = []
    cut, skipped, seen = 0, [], 0
    for record in iter_records(Path(source).expanduser(), fmt, limit):
        seen += 1
        ids, labels = tokenize(*render(record, fmt, tokenizer), tokenizer, eos)
        cut += len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels[1:]):
            skipped.append(record.where)
            continue
        rows.append((ids, labels))
        if max_examples is not None and len(rows) >= max_examples:
            break  # the rest of the file is not read
    if not seen:
        raise MoePruneError(f"{source}: holds no records")
    if not rows:
        raise MoePruneError(f"{source}: no example keeps a response token within --seq-len {seq_len}")
    warnings = []
    if cut:
        warnings.append(f"{source}: {cut} example(s) longer than --seq-len {seq_len} keep their first {seq_len} tokens")
    if skipped:
        warnings.append(
            f"{source}: {len(skipped)} example(s) skipped, no response token within --seq-len {seq_len} "
            f"(first: {skipped[0]})"
        )
    return _pad(rows, tokenizer), warnings


def _pad(rows: list[tuple[list[int], list[int]]], tokenizer: Any) -> Sequences:
    """Right-padded [N, longest] rows (pad token, else EOS, else 0); padding carries no loss."""
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for n, (row_ids, row_labels) in enumerate(rows):
        ids[n, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        labels[n, : len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
    lengths = torch.tensor([len(row_ids) for row_ids, _ in rows], dtype=torch.long)
    return Sequences(ids, labels, lengths)


def load_rows(
    data: str | Sequence[SourceSpec],
    fmt: str,
    tokenizer: Any,
    seq_len: int,
    budget: int,
    text_field: str = "text",
    eos: bool = True,
    *,
    split_on: str = "none",
    trained: int | None = None,
) -> Rows:
    """`finetune`'s rows for a budget of `budget` tokens (counted at `seq_len` per row): for "text", chunks of
    one source's token stream or of a mix of `trained` tokens (`training.text`); otherwise the prompt/response
    examples of one JSONL file. A str is one source as named (no share is read from it)."""
    specs = [SourceSpec(data)] if isinstance(data, str) else list(data)
    if fmt == "text":
        return text_rows(specs, tokenizer, seq_len, budget, trained=trained, text_field=text_field, split_on=split_on)
    check_records_source(specs, fmt)
    sequences, warnings = load_examples(specs[0].source, fmt, tokenizer, seq_len, max(1, budget // seq_len), eos)
    return Rows(sequences, warnings)


def check_records_source(specs: Sequence[SourceSpec], fmt: str) -> None:
    """chat/completion read exactly one local JSONL file: a mix or a share is refused in one line."""
    if fmt != "text" and is_mix(specs):
        given = " ".join(f"--data {s.given}" for s in specs)
        raise MoePruneError(
            f"{given}: --format {fmt} reads one JSONL file of records; give one --data without a share "
            "(mixes and shares are for --format text)"
        )


__all__ = ["Record", "check_records_source", "load_examples", "load_rows", "read_records", "render", "tokenize"]
