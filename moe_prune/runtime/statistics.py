"""Every forward statistic of `artifacts.stats` in one pass: router and expert hooks, streaming sums.

Definitions (per MoE layer; T tokens, E experts, H hidden size; see `STAT_FIELDS` for the names):
  soft_counts       sum over tokens of softmax(z) over all experts, or sigmoid(z) when the family
                    scores with a sigmoid (`adapter.routing.score`); z = the router's logits.
  coselection[i,j]  tokens whose top-k holds both i and j; the diagonal equals the hard counts.
  vocab_bits        np.packbits (big-endian bit order) bitset over the vocabulary of the INPUT token
                    ids whose hidden state was routed to the expert (set with `set_input_ids`).
  logit_gram/_sum   sum over tokens of z z^T and of z.
  act_*             statistics of each expert's UNWEIGHTED output vector a (before the routing
                    weight), over the tokens routed to it: per-dimension sum and sum of squares, sum
                    of a/||a|| (zero for a zero vector), sum of ||a||, sum of routing weight x ||a||,
                    and outliers: elements of a beyond mean +- 3 std, mean and (population) std taken
                    across a's own hidden dimension (MC-Suite 2.4), so one pass suffices.

How per-expert outputs are seen (three layouts of the families' experts modules): `runtime.expert_hooks`.

Accumulators: counts in int64, everything else in float64 on the model's device; the act_* sums of a
batch are taken without any temporary as large as the experts' outputs (`runtime.activation_sums`).
Sums of disjoint data add exactly up to float64 rounding and memory does not grow with the number of
tokens. `fields` (`profile --for`) limits the work to the statistics asked for.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from functools import partial
from typing import Any

import numpy as np
import torch

from moe_prune.architectures.config import ModelConfig
from moe_prune.runtime.activation_sums import add_activations
from moe_prune.runtime.expert_hooks import ExpertOutputHooks
from moe_prune.runtime.expert_outputs import ExpertPass
from moe_prune.runtime.routing import RoutingRecorder

ACT_FIELDS = (
    "act_sum",
    "act_sumsq",
    "act_unit_sum",
    "act_norm_sum",
    "act_weighted_norm_sum",
    "act_outliers",
    "act_gate_norm_sum",
    "act_max",
)


FORWARD_FIELDS = ("soft_counts", "coselection", "vocab_bits", "logit_gram", "logit_sum", *ACT_FIELDS)
ROUTER_FIELDS = frozenset({"soft_counts", "logit_gram", "logit_sum"})
_INTEGER = {"coselection", "act_outliers"}


class _Layer:
    """Running sums of one MoE layer (the `fields` asked for), allocated on first use on the layer's device."""

    def __init__(self, experts: int, hidden: int, vocab_bytes: int, device: torch.device, fields: frozenset[str]):
        shapes = {name: (experts,) for name in fields}
        shapes.update({name: (experts, experts) for name in _SQUARE})
        shapes.update({name: (experts, hidden) for name in ("act_sum", "act_sumsq", "act_unit_sum")})
        shapes["vocab_bits"] = (experts * vocab_bytes,)
        for name in fields:
            dtype = torch.uint8 if name == "vocab_bits" else torch.int64 if name in _INTEGER else torch.float64
            setattr(self, name, torch.zeros(shapes[name], dtype=dtype, device=device))


