"""Hostile cases: data files (`--data`), issue #19: files that never end, oversized lines and fields, bad chats.

Every case goes through every command that takes --data. A source named by `extra` (`--data {root}/x.csv`)
is added after the good `data.txt`: profile, finetune and lottery then mix the two, eval and sweep score the
last one given; each must refuse the bad file in one line.
"""

from __future__ import annotations

import json
import os

from hostile import DATA_READERS, Workspace, hostile

CSV = "{root}/data.csv"
JSONL = "{root}/data.jsonl"
RECORDS = ("--format", "completion")
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _write(ws: Workspace, name: str, text: str) -> None:
    (ws.root / name).write_text(text, encoding="utf-8")


def _records(ws: Workspace, *records: object) -> None:
    _write(ws, "data.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _with_chat_template(ws: Workspace) -> None:
    """The model can render chats, so a chat that reaches the template would be used, not refused."""
    path = ws.model / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(config))


@hostile("data-never-ends", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    """A symlink to /dev/zero: reading it would fill memory; a device is refused before any read."""
    ws.data.unlink()
    ws.data.symlink_to("/dev/zero")


@hostile("data-is-a-pipe", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    """A FIFO nobody writes to: reading it would block forever."""
    ws.data.unlink()
    os.mkfifo(ws.data)


@hostile("data-csv-field-over-csv-limit", DATA_READERS, "data.csv", extra=("--data", CSV))
def _(ws: Workspace) -> None:
    """csv refuses a field over 131,072 characters (`field_size_limit`) with its own error."""
    _write(ws, "data.csv", 'text\n"' + "word " * 30_000 + '"\n')


@hostile("data-jsonl-line-over-the-bound", DATA_READERS, "data.jsonl", extra=("--data", JSONL))
def _(ws: Workspace) -> None:
    """One line of 1.2 million characters: far more than a run of a few dozen tokens reads."""
    _records(ws, {"text": "word " * 240_000})


@hostile("data-jsonl-nested-deeply", DATA_READERS, "data.jsonl", extra=("--data", JSONL))
def _(ws: Workspace) -> None:
    _write(ws, "data.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")


@hostile("data-jsonl-huge-integer", DATA_READERS, "data.jsonl", extra=("--data", JSONL))
def _(ws: Workspace) -> None:
    _write(ws, "data.jsonl", '{"text": "a b c", "id": ' + "9" * 50_000 + "}\n")


@hostile("data-chat-messages-a-string", DATA_READERS, "data.jsonl", extra=("--data", JSONL))
def _(ws: Workspace) -> None:
    """`messages` holding a string was read as plain text; it is not a chat."""
    _with_chat_template(ws)
    _records(ws, *({"messages": "user: hello there, how are you today?"} for _ in range(40)))


@hostile("data-chat-content-not-text", DATA_READERS, "data.jsonl", extra=("--data", JSONL))
def _(ws: Workspace) -> None:
    """A message whose content is a number or a list would be rendered by the template as whatever it prints."""
    _with_chat_template(ws)
    chat = [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": 4}]
    _records(ws, *({"messages": chat} for _ in range(40)))


# finetune --format chat|completion reads records itself (training.sft), from the one --data it is given:
# the records are written over data.txt (a second --data would be refused as a mix before any reading).


@hostile("data-records-messages-a-string", ("finetune",), "data.txt", extra=("--format", "chat"))
def _(ws: Workspace) -> None:
    ws.data.write_text(json.dumps({"messages": "user: hi"}) + "\n")


@hostile("data-records-never-end", ("finetune",), "data.txt", extra=("--format", "chat"))
def _(ws: Workspace) -> None:
    ws.data.unlink()
    ws.data.symlink_to("/dev/zero")


@hostile("data-records-line-over-the-bound", ("finetune",), "data.txt", extra=RECORDS)
def _(ws: Workspace) -> None:
    """A response of 1.2 million characters would be tokenized whole to keep its first --seq-len tokens."""
    record = json.dumps({"prompt": "say:", "completion": " ok" * 400_000})
    ws.data.write_text((record + "\n") * 4)
