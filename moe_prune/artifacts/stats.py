"""The statistics container (.npz): sufficient statistics per MoE layer, with identity and schema.

Layout: one array per statistic, named `<stat>` with a leading axis over the model's MoE layers
(in `identity.moe_layers` order), plus `__meta__`, a JSON string with schema, version, identity
and provenance. Every statistic declares how two files of disjoint data combine: `sum` (counts,
sums, Gram matrices), `or` (bitsets) or `max` (largest values), so `combine` is exact; `final` (gradient
reductions) refuses.
How each is measured: `runtime.statistics` (forward) and `runtime.gradients` (`--gradients`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_prune.artifacts.common import check_header, describe, parse_json, require_type
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.artifacts.npz import NPZ_ERRORS, claimed_shapes, open_npz
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_file

STATS_SCHEMA = "moe-prune/stats"
STATS_VERSION = 1

# name -> (how disjoint data combine, what it holds). Shapes: L = MoE layers, E = experts, H = hidden, V = vocab.
# Rules: `sum` adds, `or` ORs bitsets, `final` is a nonlinear function of a whole run's accumulated
# gradient (norms, stds, outlier counts of the summed gradient) and cannot be combined exactly.
STAT_FIELDS: dict[str, tuple[str, str]] = {
    "tokens": ("sum", "[L] tokens routed through each MoE layer"),
    "hard_counts": ("sum", "[L, E] top-k selections per expert"),
    "soft_counts": ("sum", "[L, E] summed router probabilities per expert (softmax or sigmoid of the logits)"),
    "coselection": ("sum", "[L, E, E] tokens that selected both experts i and j (diagonal: hard counts)"),
    "vocab_bits": ("or", "[L, E, ceil(V/8)] uint8 np.packbits bitset of input token ids routed to each expert"),
    "logit_gram": ("sum", "[L, E, E] sum over tokens of logit_i * logit_j"),
    "logit_sum": ("sum", "[L, E] sum of router logits"),
    "act_sum": ("sum", "[L, E, H] sum of each expert's (unweighted) output per hidden dimension"),
    "act_sumsq": ("sum", "[L, E, H] sum of squares of each expert's output per hidden dimension"),
    "act_unit_sum": ("sum", "[L, E, H] sum of unit-normalised expert outputs"),
    "act_norm_sum": ("sum", "[L, E] sum of expert output L2 norms"),
    "act_weighted_norm_sum": ("sum", "[L, E] sum of routing weight x output L2 norm"),
    "act_outliers": ("sum", "[L, E] output elements beyond mean +- 3 std of their own output vector"),
    "act_gate_norm_sum": ("sum", "[L, E] sum of the gate renormalised over the token's top-k x output L2 norm (REAP)"),
    "act_max": ("max", "[L, E] largest |output element| of the expert over its routed tokens (REAP super experts)"),
    "out_all_sum": ("sum", "[L, E, H] sum over ALL tokens of each expert's output (HC-SMoE; profile --expert-outputs)"),
    "refit_hh": ("sum", "[L, E, I, I] sum over all tokens of p_e h_e h_e^T, h_e the down projection's input"),
    "refit_hy": ("sum", "[L, E, I, H] sum over all tokens of p_e h_e y^T, y the gate-weighted mean of routed outputs"),
    "grad_gram": ("final", "[L, E, E] Gram matrix of the experts' flattened accumulated weight gradients"),
    "grad_entropy": ("final", "[L, E] sum over hidden dims of log std of the accumulated weight gradient"),
    "grad_outliers": ("final", "[L, E] accumulated-gradient elements beyond mean +- 3 std of the expert's gradient"),
}


@dataclass
class Stats:
    """Arrays keyed by statistic name, for the model named by `identity`."""

    identity: ModelIdentity
    arrays: dict[str, np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)

    def require(self, *names: str, source: str = "stats") -> None:
        """Refuse when a criterion needs statistics this file lacks, naming the producing command."""
        missing = [n for n in names if n not in self.arrays]
        if missing:
            hint = " (run `moe-prune profile --gradients`)" if any(n.startswith("grad") for n in missing) else ""
            raise MoePruneError(f"{source}: lacks statistics {', '.join(missing)}{hint or self.profiled_for()}")

    def profiled_for(self) -> str:
        """' (profiled --for a,b: ...)' when `profile --for` chose the fields of this file, else ''."""
        chosen = self.provenance.get("for")
        if not isinstance(chosen, list) or not chosen:
            return ""
        names = ",".join(str(name) for name in chosen)
        return f" (profiled --for {names}; profile again with --for naming what reads them, or without --for)"

    def save(self, path: Path, force: bool = True, inputs: tuple[str | Path, ...] = ()) -> None:
        """Write atomically through the one atomic writer; `force=False` refuses a file that appears meanwhile.

        `inputs` are never overwritten (the model, data or statistics the file was computed from).
        """
        meta = {
            "schema": STATS_SCHEMA,
            "version": STATS_VERSION,
            "model": self.identity.to_dict(),
            "provenance": self.provenance,
        }
        with atomic_file(Path(path), force, protect=tuple(Path(p) for p in inputs)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, __meta__=np.array(json.dumps(meta)), **self.arrays)

    @classmethod
    def load(cls, path: Path) -> Stats:
        """Read and validate every field (shape, dtype, range): a corrupt file fails here, in one line."""
        name = str(path)
        meta, identity, arrays = _read_npz(Path(path), name)
        provenance = meta.get("provenance")
        provenance = require_type(provenance, dict, name, "provenance") if provenance is not None else {}
        validate_arrays(arrays, identity, name)
        return cls(identity, arrays, provenance)

    def combine(self, other: Stats, other_name: str = "stats", first_name: str = "the first statistics file") -> Stats:
        """Statistics of the union of two disjoint data sets (exact: sums add, bitsets OR)."""
        self.identity.require_same(other.identity, other_name, first_name)
        if set(self.arrays) != set(other.arrays):
            raise MoePruneError(
                f"{other_name}: holds statistics {sorted(other.arrays)}, expected {sorted(self.arrays)}"
            )
        final = sorted(k for k in self.arrays if STAT_FIELDS[k][0] == "final")
        if final:
            raise MoePruneError(
                f"{other_name}: gradient statistics ({', '.join(final)}) are functions of one run's whole "
                "accumulated gradient and do not add; profile with --gradients in one run "
                "(several processes under `accelerate launch` all-reduce before reducing)"
            )
        merged = {}
        for key, array in self.arrays.items():
            rule = STAT_FIELDS[key][0]
            combine_rule = {"or": np.bitwise_or, "max": np.maximum}.get(rule, np.add)
            merged[key] = combine_rule(array, other.arrays[key])
        return Stats(self.identity, merged, {"combined": [self.provenance, other.provenance]})


# How each field is checked on read. Kinds: `count` non-negative integers, `bits` uint8 bitsets,
# `nonneg` finite non-negative floats, `real` finite floats, `gram` finite floats with a
# non-negative diagonal, `log` floats that may be -inf (log of a zero spread) but not NaN or +inf.
# Axes: L MoE layers, E experts (the largest layer's count), H hidden size, V vocabulary bitset bytes,
# I the experts' intermediate size.
FIELD_CHECKS: dict[str, tuple[str, str]] = {
    "tokens": ("count", "L"),
    "hard_counts": ("count", "LE"),
    "soft_counts": ("nonneg", "LE"),
    "coselection": ("count", "LEE"),
    "vocab_bits": ("bits", "LEV"),
    "logit_gram": ("gram", "LEE"),
    "logit_sum": ("real", "LE"),
    "act_sum": ("real", "LEH"),
    "act_sumsq": ("nonneg", "LEH"),
    "act_unit_sum": ("real", "LEH"),
    "act_norm_sum": ("nonneg", "LE"),
    "act_weighted_norm_sum": ("nonneg", "LE"),
    "act_outliers": ("count", "LE"),
    "act_gate_norm_sum": ("nonneg", "LE"),
    "act_max": ("nonneg", "LE"),
    "out_all_sum": ("real", "LEH"),
    "refit_hh": ("gram", "LEII"),
    "refit_hy": ("real", "LEIH"),
    "grad_gram": ("gram", "LEE"),
    "grad_entropy": ("log", "LE"),
    "grad_outliers": ("count", "LE"),
}


def _read_npz(path: Path, name: str) -> tuple[dict[str, Any], ModelIdentity, dict[str, np.ndarray]]:
    """(`__meta__` object, identity, arrays by name); a missing, truncated or foreign file is a one-line error.

    The arrays are read only after the shapes their .npy headers claim fit the model `__meta__` names
    (every field known, its layer and expert axes those of the model), so no claim is allocated first.
    """
    try:
        data = open_npz(path, name)  # sizes claimed by the zip and .npy headers checked before reading
    except FileNotFoundError as exc:
        raise MoePruneError(f"{name}: statistics file not found (produce it with `moe-prune profile`)") from exc
    except IsADirectoryError as exc:
        raise MoePruneError(f"{name}: is a folder, not a statistics file") from exc
    except NPZ_ERRORS as exc:
        raise MoePruneError(f"{name}: not a moe-prune statistics file ({describe(exc)})") from exc
    with data:
        if "__meta__" not in data.files:
            raise MoePruneError(f"{name}: not a moe-prune statistics file (no __meta__ entry)")
        shapes = claimed_shapes(data, name)
        not_arrays = sorted(set(data.files) - set(shapes))
        if not_arrays:
            raise MoePruneError(f"{name}: field {not_arrays[0]} is not a .npy array")
        meta = _member(data, "__meta__", name)
        if meta.ndim != 0 or meta.dtype.kind != "U":
            raise MoePruneError(
                f"{name}: __meta__ must be one JSON string, not a {meta.dtype} array of shape {meta.shape}"
            )
        obj = parse_json(str(meta), name, "__meta__")
        if not isinstance(obj, dict):
            raise MoePruneError(f"{name}: __meta__ must be a JSON object")
        check_header(obj, STATS_SCHEMA, STATS_VERSION, name)
        identity = ModelIdentity.from_dict(obj.get("model"), name)
        check_shapes({key: shape for key, shape in shapes.items() if key != "__meta__"}, identity, name)
        arrays = {key: _member(data, key, name) for key in data.files if key != "__meta__"}
    return obj, identity, arrays


def _member(data: Any, key: str, name: str) -> np.ndarray:
    """One array of the archive; object arrays (pickles) and damaged members are refused, naming the field."""
    try:
        return data[key]
    except NPZ_ERRORS as exc:
        raise MoePruneError(f"{name}: field {key} is unreadable ({describe(exc)})") from exc


def validate_arrays(arrays: dict[str, np.ndarray], identity: ModelIdentity, name: str) -> None:
    """Every field known, of its dtype kind and full shape, finite and in range; fields agree with each other."""
    check_shapes({key: array.shape for key, array in arrays.items()}, identity, name)
    for key in sorted(arrays, key=lambda k: (len(FIELD_CHECKS[k][1]), k)):
        _check_values(arrays[key], key, FIELD_CHECKS[key][0], name)
    _check_consistency(arrays, name)


def check_shapes(shapes: dict[str, tuple[int, ...]], identity: ModelIdentity, name: str) -> None:
    """Every field known and of its full shape: run on the shapes .npy headers claim, before reading the arrays."""
    unknown = sorted(set(shapes) - set(STAT_FIELDS))
    if unknown:
        raise MoePruneError(f"{name}: unknown statistics {unknown}")
    sizes = {"L": len(identity.moe_layers), "E": max(identity.experts_in(layer) for layer in identity.moe_layers)}
    for key in sorted(shapes, key=lambda k: (len(FIELD_CHECKS[k][1]), k)):
        _check_shape(tuple(shapes[key]), key, FIELD_CHECKS[key][1], sizes, name)


def _check_shape(shape: tuple[int, ...], key: str, axes: str, sizes: dict[str, int], name: str) -> None:
    """Shape = the field's axes; H and V are learnt from the first field that has them, then must agree."""
    if len(shape) != len(axes):
        raise MoePruneError(f"{name}: {key} has {len(shape)} axes {shape}, expected [{', '.join(axes)}]")
    for axis, (letter, size) in enumerate(zip(axes, shape, strict=True)):
        expected = sizes.setdefault(letter, size)
        if size != expected or size < 1:
            what = {"L": "MoE layers", "E": "experts", "H": "hidden size", "V": "vocabulary bitset bytes"}.get(
                letter, "intermediate size"
            )
            raise MoePruneError(f"{name}: {key} has shape {shape}: axis {axis} ({what}) is {size}, expected {expected}")


