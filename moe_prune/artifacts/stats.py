"""The statistics container (.npz): sufficient statistics per MoE layer, with identity and schema.

Layout: one array per statistic, named `<stat>` with a leading axis over the model's MoE layers
(in `identity.moe_layers` order), plus `__meta__`, a JSON string with schema, version, identity
and provenance. Every statistic declares how two files of disjoint data combine: `sum` (counts,
sums, Gram matrices) or `or` (bitsets), so `combine` is exact; `final` (gradient reductions) refuses.
How each is measured: `runtime.statistics` (forward) and `runtime.gradients` (`--gradients`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_prune.artifacts.common import check_header
from moe_prune.artifacts.identity import ModelIdentity
from moe_prune.errors import MoePruneError

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
            raise MoePruneError(f"{source}: lacks statistics {', '.join(missing)}{hint}")

    def save(self, path: Path) -> None:
        """Write atomically (temporary file in the same folder, then rename)."""
        meta = {
            "schema": STATS_SCHEMA,
            "version": STATS_VERSION,
            "model": self.identity.to_dict(),
            "provenance": self.provenance,
        }
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            with open(tmp, "wb") as handle:
                np.savez(handle, __meta__=np.array(json.dumps(meta)), **self.arrays)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path) -> Stats:
        name = str(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["__meta__"]))
                arrays = {k: data[k] for k in data.files if k != "__meta__"}
        except FileNotFoundError:
            raise MoePruneError(f"{name}: statistics file not found (produce it with `moe-prune profile`)") from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise MoePruneError(f"{name}: not a moe-prune statistics file ({exc})") from None
        check_header(meta, STATS_SCHEMA, STATS_VERSION, name)
        identity = ModelIdentity.from_dict(meta.get("model"), name)
        unknown = sorted(set(arrays) - set(STAT_FIELDS))
        if unknown:
            raise MoePruneError(f"{name}: unknown statistics {unknown}")
        for key, array in arrays.items():
            if array.shape[:1] != (len(identity.moe_layers),):
                raise MoePruneError(
                    f"{name}: {key} has {array.shape[:1]} layers, identity has {len(identity.moe_layers)}"
                )
        return cls(identity, arrays, meta.get("provenance") or {})

    def combine(self, other: Stats, other_name: str = "stats") -> Stats:
        """Statistics of the union of two disjoint data sets (exact: sums add, bitsets OR)."""
        self.identity.require_same(other.identity, other_name, "the first statistics file")
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
            merged[key] = np.bitwise_or(array, other.arrays[key]) if rule == "or" else array + other.arrays[key]
        return Stats(self.identity, merged, {"combined": [self.provenance, other.provenance]})
