"""The recipe of a lottery run: every parameter, the inputs' fingerprints, the seeds and the tool version.

Written to `DIR/recipe.json` before the first round. It serves twice: `moe-prune lottery --recipe
DIR/recipe.json --out NEW` runs the same experiment again (refused when the model or data changed
since), and an interrupted run resumes only when its recipe matches the one in DIR, field by field.
Fingerprints are `artifacts.provenance`'s (weights hashed only up to its `WEIGHT_HASH_LIMIT` bytes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_prune import __version__
from moe_prune.artifacts.common import check_header, dump_json, json_type, read_json
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file
from moe_prune.specs.fields import fingerprint, record
from moe_prune.specs.lottery import LotteryParams as LotteryParams

RECIPE_SCHEMA = "moe-prune/lottery-recipe"
RECIPE_VERSION = 1
RECIPE_NAME = "recipe.json"


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
        return json.loads(json.dumps({"params": fingerprint(self.params), "inputs": self.inputs}))

    def digest(self) -> str:
        blob = json.dumps(self.fingerprint(), sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": RECIPE_SCHEMA,
            "version": RECIPE_VERSION,
            "tool_version": self.tool_version,
            "params": record(self.params),
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
