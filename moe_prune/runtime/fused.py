"""Fill a decoder layer's fused expert parameters straight from per-expert checkpoint tensors.

Why: checkpoints released with one tensor per expert (`experts.{e}.gate_proj.weight`) load into
transformers' fused parameters (`experts.gate_up_proj [E, 2I, H]`) through a `WeightConverter` whose
operations stack the experts (`MergeModulelist`) and concatenate the stacks (`Concatenate`). Run by
transformers, that holds the per-expert tensors, each stack and their concatenation at once: about
three copies of a layer's experts, which broke `--sequential`'s memory contract (peak 2.9-3.25
layers, issue #24). Here each fused parameter is allocated once in its working dtype and every expert
tensor is read (dequantized when stored quantized) by the one reader, `read_expert_tensor`, straight
into its slot: the only temporary is one expert's tensor.

Which slot a tensor goes to is derived from the converter's own operations and patterns, the way
transformers applies them (sources in the converter's pattern order, each pattern's tensors in the
natural order of their keys, as `convert_and_load_state_dict_in_model` sorts them), so no family is
named here. Converters made of anything else (transposes, chunks, quantizer ops) are left to
transformers, as before.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_prune.checkpoint.quantized import Stored, read_expert_tensor
from moe_prune.errors import MoePruneError

PURPOSE = "refusing to load it"


@dataclass
class Fused:
    """One fused parameter: its converter's operations and its stored tensors by source pattern."""

    operations: list[Any]
    patterns: list[str]
    sources: dict[str, list[Stored]] = field(default_factory=lambda: defaultdict(list))


def split(
    stored: Iterable[Stored], mapping: list[Any], model: Any, meta: dict[str, torch.Tensor]
) -> tuple[dict[str, Fused], list[Stored]]:
    """(parameters filled here by name, the tensors left to transformers' loader)."""
    from transformers.core_model_loading import (
        Concatenate,
        MergeModulelist,
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    fused: dict[str, Fused] = {}
    rest: list[Stored] = []
    for tensor in stored:
        target, pattern = rename_source_key(tensor.name, renamings, converters, model.base_model_prefix, meta)
        converter = by_pattern.get(pattern) if pattern is not None else None
        stacking = converter is not None and all(
            type(op) in (MergeModulelist, Concatenate) for op in converter.operations
        )
        if not stacking or target not in meta or len(converter.target_patterns) != 1:
            rest.append(tensor)
            continue
        entry = fused.setdefault(target, Fused(list(converter.operations), list(converter.source_patterns)))
        entry.sources[pattern].append(tensor)
    for entry in fused.values():
        for tensors in entry.sources.values():
            tensors.sort(key=lambda t: dot_natural_key(t.name))
    return fused, rest


def fill(model: Any, name: str, fused: Fused, device: torch.device, folder: Path) -> None:
    """Allocate parameter `name` on `device` in its skeleton dtype and read every source tensor into its slot."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    skeleton = module._parameters[attr]
    param = read_into(torch.empty(skeleton.shape, dtype=skeleton.dtype, device=device), fused, name, folder)
    loaded = torch.nn.Parameter(param, requires_grad=param.is_floating_point())
    loaded._is_hf_initialized = True  # as transformers marks what it loads: never re-initialised
    module._parameters[attr] = loaded


def read_into(param: torch.Tensor, fused: Fused, name: str, folder: Path) -> torch.Tensor:
    """Every source tensor of `fused` read into its slot of `param` (allocated by the caller), `param` returned:
    the whole parameter here, a chunk of its experts in `runtime.expert_chunks`."""
    for stored, slot in _slots(param, fused, name, folder):
        if slot.device.type == "cpu":
            read_expert_tensor(stored, PURPOSE, out=slot)
        else:  # read on the CPU (one tensor), copied to the device
            slot.copy_(read_expert_tensor(stored, PURPOSE, out=torch.empty(slot.shape, dtype=slot.dtype)))
    return param


def _slots(param: torch.Tensor, fused: Fused, name: str, folder: Path) -> list[tuple[Stored, torch.Tensor]]:
    """Each source tensor with the view of `param` it lands in: stacked on MergeModulelist's dim, the
    stacks (or single tensors) concatenated on Concatenate's dim in the converter's pattern order."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = fused.operations
    merge = ops[0] if ops and isinstance(ops[0], MergeModulelist) else None
    rest = ops[1:] if merge is not None else ops
    cat = rest[0] if len(rest) == 1 and isinstance(rest[0], Concatenate) else None
    present = [fused.sources[p] for p in fused.patterns if fused.sources.get(p)]
    mismatch = MoePruneError(f"{folder}: checkpoint does not match its config (mismatched weight {name})")
    if (rest and cat is None) or (cat is None and len(present) != 1) or (merge is None and cat is None):
        raise mismatch
    slots: list[tuple[Stored, torch.Tensor]] = []
    offset = 0
    for tensors in present:
        if merge is None and len(tensors) != 1:
            raise mismatch
        shape = list(tensors[0].shape)
        if merge is not None:
            shape.insert(merge.dim % (len(shape) + 1), len(tensors))
        if len(shape) != param.dim():
            raise mismatch
        block = param
        if cat is not None:
            dim = cat.dim % param.dim()
            if offset + shape[dim] > param.shape[dim]:
                raise mismatch
            block = param.narrow(dim, offset, shape[dim])
            offset += shape[dim]
        if list(block.shape) != shape:
            raise mismatch
        for index, stored in enumerate(tensors):
            slots.append((stored, block.select(merge.dim % param.dim(), index) if merge is not None else block))
    if cat is not None and offset != param.shape[cat.dim % param.dim()]:
        raise mismatch
    return slots