def _check_values(array: np.ndarray, key: str, kind: str, name: str) -> None:
    """dtype kind and range of one field."""
    if kind == "bits":
        if array.dtype != np.uint8:
            raise MoePruneError(f"{name}: {key} must be uint8, not {array.dtype}")
        return
    if kind == "count":
        if array.dtype.kind not in "iu":
            raise MoePruneError(f"{name}: {key} must hold integer counts, not {array.dtype}")
        if array.size and array.min() < 0:
            raise MoePruneError(f"{name}: {key} holds a negative count ({array.min()})")
        return
    if array.dtype.kind != "f":
        raise MoePruneError(f"{name}: {key} must be floating point, not {array.dtype}")
    bad = np.isnan(array) | (np.isposinf(array) if kind == "log" else ~np.isfinite(array))
    if bad.any():
        raise MoePruneError(f"{name}: {key} holds {array[bad].flat[0]} (first at index {_first(bad)})")
    if kind == "nonneg" and array.size and array.min() < 0:
        raise MoePruneError(f"{name}: {key} holds a negative value ({array.min()}) where none can be")
    if kind == "gram":
        diagonal = np.diagonal(array, axis1=-2, axis2=-1)
        if diagonal.size and diagonal.min() < 0:
            raise MoePruneError(f"{name}: {key} has a negative diagonal entry ({diagonal.min()}); a Gram matrix cannot")


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_consistency(arrays: dict[str, np.ndarray], name: str) -> None:
    """What the definitions imply: an expert is chosen at most once per token, the diagonal of
    co-selection is the hard counts, probabilities sum to at most one per token and expert."""
    tokens = arrays.get("tokens")
    counts = arrays.get("hard_counts")
    if tokens is not None and counts is not None:
        above = counts > tokens[:, None]
        if above.any():
            layer, expert = _first(above)
            raise MoePruneError(
                f"{name}: hard_counts of expert slot {expert} in MoE layer index {layer} is {counts[layer, expert]}, "
                f"more than the layer's {tokens[layer]} tokens"
            )
    if tokens is not None and "soft_counts" in arrays:
        limit = tokens[:, None] * (1 + 1e-6) + 1e-6
        if (arrays["soft_counts"] > limit).any():
            raise MoePruneError(f"{name}: soft_counts exceed the layer's tokens (a probability sums to at most 1)")
    diagonal = np.diagonal(arrays["coselection"], axis1=1, axis2=2) if "coselection" in arrays else None
    if counts is not None and diagonal is not None and not np.array_equal(diagonal, counts):
        raise MoePruneError(f"{name}: the diagonal of coselection disagrees with hard_counts")
