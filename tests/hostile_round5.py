"""Hostile inputs, round 5 (registered with @hostile): what the round-4 survey's author tries next.

- Artifacts and work files that are not regular files: a named pipe nobody writes to blocks a plain
  open() forever, a link to /dev/zero never ends. Every file moe-prune reads (masks, statistics, recipes,
  a sweep's results, task YAMLs) is opened without blocking and refused unless it is a regular file
  (`artifacts.common.open_regular`).
- config.json names what transformers looks up at load: a dtype torch lacks or one that is not floating
  point, an attention implementation it does not ship (or a Hub kernel repository: code), a RoPE type it
  cannot compute, `architectures` that is no list of names; and numbers with a range: a RoPE `factor` of
  0 or below, a dropout above 1 (`architectures.config_values`).
- Indexes that name one shard file twice (read, and loaded, twice) or carry no `metadata` object
  (transformers reads `index["metadata"]`).
- Tokenizer files larger than the bounded reader reads (tokenizers parses tokenizer.json whole).
- Guards that already held when this round was written (data formats, weights' index paths, recipes,
  odd file names): kept so that they keep holding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hostile import DATA_READERS, LOADERS, MODEL_READERS, STATS_READERS, Workspace, hostile
from hostile_parsing import INDEX, RECIPE_PARAMS, _recipe, write_index
from hostile_tasks import TASK, TASK_READERS, base_yaml
from typer.testing import CliRunner

from moe_prune.artifacts.common import MAX_JSON_BYTES
from moe_prune.cli import app


def _fifo(path_of: Callable[[Workspace], Path]) -> Callable[[Workspace], None]:
    """A named pipe nobody writes to, in place of the file."""

    def build(ws: Workspace) -> None:
        path = path_of(ws)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        os.mkfifo(path)

    return build


def _dev_zero(path_of: Callable[[Workspace], Path]) -> Callable[[Workspace], None]:
    """A link to /dev/zero, in place of the file: reading never ends."""

    def build(ws: Workspace) -> None:
        path = path_of(ws)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.symlink_to("/dev/zero")

    return build


# ---- files that are not regular files ------------------------------------------------------------------------
SPECIAL = {"is-a-fifo": _fifo, "never-ends": _dev_zero}
for _kind, _make in SPECIAL.items():
    hostile(f"mask-{_kind}", ("prune",), "mask.json")(_make(lambda ws: ws.mask))
    hostile(f"stats-{_kind}", STATS_READERS, "stats.npz")(_make(lambda ws: ws.stats))
    hostile(f"stats2-{_kind}", ("combine",), "stats2.npz")(_make(lambda ws: ws.stats2))
    hostile(f"eval-data-{_kind}", ("finetune",), "eval.txt", extra=("--eval-data", "{root}/eval.txt"))(
        _make(lambda ws: ws.root / "eval.txt")
    )


def _recipe_special(make: Callable) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        ws.out.mkdir()
        make(lambda w: w.out / "recipe.json")(ws)

    return build


def _sweep_results_special(make: Callable) -> Callable[[Workspace], None]:
    """A finished sweep in --out (the one the command reruns, so it resumes), its results.jsonl replaced."""

    def build(ws: Workspace) -> None:
        from hostile import COMMANDS

        result = CliRunner().invoke(app, COMMANDS["sweep"](ws))
        assert result.exit_code == 0, result.output
        make(lambda w: w.out / "results.jsonl")(ws)

    return build


def _task_special(make: Callable) -> Callable[[Workspace], None]:
    """A task folder whose one YAML beside a good task is not a regular file."""

    def build(ws: Workspace) -> None:
        folder = ws.root / "tasks"
        folder.mkdir()
        (folder / f"{TASK}.yaml").write_text(base_yaml())
        make(lambda w: folder / "other.yaml")(ws)

    return build


for _kind, _make in SPECIAL.items():
    hostile(f"recipe-{_kind}", ("lottery",), "recipe.json")(_recipe_special(_make))
    hostile(f"sweep-results-{_kind}", ("sweep",), "results.jsonl")(_sweep_results_special(_make))
    for _command, _extra in TASK_READERS.items():
        hostile(f"task-yaml-{_kind}-{_command}", (_command,), "other.yaml", extra=_extra)(_task_special(_make))


# ---- config.json: names transformers looks up, and ranges ---------------------------------------------------------
def _config_value(field: str, value: object) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        config = ws.config()
        config[field] = value
        ws.write_config(config)

    return build


CONFIG_NAMES = {
    "dtype-a-number": ("dtype", 5),
    "dtype-not-floating": ("dtype", "int8"),
    "torch-dtype-torch-lacks": ("torch_dtype", "bfloat17"),
    "attn-implementation-unknown": ("attn_implementation", "evil"),
    "private-attn-implementation-unknown": ("_attn_implementation", "evil"),
    "attn-implementation-a-list": ("attn_implementation", ["sdpa"]),
    "rope-type-unknown": ("rope_scaling", {"rope_type": "evil", "factor": 2.0}),
    "rope-legacy-type-unknown": ("rope_scaling", {"type": "evil", "factor": 2.0}),
    "rope-factor-negative": ("rope_scaling", {"rope_type": "linear", "factor": -2.0}),
    "rope-factor-zero": ("rope_scaling", {"rope_type": "linear", "factor": 0}),
    "attention-dropout-above-one": ("attention_dropout", 2.0),
    "attention-dropout-negative": ("attention_dropout", -0.1),
    "architectures-a-string": ("architectures", "MixtralForCausalLM"),
    "architectures-list-of-numbers": ("architectures", [1]),
    # Held before this round: the guards stay.
    "top-k-a-float": ("num_experts_per_tok", 2.0),
    "top-k-a-bool": ("num_experts_per_tok", True),
    "top-k-negative": ("num_experts_per_tok", -1),
    "tie-embeddings-a-string": ("tie_word_embeddings", "yes"),
    "hidden-size-negative": ("hidden_size", -64),
    "max-positions-a-string": ("max_position_embeddings", "4096"),
    "vocab-zero": ("vocab_size", 0),
}
for _name, (_field, _value) in CONFIG_NAMES.items():
    hostile(f"config-{_name}", MODEL_READERS, "config.json")(_config_value(_field, _value))

# A Hub kernel is code transformers fetches and runs: refused by every command that would load the model
# (prune and merge copy config.json as they copy an auto_map, and run nothing).
hostile("config-attn-implementation-hub-kernel", LOADERS, "config.json")(
    _config_value("attn_implementation", "kernels-community/flash-attn")
)


# ---- the index -------------------------------------------------------------------------------------------------------
def _index(edit: Callable[[Workspace, dict], None]) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = write_index(ws)
        obj = json.loads(path.read_text())
        edit(ws, obj)
        path.write_text(json.dumps(obj))

    return build


def _first(obj: dict) -> str:
    return sorted(obj["weight_map"])[0]


INDEX_EDITS: dict[str, Callable[[Workspace, dict], None]] = {
    "names-a-shard-twice": lambda ws, obj: obj["weight_map"].update({_first(obj): f"./{ws.shard().name}"}),
    "metadata-a-list": lambda ws, obj: obj.update(metadata=[1]),
    "metadata-missing": lambda ws, obj: obj.pop("metadata"),
    # Held before this round.
    "names-an-absolute-path": lambda ws, obj: obj["weight_map"].update({_first(obj): str(ws.shard())}),
    "names-a-folder": lambda ws, obj: (
        (ws.model / "shard.safetensors").mkdir(),
        obj["weight_map"].update({_first(obj): "shard.safetensors"}),
    ),
    "weight-map-a-list": lambda ws, obj: obj.update(weight_map=list(obj["weight_map"])),
}
for _name, _edit in INDEX_EDITS.items():
    hostile(f"index-{_name}", MODEL_READERS, INDEX)(_index(_edit))


# ---- held before this round: data formats, statistics, recipes, odd names ------------------------------------
def _data_file(name: str, content: str | bytes) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        path = ws.root / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return build


DATA_FILES = {
    "json-a-number": ("data.json", "5"),
    "json-data-a-string": ("data.json", '{"data": "hello"}'),
    "json-records-without-text": ("data.json", json.dumps([{"other": "x"}] * 10)),
    "json-text-a-number": ("data.json", json.dumps([{"text": 5}] * 10)),
    "json-nested-deeply": ("data.json", "[" * 100_000 + "]" * 100_000),
    "jsonl-record-a-list": ("data.jsonl", "[1, 2]\n" * 10),
    "jsonl-not-json": ("data.jsonl", "{not json\n" * 10),
    "parquet-not-parquet": ("data.parquet", b"PAR1garbagePAR1"),
    "parquet-empty": ("data.parquet", b""),
    "csv-no-text-column": ("data.csv", "other\nx\ny\n"),
    "csv-not-utf8": ("data.csv", b"text\n\xff\xfe\n"),
}
for _name, (_file, _content) in DATA_FILES.items():
    hostile(f"data-{_name}", DATA_READERS, _file, extra=("--data", f"{{root}}/{_file}"))(_data_file(_file, _content))


@hostile("data-parquet-without-text", DATA_READERS, "data.parquet", extra=("--data", "{root}/data.parquet"))
def _parquet_without_text(ws: Workspace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"other": ["x"] * 50}), ws.root / "data.parquet")


# A name with a newline is still one line (the line joins it), naming the file.
hostile("data-name-with-a-newline", DATA_READERS, "bad.txt", extra=("--data", "{root}/d\nbad.txt"))(
    _data_file("d\nbad.txt", "")
)


@hostile("stats-nan-in-every-float-field", STATS_READERS, "stats.npz")
def _stats_nan(ws: Workspace) -> None:
    arrays = ws.stats_arrays()
    for key, array in arrays.items():
        if array.dtype.kind == "f" and array.size:
            arrays[key] = array.copy()
            arrays[key].flat[0] = np.nan
    ws.write_stats(arrays)


hostile("recipe-target-ratio-a-string", ("lottery",), "recipe.json")(_recipe({**RECIPE_PARAMS, "target_ratio": "nan"}))
# Values of the right type but out of range: the run's settings differ from the recipe's, so the folder is
# refused as another run's (naming --out) before any value is used.
RECIPE_RANGES = {
    "rounds-huge": {"rounds": 10**18},
    "rounds-negative": {"rounds": -1},
    "target-ratio-above-one": {"target_ratio": 2.0},
    "samples-negative": {"profile_samples": -5},
    "criterion-unknown": {"criterion": "evil"},
}
for _name, _edit in RECIPE_RANGES.items():
    hostile(f"recipe-{_name}", ("lottery",), "ws/out")(_recipe({**RECIPE_PARAMS, **_edit}))


# ---- tokenizer files past the bounded reader's size: tokenizers would parse them whole ------------------------
@hostile("tokenizer-json-over-the-bound", LOADERS, "tokenizer.json")
def _tokenizer_over_the_bound(ws: Workspace) -> None:
    """Valid JSON (the padding is whitespace) one byte over the cap: without the cap it loads."""
    path = ws.model / "tokenizer.json"
    text = path.read_bytes()
    path.write_bytes(text + b" " * (MAX_JSON_BYTES + 1 - len(text)))