class StatisticsRecorder(ExpertOutputHooks, RoutingRecorder):
    """Context manager: while active, accumulate every forward statistic of every MoE layer.

    Call `set_input_ids(ids)` before each forward pass (the vocabulary bitsets need them).
    `arrays()` returns the `artifacts.stats` layout (leading axis over `layers`). `expert_outputs` and
    `refit` add the opt-in statistics of `runtime.expert_outputs` (every expert on every token). `fields`
    (default: every one of `FORWARD_FIELDS`) limits the forward statistics to those named (`profile --for`):
    what none of them reads is not computed, and without activation fields the experts run unwrapped.
    """

    def __init__(
        self,
        model: Any,
        config: ModelConfig,
        expert_outputs: bool = False,
        refit: bool = False,
        fields: Collection[str] | None = None,
    ) -> None:
        super().__init__(model, config)
        self.fields = frozenset(FORWARD_FIELDS) if fields is None else frozenset(fields) & frozenset(FORWARD_FIELDS)
        self._acts = self.fields & frozenset(ACT_FIELDS)
        embeddings = model.get_input_embeddings().weight
        self.vocab_size = int(embeddings.shape[0])
        self.vocab_bytes = math.ceil(self.vocab_size / 8)
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.hidden_size = int(text.hidden_size)
        self._sums: list[_Layer | None] = [None] * len(self.layers)
        self._ids: torch.Tensor | None = None
        self._last_logits: list[torch.Tensor | None] = [None] * len(self.layers)
        self._last_index: list[torch.Tensor | None] = [None] * len(self.layers)
        self._last_gates: list[torch.Tensor | None] = [None] * len(self.layers)  # grouped selection (jetmoe)
        self._patched: list[tuple[torch.nn.Module, Any]] = []
        self._only: set[int] | None = None
        wanted = expert_outputs or refit
        self._pass = ExpertPass(self.counts, self.hidden_size, expert_outputs, refit) if wanted else None
        self._modules: list[torch.nn.Module | None] = [None] * len(self.layers)
        self._last_probs: list[torch.Tensor | None] = [None] * len(self.layers)

    def set_input_ids(self, input_ids: torch.Tensor) -> None:
        """The batch about to run; flattened in the same (batch, position) order as the MoE layers see tokens."""
        self._ids = input_ids.reshape(-1)

    def watching(self, layers: set[int]) -> StatisticsRecorder:
        """Hook only these decoder layers on the next `with` (the others may not be loaded: `--sequential`)."""
        self._only = layers
        return self

    def __enter__(self) -> StatisticsRecorder:
        adapter = self.adapter
        for slot, layer in enumerate(self.layers):
            if self._only is not None and layer not in self._only:
                continue
            router = self.module(layer, adapter.runtime_router)
            self._handles.append(router.register_forward_hook(partial(self._router_hook, slot)))
            experts = self.module(layer, adapter.runtime_experts)
            if self._pass is not None:
                self._pass.check(experts, self.config.model_type, adapter.selection_from)
                self._modules[slot] = experts
            if not self._acts and self._pass is None:  # selection only: the experts run as they are
                if adapter.selection_from == "experts_args":
                    self._handles.append(experts.register_forward_pre_hook(partial(self._experts_hook, slot)))
            elif adapter.selection_from == "experts_args":
                self._handles.append(experts.register_forward_pre_hook(partial(self._experts_hook, slot)))
                # An instance attribute shadows the class forward; keep any existing one (accelerate hooks).
                self._patched.append((experts, experts.__dict__.get("forward")))
                experts.forward = partial(self._experts_forward, slot, experts.forward)
            elif adapter.selection_from == "grouped":
                rows = self.module(layer, adapter.grouped_outputs)
                self._handles.append(router.register_forward_hook(partial(self._gates_hook, slot)))
                self._handles.append(rows.register_forward_hook(partial(self._grouped_outputs_hook, slot)))
            else:
                self._handles.append(experts.register_forward_hook(partial(self._scaled_experts_hook, slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for module, previous in self._patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._patched.clear()
        self._only = None
        super().__exit__(*exc)

    def _layer(self, slot: int, device: torch.device) -> _Layer:
        sums = self._sums[slot]
        if sums is None:
            sums = self._sums[slot] = self._new_layer(self.counts[slot], device)
        return sums

    def _new_layer(self, experts: int, device: torch.device) -> _Layer:
        return _Layer(experts, self.hidden_size, self.vocab_bytes, device, self.fields)

    # -- router and selection -------------------------------------------------------------------

    @torch.no_grad()
    def on_router_logits(self, slot: int, logits: torch.Tensor) -> None:
        scaled = self._acts and self.adapter.selection_from == "router_scores"  # llama4's hook reads the logits
        if not (self.fields & ROUTER_FIELDS or self._pass is not None or scaled):
            return
        z = logits.detach().reshape(-1, logits.shape[-1]).double()
        sums = self._layer(slot, z.device)
        self._last_logits[slot] = z
        if "logit_sum" in self.fields:
            sums.logit_sum += z.sum(0)
        if "logit_gram" in self.fields:
            sums.logit_gram += z.T @ z
        if "soft_counts" in self.fields or self._pass is not None:
            probs = torch.sigmoid(z) if self.adapter.routing.score == "sigmoid" else torch.softmax(z, dim=-1)
            if "soft_counts" in self.fields:
                sums.soft_counts += probs.sum(0)
            self._last_probs[slot] = probs

    @torch.no_grad()
    def on_selection(self, slot: int, top_k_index: torch.Tensor) -> None:
        index = top_k_index.detach().reshape(-1, top_k_index.shape[-1])
        super().on_selection(slot, index)
        self._last_index[slot] = index
        if not self.fields & {"coselection", "vocab_bits"}:
            return
        sums = self._layer(slot, index.device)
        experts = self.counts[slot]
        onehot = torch.zeros(index.shape[0], experts + 1, dtype=torch.float32, device=index.device)
        onehot.scatter_(1, index.clamp(max=experts).long(), 1.0)
        onehot = onehot[:, :experts]  # an index equal to E (a family's "no expert" slot) selects nothing
        if "coselection" in self.fields:
            sums.coselection += (onehot.T @ onehot).round().long()
        if "vocab_bits" in self.fields:
            self._add_vocab(sums, onehot)

    def _add_vocab(self, sums: _Layer, onehot: torch.Tensor) -> None:
        """OR this batch's (expert, input token) pairs into the packed bitsets."""
        ids = self._ids
        if ids is None or ids.numel() != onehot.shape[0]:
            got = "no input ids" if ids is None else f"{ids.numel()} input ids"
            raise RuntimeError(f"statistics recorder: {onehot.shape[0]} routed tokens but {got}; call set_input_ids")
        token, expert = onehot.nonzero(as_tuple=True)
        ids = ids.to(onehot.device)[token]
        pairs = torch.unique(expert * self.vocab_size + ids)
        expert, ids = pairs // self.vocab_size, pairs % self.vocab_size
        byte = expert * self.vocab_bytes + ids // 8
        bit = torch.tensor(128, device=ids.device, dtype=torch.int64) >> (ids % 8)  # np.packbits: big-endian
        # Pairs are unique, so bits that share a byte differ and their sum is their OR.
        where, inverse = torch.unique(byte, return_inverse=True)
        merged = torch.zeros_like(where).index_add_(0, inverse, bit)
        sums.vocab_bits[where] |= merged.to(torch.uint8)

    def _add_activations(
        self, slot: int, expert: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor
    ) -> None:
        """Rows of expert outputs into the layer's act_* sums (`runtime.activation_sums`)."""
        add_activations(self._layer(slot, output.device), self._acts, expert, output, weight, gate)

    # -- results ----------------------------------------------------------------------------

    def restore(self, arrays: dict[str, np.ndarray], device: torch.device) -> None:
        """Continue from sums that `arrays()` returned (a resumed profile): later batches add on top."""
        self._tokens = [int(t) for t in arrays["tokens"]]
        self._counts = [torch.from_numpy(np.array(c)).to(device) for c in arrays["hard_counts"]]
        for slot, n in enumerate(self.counts):
            sums = self._sums[slot] = self._new_layer(n, device)
            for name in sorted(self.fields - {"vocab_bits"}):
                stored = np.array(arrays[name][slot])
                getattr(sums, name).copy_(
                    torch.from_numpy(stored[:n, :n] if stored.ndim == 2 and name in _SQUARE else stored[:n])
                )
            if "vocab_bits" in self.fields:
                sums.vocab_bits.copy_(torch.from_numpy(np.array(arrays["vocab_bits"][slot][:n]).reshape(-1)))
            if self._pass is not None:
                for name, tensor in self._pass.layer(slot, device).items():
                    tensor.copy_(torch.from_numpy(np.array(arrays[name][slot][:n])))

    def arrays(self) -> dict[str, np.ndarray]:
        """Every statistic recorded, as numpy arrays with a leading axis over `layers`.

        A ragged model's layers with fewer experts are zero-padded to the largest count (`artifacts.stats`
        layout); the statistics file's identity says how many slots of each layer are real experts.
        """
        cpu = torch.device("cpu")
        layers = [self._new_layer(n, cpu) if s is None else s for s, n in zip(self._sums, self.counts, strict=True)]
        out = {"tokens": self.tokens.numpy(), "hard_counts": self.hard_counts.numpy()}
        for name in [n for n in FORWARD_FIELDS if n in self.fields and n != "vocab_bits"]:
            out[name] = torch.stack(
                [_pad(getattr(s, name).cpu(), self.num_experts, name in _SQUARE) for s in layers]
            ).numpy()
        if "vocab_bits" in self.fields:
            bits = [s.vocab_bits.cpu().reshape(-1, self.vocab_bytes) for s in layers]
            out["vocab_bits"] = torch.stack([_pad(b, self.num_experts, False) for b in bits]).numpy()
        if self._pass is not None:
            extra = [self._pass.zeros(slot, cpu) if s is None else s for slot, s in enumerate(self._pass.sums)]
            for name in self._pass.fields:
                out[name] = torch.stack([_pad(e[name].cpu(), self.num_experts, False) for e in extra]).numpy()
        return out


_SQUARE = {"coselection", "logit_gram"}  # [E, E]: both axes are experts


def _pad(tensor: torch.Tensor, experts: int, square: bool) -> torch.Tensor:
    """Zero-pad the expert axis (both axes of an [E, E] statistic) to `experts` slots."""
    missing = experts - tensor.shape[0]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1) + [0, missing]
    if square:
        pad = [0, missing, 0, missing]
    return torch.nn.functional.pad(tensor, pad)
