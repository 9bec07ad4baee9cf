"""On-disk keys and expert tensor layouts: transformers' weight conversion reverted.

What `save_pretrained` writes is found by numbering every value of a tiny model distinctly, reverting
transformers' own weight conversion, and finding each value again; the intermediate axis of each expert
tensor (and gate/up interleaving) is read from the saved shapes.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

import torch

from moe_prune.architectures.derive_models import DerivationError
from moe_prune.architectures.derive_structure import Structure
from moe_prune.architectures.spec import STANDARD_EXPERT_TENSORS, ExpertTensor


def _numbered(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Fill every float parameter and buffer with distinct integers; name -> [start, end) of its values."""
    spans, start = {}, 1
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            n = tensor.numel()
            tensor.copy_(torch.arange(start, start + n, dtype=torch.float64).reshape(tensor.shape))
            spans[name] = (start, start + n)
            start += n
    if start >= 1 << 24:
        raise DerivationError("tiny model too large to number its values exactly")
    return spans


def _source(spans: dict[str, tuple[int, int]], tensor: torch.Tensor) -> tuple[str, int] | None:
    """The in-memory parameter a saved tensor came from, and the offset of its first value."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    first = int(tensor.reshape(-1)[0].item())
    for name, (lo, hi) in spans.items():
        if lo <= first < hi:
            return name, first - lo
    return None


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What `save_pretrained` writes (legacy layout): transformers' own conversion reverted."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(model.state_dict()))


@dataclass(frozen=True)
class DiskKeys:
    layer_prefix: str
    router: str
    router_bias: str | None
    selection_bias: str | None
    experts: str
    fused_experts: tuple[str, ...]
    memory_keys: tuple[tuple[str, str], ...]
    expert_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # key suffix -> one expert's shape
    reordered: frozenset[str] = frozenset()  # suffixes whose saved rows are a permutation of memory's (Interleave)
    vectors: tuple[str, ...] = ()  # other [E] tensors of the router or MoE block (gemma4: router.per_expert_scale)


def _layer_prefix(key: str, layer: int) -> tuple[str, str]:
    """Split a saved key at its layer number: ('model.layers.{L}.', rest)."""
    match = re.match(r"^(.*?\.)" + str(layer) + r"\.(.+)$", key)
    if not match:
        raise DerivationError(f"router key {key!r} holds no layer number {layer}")
    return match[1] + "{L}.", match[2]


def disk_keys(model: torch.nn.Module, structure: Structure) -> DiskKeys:
    """Map the router, biases and experts of MoE layer `moe_layers[-1]` to the keys save_pretrained writes."""
    layer = structure.moe_layers[-1]
    base = f"{structure.layers}.{layer}."
    spans = _numbered(model)
    by_source: dict[str, list[tuple[str, torch.Tensor, int]]] = {}
    for key, tensor in saved_state(model).items():
        if (src := _source(spans, tensor)) is not None and src[0].startswith(base):
            by_source.setdefault(src[0][len(base) :], []).append((key, tensor, src[1]))
    router_saved = by_source.get(structure.router_weight)
    if not router_saved:
        raise DerivationError("router weight not found among the saved tensors")
    prefix, router = _layer_prefix(router_saved[0][0], layer)
    head = prefix.replace("{L}", str(layer))
    rel = {name: [(k[len(head) :], t, off) for k, t, off in items] for name, items in by_source.items()}
    router_bias, _ = _bias_key(rel, structure, "router")
    selection_bias, selection_memory = _bias_key(rel, structure, "selection")
    experts, fused, shapes, reordered = _expert_keys(rel, structure)
    memory = _memory_keys(structure, selection_bias, selection_memory, model, base)
    vectors = _expert_vectors(rel, structure, {router, router_bias, selection_bias})
    return DiskKeys(prefix, router, router_bias, selection_bias, experts, fused, memory, shapes, reordered, vectors)


def _expert_vectors(rel, structure: Structure, claimed: set[str | None]) -> tuple[str, ...]:
    """Saved keys of 1-D [E] tensors in the router or MoE block besides its weight and biases: one value per
    expert that surgery must slice with the router rows (gemma4 scales the chosen weights by per_expert_scale)."""
    block = structure.experts.rsplit(".", 1)[0] if "." in structure.experts else ""
    scopes = tuple(f"{s}." for s in (structure.router, block) if s)
    found = []
    for name, items in rel.items():
        key, tensor = items[0][0], items[0][1]
        inside = name.startswith(scopes) and not name.startswith(structure.experts + ".")
        if inside and key not in claimed and tuple(tensor.shape) == (structure.n_experts,):
            found.append(key)
    return tuple(sorted(found))


def _bias_vectors(structure: Structure) -> tuple[str, ...]:
    return (structure.router_weight.rsplit(".", 1)[0] + ".bias",)


def _bias_key(rel, structure: Structure, kind: str) -> tuple[str | None, str | None]:
    """(saved key, in-memory name) of the router's own bias (`router`) or of an [E] selection bias (`selection`).

    The saved tensor holds the numbered values of the in-memory one, so the pair is exact even where the
    two names share nothing (kolibri1: moe.router.expert_bias saved from mlp.gate.e_score_correction_bias)."""
    router_bias = _bias_vectors(structure)
    block = structure.experts.rsplit(".", 1)[0] if "." in structure.experts else ""
    for name, items in rel.items():
        if kind == "router" and name in router_bias:
            return items[0][0], name
        shape = items[0][1].shape
        in_block = name.startswith(block + ".") or not block
        named = in_block and name not in router_bias and "bias" in name.rsplit(".", 1)[-1]
        vector = shape[-1] == structure.n_experts and len(shape) <= 2 and all(d == 1 for d in shape[:-1])
        if kind == "selection" and named and vector:
            return items[0][0], name
    return None, None


def _expert_keys(rel, structure: Structure):
    """Container prefix of per-expert keys (or of fused ones), the other fused prefixes, shapes, reordered suffixes."""
    n = structure.n_experts
    stems: set[str] = set()
    fused: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    reordered: set[str] = set()
    for name, items in rel.items():
        if not name.startswith(structure.experts + "."):
            continue
        for key, tensor, _ in items:
            per_expert = re.match(r"^(.*\.)(\d+)\.(.+)$", key)
            if per_expert and len(items) % n == 0 and len(items) >= n:
                stems.add(per_expert[1])
                shapes[_suffix(key)] = tuple(tensor.shape)
                one = tensor
            else:
                parent = key.rsplit(".", 1)[0] + "."
                if parent not in fused:
                    fused.append(parent)
                shapes[_suffix(key)] = tuple(tensor.shape[1:])
                one = tensor[0]
            if _reordered(one):
                reordered.add(_suffix(key))
    if len(stems) > 1:
        raise DerivationError(f"per-expert keys under several containers {sorted(stems)}")
    if not stems and not fused:
        raise DerivationError("no saved expert tensors")
    experts = stems.pop() if stems else fused.pop(0)
    return experts, tuple(f for f in fused if f != experts), tuple(sorted(shapes.items())), frozenset(reordered)


def _reordered(numbered: torch.Tensor) -> bool:
    """True when the saved values of one expert step unevenly along an axis: rows permuted (e.g. interleaved)
    by the weight conversion, not a plain copy or transpose of the numbered parameter."""
    for axis in range(numbered.dim()):
        if numbered.shape[axis] > 2:
            line = numbered.movedim(axis, 0).reshape(numbered.shape[axis], -1)[:, 0].double()
            steps = line.diff()
            if not torch.equal(steps, steps[:1].expand_as(steps)):
                return True
    return False


def _suffix(key: str) -> str:
    """The tensor's own name: its last component, with the module name before a weight/bias."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1] in ("weight", "bias") and len(parts) > 1 else parts[-1]


