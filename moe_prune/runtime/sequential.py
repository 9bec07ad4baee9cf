"""Run a model one decoder layer at a time, straight from its safetensors files (`profile`/`eval --sequential`).

Why: a model larger than memory still profiles in one layer's worth of memory plus the hidden
states of the calibration set. How, reusing transformers for everything family-specific:

  skeleton    the model is built on the meta device (parameters only; buffers such as rotary
              frequencies are computed for real), so module paths match the whole-model load and
              the statistics hooks find `{runtime_layers}.{L}.{router}` as usual;
  weights     checkpoint keys are renamed/fused by transformers' own conversion mapping (the one
              `from_pretrained` applies), grouped by the decoder layer they land in; one layer's
              tensors are read with `safetensors.safe_open` and loaded by transformers'
              `convert_and_load_state_dict_in_model`, then dropped back to meta after use;
              quantized tensors (FP8 with block scales, MXFP4) are dequantized here, tensor by
              tensor, by `checkpoint.quantized.read_float` and loaded as the float tensors;
              per-expert tensors that a converter stacks into a fused parameter are read
              straight into that parameter, allocated once (`runtime.fused`), so a layer's
              experts are never held twice (the memory contract of issue #24);
  layer calls every decoder layer is first replaced by a stub and the model's own forward is run
              on the input embeddings: the stubs record the layer's input hidden states and
              exactly the arguments the model passes to each layer (masks per layer type,
              rotary embeddings, position ids), so no family's forward is re-implemented;
  buffer      hidden states [sequences, seq_len, hidden] in the model's dtype, in memory or, above
              `buffer_memory` bytes, in a memory-mapped temporary file; each layer overwrites
              its input with its output batch by batch.

The same batches run through the same layers as in the whole-model pass, so the statistics agree
to float rounding (in practice bit for bit on CPU).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_prune.architectures.table import NO_SEQUENTIAL
from moe_prune.checkpoint.quantized import Quantization, group, read_float
from moe_prune.errors import MoePruneError
from moe_prune.runtime import expert_chunks, fused
from moe_prune.runtime.skeleton import finite, model_skeleton, quiet_transformers

NUMPY_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class _Stop(Exception):
    """Raised by the last stub: nothing after the decoder layers (final norm, head) is needed."""


class _Stub(torch.nn.Module):
    """Stands in for decoder layer `index`: records what the model passes it and returns its input."""

    def __init__(
        self,
        index: int,
        record: Callable[[int, tuple, dict], None],
        last: bool,
        layer: torch.nn.Module,
        output: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.index, self.record, self.last, self.output = index, record, last, output
        # Plain facts the model reads off its layers (e.g. an `attention_type` class attribute), not modules.
        classes = [c for c in type(layer).__mro__ if c not in torch.nn.Module.__mro__]
        for scope in (*reversed(classes), layer):
            for name, value in vars(scope).items():
                if not name.startswith("_") and name != "training" and isinstance(value, str | int | float | bool):
                    setattr(self, name, value)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.record(self.index, (hidden, *args), kwargs)
        if self.last and self.output is not None:  # the last layer's real output: the model's forward goes on
            return self.output
        if self.last:
            raise _Stop
        return hidden


class HiddenBuffer:
    """[N, S, H] hidden states in memory, or in a memory-mapped file when larger than `budget` bytes."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, budget: int | None, folder: Path | None = None):
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        self.spilled = budget is not None and nbytes > budget
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if not self.spilled:
            self.tensor = torch.empty(shape, dtype=dtype)
            return
        if dtype not in NUMPY_STORAGE:
            raise MoePruneError(f"cannot spill {dtype} hidden states to disk")
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-prune-hidden-", dir=folder)
        array = np.memmap(Path(self._tmp.name) / "hidden.bin", dtype=NUMPY_STORAGE[dtype], mode="w+", shape=shape)
        self.tensor = torch.from_numpy(array).view(dtype)
        self._array = array

    def close(self) -> None:
        self.tensor = torch.empty(0)
        if self._tmp is not None:
            del self._array
            self._tmp.cleanup()
            self._tmp = None


