"""moe-prune's vLLM paths leave the caller's state as they found it, run here over stand-ins for vLLM (no vLLM needed).

`runtime.vllm_engine.served` may need VLLM_ALLOW_LONG_MAX_MODEL_LEN while its engine lives; a later evaluation or
caller in the same process must not inherit it. The plugin (`serving.vllm_plugin.RaggedMixin`) sets the expert-count
and top-k fields of vLLM's parsed config to each layer's values while that layer is built: vLLM keeps reading that
config object afterwards (and the user may hold it), so it must come back unchanged, also when a layer fails.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from hostile_serving import make_layers, stand_in_vllm
from test_serving_plugin import ragged_prune

from moe_prune.errors import MoePruneError
from moe_prune.runtime import vllm_engine
from moe_prune.serving.vllm_plugin import RaggedMixin

FLAG = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"


def stand_in_llm(monkeypatch: pytest.MonkeyPatch, fail: bool) -> list[str | None]:
    """A `vllm` module whose LLM records the flag it was built under (and raises, if `fail`)."""
    seen: list[str | None] = []

    class LLM:
        def __init__(self, **kwargs: Any) -> None:
            seen.append(os.environ.get(FLAG))
            if fail:
                raise ValueError("max_model_len is past the model's context")

    module = types.ModuleType("vllm")
    module.LLM = LLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    return seen


@pytest.mark.parametrize("before", [None, "0"], ids=["unset", "set-by-user"])
@pytest.mark.parametrize("fail", [False, True], ids=["served", "refused"])
def test_served_restores_the_long_context_flag(monkeypatch, tmp_path, before, fail):
    if before is None:
        monkeypatch.delenv(FLAG, raising=False)
    else:
        monkeypatch.setenv(FLAG, before)
    seen = stand_in_llm(monkeypatch, fail)
    if fail:
        refused = pytest.raises(MoePruneError, match="vLLM could not serve the model")
        with refused, vllm_engine.served(tmp_path, "float32", 8, False, past_context=True):
            pass
    else:
        with vllm_engine.served(tmp_path, "float32", 8, False, past_context=True):
            assert os.environ.get(FLAG) == "1"
    assert seen == ["1"]  # the engine was built with the flag
    assert os.environ.get(FLAG) == before


def test_served_within_context_leaves_the_flag_alone(monkeypatch, tmp_path):
    monkeypatch.delenv(FLAG, raising=False)
    seen = stand_in_llm(monkeypatch, fail=False)
    with vllm_engine.served(tmp_path, "float32", 8, False, past_context=False):
        pass
    assert seen == [None] and FLAG not in os.environ


@pytest.fixture(scope="module")
def ragged_folder(tmp_path_factory) -> Path:
    from tiny_models import build_tiny

    tmp = tmp_path_factory.mktemp("vllm_state")
    build_tiny("mixtral", tmp / "model")
    ragged_prune(tmp / "model", [6, 3, 5], tmp / "ragged")
    return tmp / "ragged"


class StandInModel:
    """vLLM's model class under the mixin: each layer records the counts it was built with; layer `fail_at`
    raises (vLLM refusing a layer), after the plugin has set that layer's fields."""

    fail_at: int | None = None

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config

        def layer(prefix: str) -> tuple[int, int]:
            if int(prefix.rsplit(".", 1)[-1]) == self.fail_at:
                raise RuntimeError("no kernel for this layer")
            return config.num_local_experts, config.num_experts_per_tok

        self.layers = make_layers(config.num_hidden_layers, layer, "model.layers")


@pytest.mark.parametrize("fail_at", [None, 1], ids=["built", "layer-fails"])
def test_plugin_leaves_vllms_config_unchanged(ragged_folder, monkeypatch, fail_at):
    stand_in_vllm(monkeypatch)
    raw = json.loads((ragged_folder / "config.json").read_text())
    hf_config = types.SimpleNamespace(**copy.deepcopy(raw), to_dict=lambda: copy.deepcopy(raw))
    before = dict(vars(hf_config))
    model_config = types.SimpleNamespace(model=str(ragged_folder), hf_config=hf_config, hf_text_config=hf_config)
    cls = type("MoePruneRaggedMixtralForCausalLM", (RaggedMixin, StandInModel), {"fail_at": fail_at})
    if fail_at is None:
        model = cls(vllm_config=types.SimpleNamespace(model_config=model_config))
        assert model.layers == [(6, 2), (3, 2), (5, 2)]  # each layer at its own size while built
    else:
        with pytest.raises(RuntimeError, match="no kernel"):
            cls(vllm_config=types.SimpleNamespace(model_config=model_config))
    assert vars(hf_config) == before
    assert hf_config.num_local_experts == raw["num_local_experts"] == 6