def _memory_keys(structure, selection_bias, selection_memory, model, base) -> tuple[tuple[str, str], ...]:
    """In-memory names where they differ from what `Adapter.memory_layout` assumes."""
    keys = []
    if structure.router_weight != f"{structure.router}.weight":
        keys.append(("router", structure.router_weight))
    if selection_memory is not None and selection_memory != selection_bias:
        keys.append(("selection_bias", selection_memory))
    experts_params = {n.rsplit(".", 1)[0] for n, _ in model.get_submodule(base + structure.experts).named_parameters()}
    if experts_params != {""} and len(experts_params) == 1:
        keys.append(("experts", f"{structure.experts}.{experts_params.pop()}."))
    return tuple(keys)


def expert_tensors(
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    hidden: int,
    interleaved: bool,
    reordered: frozenset[str] = frozenset(),
):
    """Where the intermediate axis lies in each expert tensor, read from the shapes (H != I).

    `interleaved`: the experts' forward splits gate/up by alternate rows; a tensor in `reordered` is saved
    with its rows permuted against memory (transformers' Interleave conversion), which flips that.
    """
    non_hidden = [d for _, shape in shapes for d in shape if d != hidden]
    if not non_hidden:
        return STANDARD_EXPERT_TENSORS
    inner = min(non_hidden)
    out = []
    for suffix, shape in shapes:
        axes = [i for i, d in enumerate(shape) if d != hidden]
        axis = axes[0] if axes else None
        parts = shape[axis] // inner if axis is not None else 1
        flipped = interleaved != (suffix in reordered)
        out.append(ExpertTensor(suffix, axis, parts=parts, interleaved=flipped and parts == 2))
    return (*out, *STANDARD_EXPERT_TENSORS)


def expert_tensor_layout(disk: DiskKeys, experts: torch.nn.Module, hidden: int) -> tuple[ExpertTensor, ...]:
    """The adapter's expert tensors: the saved ones read from their shapes, then the in-memory names.

    `disk.vectors` are not expert tensors: merge applies the router rule to them."""
    listed = expert_tensors(disk.expert_shapes, hidden, _interleaved(experts), disk.reordered)
    return _with_memory_names(listed, experts, hidden)


def _with_memory_names(listed: tuple[ExpertTensor, ...], experts: torch.nn.Module, hidden: int):
    """The on-disk rows, then rows for the in-memory names where they differ (the fused layout
    `save_pretrained(..., save_original_format=False)` writes, e.g. aria's gate_up_proj is [E, H, 2I])."""
    known = {t.suffix for t in listed[: len(listed) - len(STANDARD_EXPERT_TENSORS)]}
    memory = tuple((n, tuple(p.shape[1:])) for n, p in experts.named_parameters() if p.dim() >= 2)
    extra = [t for t in expert_tensors(memory, hidden, _interleaved(experts)) if t.suffix not in known]
    derived = listed[: len(listed) - len(STANDARD_EXPERT_TENSORS)]
    return (*derived, *[t for t in extra if t not in STANDARD_EXPERT_TENSORS], *STANDARD_EXPERT_TENSORS)


def _interleaved(experts: torch.nn.Module) -> bool:
    """gpt-oss style gate/up interleaving, read from the experts' forward source."""
    try:
        source = inspect.getsource(type(experts))
    except (OSError, TypeError):
        return False
    return "::2" in source
