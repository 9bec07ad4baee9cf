"""Hostile inputs, round 4 (registered with @hostile): the files beside the weights that loaders read later.

- generation_config.json, copied by prune/merge and read by transformers, lm-eval and vLLM at load: JSON
  that attacks the parser, a link outside the checkpoint, fields of the wrong type or out of range
  (`checkpoint.generation_config`), refused by every command that opens the model.
- activation names in config.json (`hidden_act`, `hidden_activation`) transformers does not know: refused
  by every model reader, prune, merge and score --model included (`architectures.activations`).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from hostile import LOADERS, MODEL_READERS, Workspace, hostile
from hostile_tasks import TASK, TASK_READERS, base_yaml

GENERATION = "generation_config.json"


def _generation_text(text: str | bytes) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.model / GENERATION
        path.unlink(missing_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return build


def _generation_field(field: str, value: object) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.model / GENERATION
        raw = json.loads(path.read_text()) if path.is_file() else {}
        raw[field] = value
        path.write_text(json.dumps(raw))

    return build


GENERATION_TEXTS = {
    "not-json": "{not json",
    "empty": "",
    "a-list": "[1, 2]",
    "nested-deep": "[" * 100_000 + "]" * 100_000,
    "huge-int": '{"max_length": ' + "9" * 5000 + "}",
    "duplicate-key": '{"eos_token_id": 1, "eos_token_id": 2}',
    "nan": '{"temperature": NaN}',
    "utf16": '{"eos_token_id": 2}'.encode("utf-16"),
}
for _name, _text in GENERATION_TEXTS.items():
    hostile(f"generation-{_name}", MODEL_READERS, GENERATION)(_generation_text(_text))

GENERATION_FIELDS = {
    "eos-a-string": ("eos_token_id", "</s>"),
    "eos-past-vocab": ("eos_token_id", 1_000_000),
    "eos-negative": ("eos_token_id", -5),
    "eos-list-with-a-string": ("eos_token_id", [2, "x"]),
    "eos-empty-list": ("eos_token_id", []),
    "bos-a-float": ("bos_token_id", 1.0),
    "pad-an-object": ("pad_token_id", {"id": 0}),
    "decoder-start-a-bool": ("decoder_start_token_id", True),
    "max-length-zero": ("max_length", 0),
    "max-length-a-string": ("max_length", "long"),
    "max-new-tokens-huge": ("max_new_tokens", 10**30),
    "num-beams-a-float": ("num_beams", 2.5),
    "do-sample-a-string": ("do_sample", "yes"),
    "temperature-a-string": ("temperature", "hot"),
    "temperature-negative": ("temperature", -1.0),
    "top-p-above-one": ("top_p", 1.5),
    "cache-implementation-unknown": ("cache_implementation", "evil"),
}
for _name, (_field, _value) in GENERATION_FIELDS.items():
    hostile(f"generation-{_name}", MODEL_READERS, GENERATION)(_generation_field(_field, _value))


@hostile("generation-links-outside", MODEL_READERS, GENERATION)
def _generation_links_outside(ws: Workspace) -> None:
    outside = ws.root / "outside.json"
    outside.write_text('{"eos_token_id": 2}')
    path = ws.model / GENERATION
    path.unlink(missing_ok=True)
    path.symlink_to(outside)


@hostile("generation-dangling-link", MODEL_READERS, GENERATION)
def _generation_dangling(ws: Workspace) -> None:
    path = ws.model / GENERATION
    path.unlink(missing_ok=True)
    path.symlink_to(ws.model / "missing.json")


def _config_field(field: str, value: object) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        config = ws.config()
        config[field] = value
        ws.write_config(config)

    return build


ACTIVATIONS = {
    "hidden-act-unknown": ("hidden_act", "evil"),
    "hidden-act-a-number": ("hidden_act", 5),
    "hidden-act-a-list": ("hidden_act", ["silu"]),
    "hidden-activation-unknown": ("hidden_activation", "gelu_evil"),
}
for _name, (_field, _value) in ACTIVATIONS.items():
    hostile(f"config-{_name}", MODEL_READERS, "config.json")(_config_field(_field, _value))


# Tokenizer files: a damaged one is named in the line, not the folder (`runtime.tokenizer_files`). ------------
def _file_text(relative: str, text: str | bytes) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.model / relative
        path.parent.mkdir(exist_ok=True)
        path.unlink(missing_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)

    return build


@hostile("tokenizer-json-truncated", LOADERS, "tokenizer.json")
def _tokenizer_truncated(ws: Workspace) -> None:
    path = ws.model / "tokenizer.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


@hostile("tokenizer-json-vocab-a-string", LOADERS, "tokenizer.json")
def _tokenizer_vocab_string(ws: Workspace) -> None:
    path = ws.model / "tokenizer.json"
    raw = json.loads(path.read_text())
    raw["model"]["vocab"] = "abc"
    path.write_text(json.dumps(raw))


TOKENIZER_TEXTS = {
    "tokenizer.json": ("not-json", "empty", "a-list", "nested-deep", "huge-int", "utf16"),
    "special_tokens_map.json": ("not-json", "a-list", "nested-deep"),
    "added_tokens.json": ("not-json", "a-list"),
}
for _file, _kinds in TOKENIZER_TEXTS.items():
    for _kind in _kinds:
        _text = GENERATION_TEXTS[_kind]
        _stem = _file.removesuffix(".json").replace("_", "-")
        hostile(f"{_stem}-{_kind}", LOADERS, _file)(_file_text(_file, _text))

TEMPLATES = {
    "chat-template-not-jinja": ("chat_template.jinja", "{% for m in messages %}{{ m.content }"),
    "chat-template-not-utf8": ("chat_template.jinja", b"{{ messages \xff\xfe }}"),
    "named-template-not-jinja": ("additional_chat_templates/tool_use.jinja", "{% if tools %}{{ tools }"),
}
for _name, (_file, _text) in TEMPLATES.items():
    hostile(_name, LOADERS, _file)(_file_text(_file, _text))


# Task templates that fail are refused when the task is loaded, naming the task's YAML, not mid-run. --------
# The first test document has gold 3 and the fourth gold 0: these fail on a later document only (with
# --limit 2, never in the run itself), or everywhere (the syntax error).
TEMPLATE_FAILURES = {
    "syntax-error": '"{{context"',
    "undefined-field-later": '"{% if gold == 0 %}{{ no_such_field }}{% endif %}{{context}}"',
    "sandbox-escape-later": "\"{% if gold == 0 %}{{ ''.__class__.__mro__ }}{% endif %}{{context}}\"",
}


def _task_template(template: str) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        folder = ws.root / "tasks"
        folder.mkdir()
        text = base_yaml().replace('doc_to_text: "{{context}}"', f"doc_to_text: {template}")
        (folder / f"{TASK}.yaml").write_text(text)

    return build


for _name, _template in TEMPLATE_FAILURES.items():
    for _command, _extra in TASK_READERS.items():
        hostile(f"task-template-{_name}-{_command}", (_command,), f"{TASK}.yaml", extra=_extra)(
            _task_template(_template)
        )


# What an attacker tries next (round 4 survey): outputs reaching into the model by another path, text
# encodings the JSON reader must name, sizes the weights contradict. ---------------------------------------
@hostile(
    "out-through-dotdot-into-the-model",
    ("prune", "merge", "finetune"),
    "input",
    extra=("--out", "{root}/x/../model/sub", "--force"),
)
def _nothing4(ws: Workspace) -> None:
    """The damage is in the arguments."""


hostile(
    "out-file-through-dotdot-into-the-model",
    ("profile",),
    "input",
    extra=("--out", "{root}/x/../model/s.npz", "--force"),
)(_nothing4)
hostile("score-out-inside-the-model", ("score-weights",), "input", extra=("--out", "{model}/mask.json", "--force"))(
    _nothing4
)
hostile(
    "eval-log-samples-inside-the-model",
    ("eval",),
    "input",
    extra=("--tasks", "demo_arithmetic", "--limit", "2", "--log-samples", "{model}/samples.jsonl", "--force"),
)(_nothing4)


def _alias(ws: Workspace) -> None:
    (ws.root / "alias").symlink_to(ws.model)


hostile(
    "out-through-a-symlinked-parent",
    ("prune", "merge", "finetune"),
    "input",
    extra=("--out", "{root}/alias/sub", "--force"),
)(_alias)
hostile("out-file-through-a-symlinked-parent", ("profile",), "input", extra=("--out", "{root}/alias/s.npz", "--force"))(
    _alias
)
hostile(
    "out-is-a-link-to-the-model", ("prune", "merge", "finetune"), "input", extra=("--out", "{root}/alias", "--force")
)(_alias)


def _encoded(relative: str, prefix: bytes, codec: str = "utf-8") -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.model / relative if not relative.startswith("/") else ws.root / relative[1:]
        path.write_bytes(prefix + path.read_text().encode(codec))

    return build


BOM = b"\xef\xbb\xbf"
for _file, _commands in (
    ("config.json", MODEL_READERS),
    ("tokenizer_config.json", LOADERS),
):
    hostile(f"{_file.removesuffix('.json').replace('_', '-')}-with-bom", _commands, _file)(_encoded(_file, BOM))
    hostile(f"{_file.removesuffix('.json').replace('_', '-')}-utf16", _commands, _file)(_encoded(_file, b"", "utf-16"))
hostile("tokenizer-json-with-bom", LOADERS, "tokenizer.json")(_encoded("tokenizer.json", BOM))
hostile("mask-with-bom", ("prune",), "mask.json")(_encoded("/mask.json", BOM))
hostile("data-utf16", ("profile", "eval", "finetune"), "data.txt")(_encoded("/data.txt", b"", "utf-16"))


def _config_value(field: str, value: object) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        config = ws.config()
        config[field] = value
        ws.write_config(config)

    return build


hostile("config-vocab-far-above-the-embedding", MODEL_READERS, "config.json")(_config_value("vocab_size", 1_000_000))
hostile("config-vocab-below-the-embedding", MODEL_READERS, "config.json")(_config_value("vocab_size", 64))
CONFIG_NONSENSE = {
    "pad-token-past-vocab": ("pad_token_id", 1000),
    "pad-token-negative": ("pad_token_id", -5),
    "eos-token-a-string": ("eos_token_id", "</s>"),
    "bos-token-past-vocab": ("bos_token_id", 10**6),
    "head-dim-zero": ("head_dim", 0),
    "head-dim-odd": ("head_dim", 7),
    "kv-heads-not-dividing": ("num_key_value_heads", 3),
    "rms-norm-eps-negative": ("rms_norm_eps", -1.0),
    "rope-theta-zero": ("rope_theta", 0),
    "rope-theta-negative": ("rope_theta", -10000.0),
    "sliding-window-negative": ("sliding_window", -4),
}
for _name, (_field, _value) in CONFIG_NONSENSE.items():
    hostile(f"config-{_name}", MODEL_READERS, "config.json")(_config_value(_field, _value))
