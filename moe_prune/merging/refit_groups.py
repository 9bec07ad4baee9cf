"""How many slots of one MoE layer `merge --refit` sums at once (`--refit-memory`).

The sums of one slot are I x (I + H) float64 (`runtime.refit_sums.slot_bytes`: 151 MB for a DeepSeek-V3
expert, I = 2048, H = 7168); all D slots of a layer at once are D times that (19 GB at D = 128, more than
a 24 GB machine holds beside the layer's weights). The layer's slots are therefore split into consecutive
groups whose sums fit the bound, and the layer runs once per group over the buffered hidden states of the
windows (`merging.refit_pass`): each slot's sums are the same float64 products as in one run, so the
solutions do not depend on the grouping, only the time does (the layer runs once per group).

Bound: `--refit-memory` bytes, at least one slot's sums (else refused before the first forward pass);
not given, half the bytes of the layer as it is held (its loaded weights, plus the chunk of experts of
`--expert-memory`), and no more than half the memory available on the sums' device when the layer is
about to be summed (the other half left to the solve's temporaries and the rest of the process). Half a
layer keeps the pass within issue #24's memory contract (peak at most 1.5x one decoder layer plus the
embeddings/head): at Qwen3-30B-A3B shapes a layer's 64 slots' sums (1.1 GB) are about one layer (1.16
GiB), so the layer runs twice; the extra runs cost the layer's forward only (the sums' float64 products
are done once either way, and they are several times the forward's work).
"""

from __future__ import annotations

import os

import torch

from moe_prune.errors import MoePruneError

AUTO_SHARE = 0.5  # of the available memory, when --refit-memory is not given
LAYER_SHARE = 0.5  # of the layer's held bytes, when --refit-memory is not given


def available_bytes(device: torch.device) -> int:
    """Memory that can be allocated now on `device`: free GPU memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def layer_budget(bound: int | None, device: torch.device, layer_bytes: int) -> int:
    """Bytes of sums one layer may hold at once: the user's bound, else LAYER_SHARE of the layer's held bytes
    (`layer_bytes`) within AUTO_SHARE of what is available now."""
    if bound is not None:
        return bound
    return int(min(LAYER_SHARE * layer_bytes, AUTO_SHARE * available_bytes(device)))


def slot_groups(count: int, per_slot: int, budget: int) -> list[slice]:
    """Consecutive groups of `count` slots whose sums (`per_slot` bytes each) fit `budget`; at least one slot."""
    size = max(1, min(count, budget // max(1, per_slot)))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def check_bound(bound: int | None, per_slot: dict[int, int]) -> None:
    """Refuse a bound below one slot's sums of some refit layer (`per_slot`: {layer: bytes of one slot})."""
    if bound is None or not per_slot:
        return
    layer = max(per_slot, key=per_slot.__getitem__)
    if bound < per_slot[layer]:
        raise MoePruneError(
            f"--refit-memory {bound} bytes is less than one slot's refit sums ({per_slot[layer]} bytes = "
            f"{per_slot[layer] / 1e6:.1f} MB in MoE layer {layer}); give at least that, or leave it out"
        )
