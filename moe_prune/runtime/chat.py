"""Chat records (`messages`) as documents, and the one place they become text: the model's chat template.

A chat is kept as a `Chat` until `render` writes it with `tokenizer.apply_chat_template(messages,
tokenize=False)`, the text the model sees in chat use (role markers, special tokens and all). A tokenizer
without a template is refused in one line naming the file: a made-up plain format would calibrate the
model on text it never sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moe_prune.artifacts.common import describe
from moe_prune.errors import MoePruneError

CHAT_FIELD = "messages"


@dataclass(frozen=True)
class Chat:
    """A chat record (`messages`: dicts with a role), rendered to text only by `render`, with the model's template."""

    messages: tuple[dict[str, Any], ...]
    record: int  # its record number in the file, for error lines

    def chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages if isinstance(m.get("content"), str))


def chat(messages: list[Any], record: int, where: str) -> Chat:
    """Record number `record`'s messages, checked to be role-tagged dicts (`where` names the field for errors)."""
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise MoePruneError(f"{where} is not a list of chat messages ({{'role': ..., 'content': ...}})")
    for number, message in enumerate(messages, 1):
        if not isinstance(message.get("content"), str):
            kind = type(message.get("content")).__name__
            raise MoePruneError(f"{where}: message {number} has 'content' of type {kind}, not text")
    return Chat(tuple(messages), record)


def render(documents: Sequence[str | Chat], tokenizer: Any, source: str = "data") -> list[str]:
    """Text of every document; a chat through `tokenizer.apply_chat_template(messages, tokenize=False)`."""
    if not any(isinstance(d, Chat) for d in documents):
        return list(documents)  # type: ignore[arg-type]
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise MoePruneError(
            f"{source}: holds chat records ({CHAT_FIELD!r}), but the model's tokenizer has no chat template "
            "to render them with; give such data as text (a 'text' field) instead"
        )
    texts = []
    for doc in documents:
        if not isinstance(doc, Chat):
            texts.append(doc)
            continue
        try:
            texts.append(tokenizer.apply_chat_template(list(doc.messages), tokenize=False))
        except Exception as exc:  # jinja raises what the template author chose (TemplateError, ValueError, ...)
            raise MoePruneError(
                f"{source}: record {doc.record} cannot be rendered by the chat template ({describe(exc)})"
            ) from exc
    return texts