class LayerwiseModel:
    """A meta-device skeleton of a checkpoint whose decoder layers are loaded one at a time."""

    def __init__(self, folder: Path, layers_path: str, dtype: str, device: str, trust_remote_code: bool) -> None:
        from moe_prune.checkpoint.source import Checkpoint

        self.folder = folder
        self.device = torch.device("cuda" if device == "auto" else device)
        model, self.dtype = model_skeleton(Checkpoint.open(folder), dtype, trust_remote_code)
        self.model = model.eval()
        self.layers_path = layers_path
        self.expert_memory: int | None = None  # bytes of a layer's experts loaded at once (runtime.expert_chunks)
        self.experts_path: str | None = None  # the experts module in a decoder layer (the family's adapter)
        self.layers: torch.nn.ModuleList = model.get_submodule(layers_path)
        self._keys = self._group_keys()
        for name, buf in list(model.named_buffers()):
            if not name.startswith(layers_path + ".") and buf.device != self.device:
                module, _, attr = name.rpartition(".")
                model.get_submodule(module)._buffers[attr] = buf.to(self.device)

    # -- weights --------------------------------------------------------------------------------

    def _group_keys(self) -> dict[int | None, dict[str, Path]]:
        """Checkpoint keys by the decoder layer their (converted) parameter belongs to; None: outside layers."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        from moe_prune.checkpoint.source import Checkpoint

        mapping = get_model_conversion_mapping(self.model)
        self._mapping = mapping
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta = self.model.state_dict()
        self._meta = meta  # shapes and names only: the skeleton's parameters, never loaded
        prefix = self.layers_path + "."
        groups: dict[int | None, dict[str, Path]] = defaultdict(dict)
        ckpt = Checkpoint(self.folder)
        self._infos = {info.name: info for info in ckpt.tensors}
        self._quant = Quantization.from_config(ckpt.config.raw)
        for info in ckpt.tensors:
            target, _ = rename_source_key(info.name, renamings, converters, self.model.base_model_prefix, meta)
            layer = int(target[len(prefix) :].split(".", 1)[0]) if target.startswith(prefix) else None
            groups[layer][info.name] = info.file
        return groups

    def load(self, keys: dict[str, Path], expect: list[str], experts: str | None = None) -> None:
        """Load checkpoint tensors `keys` through transformers' conversion; every name in `expect` must arrive
        (`experts`: the path of their experts module, bounded by `expert_memory`)."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        by_file: dict[Path, list[str]] = defaultdict(list)
        state: dict[str, torch.Tensor] = {}
        stacked, rest = fused.split(
            group((self._infos[key] for key in keys), self._quant), self._mapping, self.model, self._meta
        )
        where = (self.folder, self.device)
        chunked = expert_chunks.install(self.model, stacked, self.expert_memory, experts, where)
        for name, entry in stacked.items():  # per-expert tensors read straight into their fused parameter
            if name not in chunked:  # else read a chunk of experts at a time by the experts' forward
                fused.fill(self.model, name, entry, self.device, self.folder)
        for stored in rest:
            if stored.quantized:  # dequantized on its own: one float tensor more in memory, never the layer twice
                state[stored.name] = read_float(stored)
                if not finite(state[stored.name]):
                    raise MoePruneError(f"{stored.file}: tensor {stored.name} holds NaN or Inf values once dequantized")
            else:
                by_file[stored.file].append(stored.name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    state[name] = handle.get_tensor(name)
                    if not finite(state[name]):
                        raise MoePruneError(f"{file}: tensor {name} holds NaN or Inf values")
        config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, weight_mapping=[*self._mapping])
        with quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        missing = sorted(set(expect) & set(info.missing_keys) - set(stacked))
        mismatched = sorted(str(k[0]) for k in info.mismatched_keys)
        if missing or mismatched:
            what = f"missing weight {missing[0]}" if missing else f"mismatched weight {mismatched[0]}"
            raise MoePruneError(f"{self.folder}: checkpoint does not match its config ({what})")

    def load_outside(self, skip: tuple[str, ...]) -> None:
        """Every parameter outside the decoder layers except those under `skip` (the output head); with the head
        (`skip` empty), a tied head is tied again to the loaded embedding, so it is held once."""
        keys = self._keys.get(None, {})
        expect = [n for n, _ in self.model.named_parameters() if not n.startswith((self.layers_path + ".", *skip))]
        self.load(keys, expect)
        if not skip:
            self.model.tie_weights()

    def free_outside(self) -> None:
        """Parameters outside the decoder layers back to meta (the embeddings are needed only once)."""
        prefix = self.layers_path + "."
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(prefix):
                module, _, attr = name.rpartition(".")
                meta = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                self.model.get_submodule(module)._parameters[attr] = meta

    def load_layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index` with its weights on the device."""
        prefix = f"{self.layers_path}.{index}."
        expect = [n for n, _ in self.model.named_parameters() if n.startswith(prefix)]
        self.load(self._keys.get(index, {}), expect, prefix + self.experts_path if self.experts_path else None)
        return expert_chunks.to_device(self.layers[index], self.device)

    def free_layer(self, index: int) -> None:
        expert_chunks.remove(self.layers[index])
        self.layers[index].to_empty(device="meta")

    # -- layer inputs ---------------------------------------------------------------------------

    @contextmanager
    def stubs(self, output: torch.Tensor | None = None) -> Iterator[dict[int, tuple[tuple, dict]]]:
        """Decoder layers replaced by recording stubs; yields {layer: (args, kwargs)} of the last call.

        With `output`, the last stub returns it (the decoder layers' output, computed layer by layer) and the
        model's own forward runs on to its final norm and head; without, the forward stops there."""
        calls: dict[int, tuple[tuple, dict]] = {}
        originals = list(self.layers)
        last = len(originals) - 1
        for i in range(len(originals)):
            record = lambda j, args, kwargs: calls.__setitem__(j, (args, kwargs))  # noqa: E731
            self.layers[i] = _Stub(i, record, i == last, originals[i], output if i == last else None)
        try:
            yield calls
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def layer_inputs(self, input_ids: torch.Tensor) -> dict[int, tuple[tuple, dict]]:
        """What the model's own forward passes each decoder layer for this batch (args[0]: hidden states)."""
        try:
            with self.stubs() as calls, torch.inference_mode(), suppress(_Stop):
                self.model(input_ids=input_ids.to(self.device), use_cache=False)
        except (ValueError, TypeError, AttributeError, IndexError) as exc:  # a layer output the next one needs
            raise MoePruneError(
                f"{self.folder}: its decoder layers pass state to each other ({type(exc).__name__}: {exc}), so "
                "--sequential cannot run them one at a time; profile the whole model instead"
            ) from exc
        if len(calls) != len(self.layers):
            raise MoePruneError(f"{self.folder}: the model did not call its decoder layers one after another")
        return calls

    def finish(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> Any:
        """The model's own outputs (logits) for `input_ids` whose last decoder layer gave `hidden`: the embeddings
        run again (cheap) and every layer is a stub, so final norm, head and any logit scaling are the model's."""
        with self.stubs(output=hidden.to(self.device)):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False)


def check_layerwise(ckpt: Any, instead: str, what: str = "--sequential") -> None:
    """The one refusal of running `ckpt` one decoder layer at a time (`what`: the option or pass that would), in
    one line naming its config and the family's reason, for the families whose layers hand state to the next one
    (`instead`: what the user can do)."""
    config = ckpt.config
    if config.model_type in NO_SEQUENTIAL:
        raise MoePruneError(
            f"{ckpt.folder / 'config.json'}: {what} is not supported for {config.model_type} "
            f"({NO_SEQUENTIAL[config.model_type]}); {instead}"
        )


def open_layerwise(
    ckpt: Any, dtype: str, device: str, trust_remote_code: bool, instead: str, what: str = "--sequential"
) -> LayerwiseModel:
    """`ckpt` as a meta skeleton whose decoder layers load one at a time (`--sequential`), or the one refusal
    (`check_layerwise`)."""
    check_layerwise(ckpt, instead, what)
    model = LayerwiseModel(ckpt.folder, ckpt.config.adapter.runtime_layers, dtype, device, trust_remote_code)
    model.experts_path = ckpt.config.adapter.runtime_experts
    return model
