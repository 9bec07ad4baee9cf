"""Which tokenizer file is at fault when a tokenizer fails to load, so the one-line error names it.

transformers and tokenizers report a damaged file in their own words (a JSON error with no file name, a
Rust panic, a KeyError), and the folder alone tells a user nothing. Once loading failed, each file of the
folder a tokenizer may read is checked in turn with moe-prune's own readers: JSON through the bounded
`parse_json`, text files (vocabularies, merges, Jinja templates) as UTF-8, templates as Jinja; the first
that fails is named. Otherwise the file the exception names, and only if none can be found, the folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from moe_prune.artifacts.common import MAX_JSON_BYTES, decode_utf8, describe, json_type, parse_json, read_capped
from moe_prune.errors import MoePruneError

# Files of a checkpoint folder that are the model's, not the tokenizer's (checked when the checkpoint opens).
NOT_TOKENIZER = ("config.json", "generation_config.json", "model.safetensors.index.json", "moe_prune.json")
# Extensions a tokenizer reads as text; other files (sentencepiece .model, tiktoken) are named only when the
# exception names them.
TEXT_SUFFIXES = (".txt", ".jinja", ".merges", ".vocab")
TEMPLATE_FOLDER = "additional_chat_templates"
FAST_FILE = "tokenizer.json"


def tokenizer_error(folder: Path, exc: BaseException) -> MoePruneError:
    """A one-line error for a tokenizer of `folder` that failed to load with `exc`, naming the file at fault."""
    for path in _candidates(folder):
        try:
            _check(path)
        except MoePruneError as found:
            return MoePruneError(f"{found} (the tokenizer could not be loaded)")
    named = _named_file(folder, exc)
    where = named if named is not None else folder
    return MoePruneError(f"{where}: could not load a tokenizer ({describe(exc)[:300]})")


def check_tokenizer_sizes(folder: Path) -> None:
    """No tokenizer file (JSON or text) is larger than the bounded reader reads, before tokenizers reads it whole.

    The tokenizers library parses tokenizer.json in one piece, and its vocabulary and merges take several times
    the file's size in memory: a file of gigabytes (a merges list padded to any length) is refused unread. The
    largest real tokenizer.json files are a few tens of MB, under `MAX_JSON_BYTES`.
    """
    for path in _candidates(folder):
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise MoePruneError(
                f"{path}: tokenizer file of {size} bytes is larger than the {MAX_JSON_BYTES} bytes moe-prune reads"
            )


def _candidates(folder: Path) -> Iterator[Path]:
    """Files a tokenizer may read: the folder's own (JSON and text) and its chat templates, in name order."""
    tops = sorted(p for p in folder.iterdir() if p.name not in NOT_TOKENIZER and not p.name.startswith("."))
    templates = folder / TEMPLATE_FOLDER
    extra = sorted(templates.iterdir()) if templates.is_dir() and not templates.is_symlink() else []
    for path in (*tops, *extra):
        if (path.suffix == ".json" or path.suffix in TEXT_SUFFIXES) and path.is_file():
            yield path


def _check(path: Path) -> None:
    """Raise the one-line error of moe-prune's own reader for `path`, if it refuses it."""
    blob, name = read_capped(path, "tokenizer file")
    text = decode_utf8(blob, name, "tokenizer file")
    if path.suffix == ".json":
        if not text.strip():
            raise MoePruneError(f"{name}: tokenizer file is empty")
        obj = parse_json(text, name, "tokenizer file", duplicates=True)  # tokenizers lets the last key win
        if not isinstance(obj, dict):  # every JSON file of a tokenizer is an object
            raise MoePruneError(f"{name}: tokenizer file must be a JSON object, not {json_type(obj)}")
        if path.name == FAST_FILE:
            _check_fast(text, name)
    elif path.suffix == ".jinja":
        _check_template(text, name)


def _check_fast(text: str, name: str) -> None:
    """tokenizer.json as the `tokenizers` library reads it (its own errors name no file)."""
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises plain Exception for a file it cannot read
        raise MoePruneError(f"{name}: the tokenizers library cannot read it ({describe(exc)[:200]})") from exc


def check_templates(folder: Path) -> None:
    """Every chat template of the folder parses as Jinja: a broken one fails here, in one line naming its file,
    not when a chat record or a server first renders it (transformers compiles templates lazily)."""
    templates = folder / TEMPLATE_FOLDER
    files = [folder / "chat_template.jinja", *(sorted(templates.glob("*.jinja")) if templates.is_dir() else [])]
    for path in files:
        if path.is_file():
            blob, name = read_capped(path, "chat template")
            _check_template(decode_utf8(blob, name, "chat template"), name)
    for json_name in ("tokenizer_config.json", "chat_template.json"):
        path = folder / json_name
        if not path.is_file():
            continue
        blob, name = read_capped(path, "tokenizer file")
        obj = parse_json(decode_utf8(blob, name, "tokenizer file"), name, "tokenizer file", duplicates=True)
        template = obj.get("chat_template") if isinstance(obj, dict) else None
        named = template if isinstance(template, list) else [{"template": template}]
        for entry in named:
            text = entry.get("template") if isinstance(entry, dict) else None
            if isinstance(text, str):
                _check_template(text, f"{name} chat_template")


def _check_template(text: str, name: str) -> None:
    """A chat template must at least parse as Jinja (it is rendered in transformers' sandbox later)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(text)
    except TemplateSyntaxError as exc:
        raise MoePruneError(f"{name}: chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from exc


def _named_file(folder: Path, exc: BaseException) -> Path | None:
    """A file of `folder` the exception (or one it was raised from) names: by OSError.filename or in its text."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: -len(p.name))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        filename = getattr(current, "filename", None)
        if isinstance(filename, str) and Path(filename).name:
            for path in files:
                if Path(filename) in (path, path.resolve()):
                    return path
        text = str(current)
        for path in files:
            if str(path.relative_to(folder)) in text:
                return path
        current = current.__cause__ or current.__context__
    return None
