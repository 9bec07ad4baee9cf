"""vLLM general plugin: serve checkpoints whose MoE layers keep different numbers of experts ("ragged").

vLLM sizes every MoE layer from one config field, so a ragged checkpoint (whose config keeps the largest
count there and lists each layer's count under `moe_prune_ragged`) cannot load in stock vLLM. moe-prune
names such a checkpoint's architecture `MoePruneRagged<Base>` so an engine without this plugin refuses it.
This plugin, registered through the `vllm.general_plugins` entry point, maps that name to a subclass of
vLLM's own `<Base>` whose decoder layers are built one at a time with the config's expert-count and
top-k fields set to that layer's values: each layer gets vLLM's fused-MoE kernels at its own size, and
every weight loads under its usual name. `Ragged<Base>` (what transformers' `save_pretrained` writes for
moe-prune's transformers class, e.g. after finetuning) maps to the same class.

Multi-token-prediction (speculative decoding, `speculative_config={"method": "mtp"}`): vLLM picks the draft's
MTP class from the target's architecture name, which a ragged checkpoint hides; the plugin wraps vLLM's
`SpeculativeConfig.hf_config_override` to ask it under the base name, then names the plugin's subclass of that
MTP class (families whose row in checkpoint/serving.py names it), which builds the MTP layers at the count and
top-k of the last MoE layer, whose experts prune and merge gave them (vLLM's ERNIE-4.5 and EXAONE-MoE MTP layers
are dense: nothing to size, but vLLM drafts for a ragged checkpoint only through the name).

vLLM is imported only inside this module's functions and classes it creates; the CLI never imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import ModuleType
from typing import Any

from moe_prune.checkpoint.ragged import ARCHITECTURE_PREFIX, CLASS_PREFIX, ragged_architecture
from moe_prune.checkpoint.serving import SERVED, served_architecture, unserved_reason
from moe_prune.errors import MoePruneError
from moe_prune.serving.ragged_block import read_block

MTP_SERVED = {served.mtp: base for base, served in SERVED.items() if served.mtp}  # vLLM's MTP class -> family


def register() -> None:
    """The entry point vLLM calls in every process: register the ragged architectures lazily (by path).
    Families not in SERVED are not registered: vLLM refuses their ragged checkpoints by name."""
    from vllm import ModelRegistry

    for base in SERVED:
        target = f"{__name__}:{CLASS_PREFIX}{base}"
        ModelRegistry.register_model(ragged_architecture(base), target)
        ModelRegistry.register_model(f"{CLASS_PREFIX}{base}", target)
    for mtp in MTP_SERVED:
        ModelRegistry.register_model(ragged_architecture(mtp), f"{__name__}:{CLASS_PREFIX}{mtp}")
    from vllm.config.speculative import SpeculativeConfig

    global _STOCK_OVERRIDE
    if SpeculativeConfig.hf_config_override is not draft_override:  # once per process
        _STOCK_OVERRIDE = SpeculativeConfig.hf_config_override
        SpeculativeConfig.hf_config_override = staticmethod(draft_override)


_STOCK_OVERRIDE: Callable[[Any], Any] | None = None


def _ragged_base(architecture: str) -> str | None:
    """The served family a ragged architecture name (`MoePruneRagged<Base>` or `Ragged<Base>`) stands for."""
    for prefix in (ARCHITECTURE_PREFIX, CLASS_PREFIX):
        if architecture.startswith(prefix) and architecture[len(prefix) :] in SERVED:
            return architecture[len(prefix) :]
    return None


def draft_override(hf_config: Any) -> Any:
    """vLLM's draft-config override, asked under the base name for a ragged checkpoint: its MTP class becomes
    the plugin's (`MoePruneRagged<MTP class>`, then vLLM's own name, which vLLM's drafter also reads); an MTP class
    the plugin does not size is refused in one line.
    Module-level, so vLLM can pickle the draft config that holds it."""
    if _STOCK_OVERRIDE is None:  # unpickled in a process whose plugins vLLM has not loaded yet
        register()
    assert _STOCK_OVERRIDE is not None
    architecture = (getattr(hf_config, "architectures", None) or [""])[0]
    base = _ragged_base(architecture)
    if base is None:
        return _STOCK_OVERRIDE(hf_config)
    hf_config.architectures = [served_architecture(base)]
    result = _STOCK_OVERRIDE(hf_config)
    mtp = result.architectures[0]
    if mtp == served_architecture(base):  # not an MTP draft of this family: the name as it was
        result.architectures = [architecture]
    elif MTP_SERVED.get(mtp) != base:
        raise ValueError(
            f"{architecture}: moe-prune's vLLM plugin does not build {mtp} at a ragged checkpoint's expert counts; "
            "serve it without MTP speculative decoding, or prune with one count in every layer"
        )
    else:  # vLLM builds the first name it knows; it reads the second for the MTP class's output (model_returns_tuple)
        result.architectures = [ragged_architecture(mtp), mtp]
    return result


def _field(obj: Any, dotted: str) -> tuple[Any, str]:
    """The object holding a possibly nested config field (e.g. dbrx's `ffn_config.moe_num_experts`) and its name."""
    *parents, last = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    return obj, last


@contextmanager
def _layer_fields(configs: list[Any], spec: dict[str, Any], layer: int) -> Iterator[None]:
    """The expert-count and top-k fields of `configs` set to MoE layer `layer`'s values while inside."""
    key = str(layer)
    if key not in spec["experts_per_layer"]:
        yield  # a dense layer
        return
    values = {name: int(spec["experts_per_layer"][key]) for name in spec["count_keys"]}
    values.update({name: int(spec["top_k_per_layer"][key]) for name in spec["top_k_keys"]})
    saved = []
    try:
        for config in configs:
            for name, value in values.items():
                owner, attr = _field(config, name)
                saved.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, old in reversed(saved):
            setattr(owner, attr, old)


@contextmanager
def _sized_layers(modules: list[ModuleType], configs: list[Any], spec: dict[str, Any], built: set[int]):
    """While inside, `make_layers` of `modules` builds each layer under that layer's config values."""
    from vllm.model_executor.models.utils import extract_layer_index

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def make_layers(num_hidden_layers: int, layer_fn: Callable[..., Any], prefix: str) -> Any:
            def sized(*, prefix: str) -> Any:
                layer = extract_layer_index(prefix)
                built.add(layer)
                with _layer_fields(configs, spec, layer):
                    return layer_fn(prefix=prefix)

            return original(num_hidden_layers, sized, prefix)

        return make_layers

    with ExitStack() as stack:
        for module in modules:
            original = module.make_layers
            module.make_layers = wrap(original)
            stack.callback(setattr, module, "make_layers", original)
        yield


def _checked_block(model_config: Any, name: str) -> dict[str, Any]:
    """The checkpoint's ragged block, read and checked as moe-prune reads it; vLLM's one-line ValueError if not."""
    try:
        spec = read_block(str(model_config.model), model_config.hf_config.to_dict())
    except MoePruneError as exc:  # one line naming the config and the field, before vLLM builds a layer
        raise ValueError(f"{name}: {exc}") from exc
    reason = unserved_reason(spec["base_class"], {int(k): n for k, n in spec["experts_per_layer"].items()})
    if reason is not None:
        raise ValueError(f"{name}: {model_config.model}: {reason}")
    return spec


def _configs(*model_configs: Any) -> list[Any]:
    """vLLM's parsed configs and their text configs (the same object unless wrapped): all carry the count fields."""
    return list({id(c): c for m in model_configs for c in (m.hf_config, m.hf_text_config)}.values())


class RaggedMixin:
    """vLLM's model class, each MoE layer built with that layer's expert count and top-k."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        configs = _configs(model_config)
        name = type(self).__name__
        spec = _checked_block(model_config, name)
        modules = [
            module
            for module in {sys.modules[c.__module__] for c in type(self).__mro__ if c.__module__ != __name__}
            if callable(getattr(module, "make_layers", None))
        ]
        built: set[int] = set()
        with _sized_layers(modules, configs, spec, built):
            super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        if not built:
            raise ValueError(f"{name}: vLLM's model did not build its layers through make_layers; cannot size them")


class RaggedMtpMixin:
    """vLLM's multi-token-prediction class, its MTP layers built at the last MoE layer's expert count and top-k."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        model_config = vllm_config.model_config  # the draft's: vLLM builds its MTP model under the draft config
        spec = _checked_block(model_config, type(self).__name__)
        last = max(int(layer) for layer in spec["experts_per_layer"])
        # some MTP layers (DeepSeek's) read the speculative config's draft config, a copy of model_config
        draft = getattr(getattr(vllm_config, "speculative_config", None), "draft_model_config", None)
        with _layer_fields(_configs(model_config, *([draft] if draft is not None else [])), spec, last):
            super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]


def __getattr__(name: str) -> type:
    """`Ragged<Base>` (or `Ragged<MTP class>`): a subclass of vLLM's class with per-layer expert counts, created on
    first access."""
    base_name = name.removeprefix(CLASS_PREFIX)
    if not name.startswith(CLASS_PREFIX) or (base_name not in SERVED and base_name not in MTP_SERVED):
        raise AttributeError(name)
    from vllm import ModelRegistry

    mixin = RaggedMtpMixin if base_name in MTP_SERVED else RaggedMixin
    architecture = base_name if base_name in MTP_SERVED else served_architecture(base_name)
    base = ModelRegistry.models[architecture].load_model_cls()
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": mixin.__doc__}
    cls = type(name, (mixin, base), namespace)
    globals()[name] = cls
    return cls
