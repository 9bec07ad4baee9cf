"""The recipe of a lottery run: every parameter, the inputs' fingerprints, the seeds and the tool version.

Written to `DIR/recipe.json` before the first round. It serves twice: `moe-prune lottery --recipe
DIR/recipe.json --out NEW` runs the same experiment again (refused when the model or data changed
since), and an interrupted run resumes only when its recipe matches the one in DIR, field by field.
Fingerprints are `artifacts.provenance`'s (weights hashed only up to its `WEIGHT_HASH_LIMIT` bytes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from moe_prune import __version__
from moe_prune.artifacts.common import check_header, dump_json, is_int, json_type, read_json
from moe_prune.demo import DEMO_HELDOUT
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file
from moe_prune.runtime.data import check_split_on

RECIPE_SCHEMA = "moe-prune/lottery-recipe"
RECIPE_VERSION = 1
RECIPE_NAME = "recipe.json"


@dataclass(frozen=True)
class LotteryParams:
    """Everything that decides a lottery run's result (see `moe-prune lottery --help` for each field)."""

    model: str
    criterion: str
    data: str | list[str]  # one `--data` value, or several SOURCE:SHARE values mixed (runtime.sources)
    target_ratio: float = 0.5
    rounds: int | None = None  # None: one expert per layer per round (the paper)
    direction: str | None = None  # None: the criterion's own
    finetune: bool = True
    compare: bool = False
    tokens_first: int = 200_000
    lr: float = 1e-5
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    profile_samples: int = 256
    profile_seq_len: int = 2048
    profile_batch_size: int = 8
    seed: int = 0
    text_field: str = "text"
    split_on: str = "none"  # how .txt files become documents (runtime.data.SPLIT_ON)
    eval_data: str = str(DEMO_HELDOUT)
    eval_tokens: int = 16_384

    def check(self) -> None:
        """Cheap checks of the numbers alone (the rest needs the model)."""
        for name in ("profile_samples", "profile_batch_size", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise MoePruneError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if min(self.seq_len, self.profile_seq_len) < 2:
            raise MoePruneError("--seq-len and --profile-seq-len must be at least 2")
        if self.eval_tokens < 0:
            raise MoePruneError(f"--eval-tokens must not be negative (got {self.eval_tokens})")
        if self.direction not in (None, "min", "max"):
            raise MoePruneError(f"--direction must be min or max, not {self.direction!r}")
        check_split_on(self.split_on)
        if self.compare and not self.finetune:
            raise MoePruneError(
                "--compare runs one-shot, iterative, the lottery and one-shot + finetune (finetuning); "
                "drop --no-finetune"
            )

    @classmethod
    def from_dict(cls, obj: Any, name: str) -> LotteryParams:
        """The params block of a recipe file, every field of its declared JSON type (a recipe may be hand-edited)."""
        known = {f.name for f in fields(cls)}
        if not isinstance(obj, dict) or set(obj) - known or {"model", "criterion", "data"} - set(obj):
            raise MoePruneError(f"{name}: malformed 'params' block (expected the fields {', '.join(sorted(known))})")
        hints = get_type_hints(cls)
        for key, value in obj.items():
            if not _has_type(value, hints[key]):
                raise MoePruneError(f"{name}: params.{key} must be {_describe_type(hints[key])}, not {_shown(value)}")
        return cls(**{key: float(v) if hints[key] is float else v for key, v in obj.items()})


def _has_type(value: Any, hint: Any) -> bool:
    """`value` (parsed JSON) fits the annotation `hint`: str, bool, int, float, None, list[str] and unions of them."""
    if get_origin(hint) in (Union, UnionType):
        return any(_has_type(value, arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)  # JSON writes 1.0 as 1 sometimes
    if hint is int:
        return is_int(value)
    return type(value) is hint


def _shown(value: Any) -> str:
    """A wrong value in a message: its JSON type, and a short repr unless it is null."""
    return "null" if value is None else f"{json_type(value)} {value!r:.80}"


def _describe_type(hint: Any) -> str:
    """An annotation in JSON's words, for messages."""
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_describe_type(arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        return f"a list of {_describe_type(get_args(hint)[0]).split(' ', 1)[1]}s"
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", type(None): "null"}[hint]


def local_path(source: str) -> str:
    """An existing local path made absolute (so the recipe works from any folder); hub ids unchanged."""
    path = Path(source).expanduser()
    return str(path.absolute()) if path.exists() else source


@dataclass
class Recipe:
    """Parameters plus what they were applied to; `fingerprint()` is what a resumed run must match."""

    params: LotteryParams
    inputs: dict[str, Any]
    schedule: dict[str, Any]
    tool_version: str = __version__

    def fingerprint(self) -> dict[str, Any]:
        return json.loads(json.dumps({"params": asdict(self.params), "inputs": self.inputs}))

    def digest(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RECIPE_SCHEMA,
            "version": RECIPE_VERSION,
            "tool_version": self.tool_version,
            "params": asdict(self.params),
            "inputs": self.inputs,
            "schedule": self.schedule,
            "fingerprint": self.digest(),
        }

    def write(self, path: Path) -> None:
        """Atomically (temporary file beside it, then rename)."""
        with atomic_file(path, force=True) as tmp:
            tmp.write_text(dump_json(self.to_dict()))

    @classmethod
    def read(cls, path: str | Path) -> Recipe:
        obj, name = read_json(path, "lottery recipe")
        check_header(obj, RECIPE_SCHEMA, RECIPE_VERSION, name)
        params = LotteryParams.from_dict(obj.get("params"), name)
        inputs, schedule = obj.get("inputs"), obj.get("schedule")
        if not isinstance(inputs, dict) or not isinstance(schedule, dict):
            raise MoePruneError(f"{name}: malformed recipe (needs 'inputs' and 'schedule' objects)")
        version = obj.get("tool_version")
        if not isinstance(version, str):
            raise MoePruneError(f"{name}: tool_version must be a string, not {json_type(version)}")
        return cls(params, inputs, schedule, version)
