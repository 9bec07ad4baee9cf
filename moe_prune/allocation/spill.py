"""Move a block's tensors to a safetensors file and back, keeping the module objects.

The merge search holds one merged block per searched layer, but it keeps coming back to blocks it put
aside (hill climbing tries a neighbour, rejects it, tries another neighbour of the same candidate).
Building a block again means a whole `merge.run` (a temporary checkpoint written and loaded, with
`--refit` and no stored sums a layer-by-layer pass), so a dropped block goes to disk instead: its
tensors (every parameter and buffer, persistent or not) are written once, the module's storage moves to
the meta device, and a restore re-allocates it on the original device and copies the tensors back,
checked by name, shape and dtype. The module objects stay, with every non-tensor attribute they hold.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moe_prune.errors import MoePruneError


def tensors_of(modules: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (non-persistent ones and tied names included), as '<module index>.<name>'."""
    out: dict[str, torch.Tensor] = {}
    for index, module in enumerate(modules):
        named = chain(module.named_parameters(remove_duplicate=False), module.named_buffers(remove_duplicate=False))
        out.update({f"{index}.{name}": tensor for name, tensor in named})
    return out


def device_of(modules: Sequence[torch.nn.Module]) -> torch.device | None:
    """The one device holding all the modules' tensors, or None where they cannot be spilled and restored
    with one `to_empty`: spread over several devices, or already on meta (weights kept by an offload hook)."""
    devices = {tensor.device for tensor in tensors_of(modules).values()}
    if len(devices) != 1:
        return None
    device = devices.pop()
    return None if device.type == "meta" else device


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own storage (safetensors refuses tensors that share memory)."""
    storages = Counter(tensor.untyped_storage().data_ptr() for tensor in tensors.values())
    out = {}
    for name, tensor in tensors.items():
        shared = storages[tensor.untyped_storage().data_ptr()] > 1
        out[name] = tensor.detach().clone() if shared else tensor.detach().contiguous()
    return out


def spill(modules: Sequence[torch.nn.Module], file: Path) -> None:
    """Write the modules' tensors to `file` (once: the search never changes a block's weights) and free them."""
    if not file.exists():
        partial = file.with_name(file.name + ".partial")
        save_file(_unshared(tensors_of(modules)), str(partial))
        os.replace(partial, file)
    for module in modules:
        module.to("meta")


def restore(modules: Sequence[torch.nn.Module], file: Path, device: torch.device) -> None:
    """Re-allocate the modules' tensors on `device` and copy back what `spill` wrote, checked by name."""
    for module in modules:
        module.to_empty(device=device)
    saved = load_file(str(file), device=str(device))
    live = tensors_of(modules)
    if saved.keys() != live.keys():
        odd = sorted(set(saved) ^ set(live))[:3]
        raise MoePruneError(f"{file}: the spilled block's tensors do not match the module's ({', '.join(odd)})")
    with torch.no_grad():
        for name, tensor in live.items():
            if saved[name].shape != tensor.shape or saved[name].dtype != tensor.dtype:
                raise MoePruneError(
                    f"{file}: {name} is {saved[name].dtype} {tuple(saved[name].shape)}, "
                    f"the module's {tensor.dtype} {tuple(tensor.shape)}"
                )
            tensor.copy_(saved[name])
