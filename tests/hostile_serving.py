"""The generator's `serve-plugin` command: the vLLM plugin's loader run on a ragged checkpoint, without vLLM.

vLLM builds a ragged checkpoint's model by instantiating the plugin's class (`serving.vllm_plugin.RaggedMixin`
over vLLM's own model class); its `__init__` reads and checks the folder before any layer is built. Here that
`__init__` runs for real over a stand-in base class whose layers are built through `make_layers`, as vLLM's
are, and a stand-in `extract_layer_index` (vLLM's helper). A `ValueError` from it is what vLLM would report:
the stand-in words it as exit 1 with its message as the one line; any other exception is a traceback, as in
vLLM. The good input is a ragged checkpoint (`good_ragged`), so every case damages a checkpoint vLLM would
hand to the plugin. The plugin has no options: cases that only add arguments do not run through it.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hostile import Workspace, fresh_workspace, hostile

from moe_prune.architectures.config import RAGGED_KEY
from moe_prune.artifacts.mask import DropMask
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.serving.vllm_plugin import RaggedMixin

COMMAND = "serve-plugin"


@dataclass
class Result:
    """What the hostile runner reads of a CLI run."""

    exit_code: int
    stdout: str = ""
    stderr: str = ""
    exception: BaseException | None = None


def make_layers(num_hidden_layers: int, layer_fn: Any, prefix: str) -> list[Any]:
    """vLLM's `make_layers` as the plugin sees it: one `layer_fn(prefix=...)` call per decoder layer."""
    return [layer_fn(prefix=f"{prefix}.{i}") for i in range(num_hidden_layers)]


class StandInModel:
    """vLLM's model class under the plugin's mixin: builds its layers, recording each layer's expert count."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        self.layers = make_layers(config.num_hidden_layers, lambda prefix: config.num_local_experts, "model.layers")


class _HfConfig:
    """The engine's parsed config, read only once the plugin's check has passed (vLLM's own parse may refuse
    a damaged file first; the plugin must not rely on it, so the stand-in reads nothing before the check)."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return json.loads((self._folder / "config.json").read_text())[name]

    def to_dict(self) -> dict[str, Any]:
        return {}  # the fallback for a hub name; a local folder is read by the plugin itself


def serve(argv: list[str]) -> Result:
    """Run the plugin's loader on the folder `argv[0]` as vLLM would construct the ragged model."""
    folder = Path(argv[0])
    cls = type("MoePruneRaggedMixtralForCausalLM", (RaggedMixin, StandInModel), {"__module__": __name__})
    model_config = types.SimpleNamespace(model=str(folder), hf_config=_HfConfig(folder))
    model_config.hf_text_config = model_config.hf_config
    try:
        model = cls(vllm_config=types.SimpleNamespace(model_config=model_config))
    except ValueError as exc:
        return Result(1, stderr=f"{exc}\n")
    except Exception as exc:  # a traceback in vLLM: the runner reports it
        return Result(1, exception=exc)
    return Result(0, stdout=json.dumps(model.layers))


def stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one vLLM helper the plugin imports while building layers."""
    utils = types.ModuleType("vllm.model_executor.models.utils")
    utils.extract_layer_index = lambda prefix: int(prefix.rsplit(".", 1)[-1])  # type: ignore[attr-defined]
    for name in ("vllm", "vllm.model_executor", "vllm.model_executor.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, utils.__name__, utils)


# Experts kept per MoE layer: ragged, yet every tensor the checkpoint cases damage (layer 0's experts 6 and 7,
# layer 1's experts 4 and 5, all eight of layer 2 and its router's rows) is still there.
KEEP = (8, 6, 8)


@pytest.fixture(scope="session")
def good_ragged(good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The good workspace with its model replaced by a ragged copy written by prune, its one shard named
    model.safetensors as in the good model (the cases name that file)."""
    from moe_prune.stages import prune

    root = tmp_path_factory.mktemp("hostile-good-ragged") / "ws"
    ws = fresh_workspace(good, root)
    ckpt = Checkpoint.open(ws.model)
    ids = ckpt.identity.original_ids
    keep = {layer: list(ids[layer][:n]) for layer, n in zip(ckpt.identity.moe_layers, KEEP, strict=True)}
    prune.run(ws.model, DropMask.create(ckpt.identity, keep, "hostile"), root / "ragged")
    shutil.rmtree(ws.model)
    (root / "ragged").rename(ws.model)
    (shard,) = ws.model.glob("*.safetensors")
    shard.rename(ws.model / "model.safetensors")
    (ws.model / "model.safetensors.index.json").unlink()
    return root


def check_good(ws: Workspace, result: Result) -> None:
    """The good ragged checkpoint's layers are built each with its own expert count (not the config's largest)."""
    counts = json.loads((ws.model / "config.json").read_text())["moe_prune_ragged"]["experts_per_layer"]
    assert json.loads(result.stdout) == [counts[str(i)] for i in range(len(counts))]
    assert sorted(counts.values()) == sorted(KEEP), counts


# The moe_prune_ragged block damaged (tests/test_serving_plugin.py checks each message) ----------------
def set_block_field(block: dict, field: str, value) -> None:
    """Set `field` of the block; `a.b` sets key b of the dict a, a value None deletes it."""
    owner, _, key = field.rpartition(".")
    target = block[owner] if owner else block
    if value is None:
        del target[key]
    else:
        target[key] = value


# (field, value, what the one-line error says): each damage the reader must name.
DAMAGED = [
    ("experts_per_layer.1", None, "experts_per_layer lists layers"),  # wrong length
    ("experts_per_layer.1", 9, "experts_per_layer counts must be between 1 and the config's expert count"),
    ("experts_per_layer.0", -2, "experts_per_layer counts must be between 1"),
    ("experts_per_layer.0", "6", "experts_per_layer must map layer -> count"),
    ("experts_per_layer.0", 2.5, "experts_per_layer must map layer -> count"),
    ("top_k_per_layer.1", 7, "top_k_per_layer['1'] is 7; expected 1 to that layer's 3 experts"),
    ("top_k_per_layer.1", 0, "top_k_per_layer['1'] is 0"),
    ("top_k_per_layer.2", True, "top_k_per_layer['2'] is True"),
    ("top_k_per_layer.2", None, "top_k_per_layer must list the layers"),
    ("top_k_per_layer", [2, 2, 2], "top_k_per_layer must list the layers"),
    ("count_keys", ["no_such_field"], "count_keys names 'no_such_field'"),
    ("top_k_keys", "num_experts_per_tok", "top_k_keys must be a non-empty list"),
    ("format", 7, "format is 7"),
    ("base_class", 3, "base_class must be a class name"),
]


def _damage_block(field: str, value: Any) -> Any:
    def build(ws: Workspace) -> None:
        config = ws.config()
        set_block_field(config[RAGGED_KEY], field, value)
        ws.write_config(config)

    return build


for _field, _value, _ in DAMAGED:
    hostile(f"ragged-block-{_field}={_value!r}", (COMMAND,), "config.json")(_damage_block(_field, _value))
