"""Hostile cases: hostile_artifacts (registered with @hostile): statistics, masks, manifests, data and options."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from hostile import (
    DATA_READERS,
    STATS_READERS,
    Workspace,
    hostile,
)

# ---- statistics files: every reader of stats.npz, and the second file of --combine ----------------------------


def _edit_stats(edit: Callable[[dict[str, np.ndarray]], None], second: bool = False) -> Callable[[Workspace], None]:
    """A builder applying `edit` to the arrays of stats.npz (or stats2.npz)."""

    def build(ws: Workspace) -> None:
        path = ws.stats2 if second else ws.stats
        arrays = ws.stats_arrays(path)
        edit(arrays)
        ws.write_stats(arrays, path)

    return build


def _edit_meta(edit: Callable[[dict], object]) -> Callable[[dict[str, np.ndarray]], None]:
    """Edit the decoded __meta__ object; `edit` may return a replacement (any JSON value)."""

    def apply(arrays: dict[str, np.ndarray]) -> None:
        meta = json.loads(str(arrays["__meta__"]))
        replaced = edit(meta)
        arrays["__meta__"] = np.array(json.dumps(meta if replaced is None else replaced))

    return apply


def _set(key: str, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict[str, np.ndarray]], None]:
    def apply(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = fn(arrays[key].copy())

    return apply


def _poke(value: float, index: tuple[int, ...] = (0, 0)) -> Callable[[np.ndarray], np.ndarray]:
    def fn(array: np.ndarray) -> np.ndarray:
        array[index] = value
        return array

    return fn


STATS_EDITS: dict[str, Callable[[dict[str, np.ndarray]], None]] = {
    # container
    "stats-empty-npz": lambda a: a.clear(),
    "stats-no-meta": lambda a: a.pop("__meta__"),
    "stats-meta-not-object": _edit_meta(lambda m: [m]),
    "stats-meta-not-json": lambda a: a.update(__meta__=np.array("{schema: moe-prune/stats")),
    "stats-meta-not-a-string": lambda a: a.update(__meta__=np.arange(3)),
    "stats-meta-duplicate-key": lambda a: a.update(
        __meta__=np.array(str(a["__meta__"]).replace('"version":', '"version": 1, "version":', 1))
    ),
    "stats-meta-nan-constant": lambda a: a.update(
        __meta__=np.array(str(a["__meta__"]).replace('"version": 1', '"version": 1, "x": NaN', 1))
    ),
    "stats-pickled-object-array": lambda a: a.update(hard_counts=np.array([{"x": 1}], dtype=object)),
    "stats-unknown-field": lambda a: a.update(mystery=np.zeros((4, 8))),
    # metadata fields of the wrong type
    "stats-meta-layers-string": _edit_meta(lambda m: m["model"].update(num_layers=str(m["model"]["num_layers"]))),
    "stats-meta-ids-float": _edit_meta(
        lambda m: m["model"]["original_ids"].update(
            {k: [float(i) for i in v] for k, v in m["model"]["original_ids"].items()}
        )
    ),
    "stats-meta-ids-bool": _edit_meta(
        lambda m: m["model"]["original_ids"].update({"0": [True] * len(m["model"]["original_ids"]["0"])})
    ),
    "stats-meta-layer-key-not-canonical": _edit_meta(
        lambda m: m["model"].update(
            original_ids={f"0{k}": v for k, v in m["model"]["original_ids"].items()},
            experts_per_layer={f"0{k}": v for k, v in m["model"]["experts_per_layer"].items()},
        )
    ),
    "stats-meta-model-not-object": _edit_meta(lambda m: m.update(model="mixtral")),
    "stats-meta-provenance-list": _edit_meta(lambda m: m.update(provenance=[1, 2])),
    # dtypes
    "stats-counts-float": _set("hard_counts", lambda x: x.astype(np.float64)),
    "stats-counts-bool": _set("hard_counts", lambda x: x > 0),
    "stats-sums-integer": _set("logit_gram", lambda x: x.astype(np.int64)),
    "stats-bits-int64": _set("vocab_bits", lambda x: x.astype(np.int64)),
    "stats-sums-complex": _set("act_sum", lambda x: x.astype(np.complex128)),
    # shapes
    "stats-expert-axis-short": _set("hard_counts", lambda x: x[:, :-1]),
    "stats-layer-axis-long": _set("soft_counts", lambda x: np.concatenate([x, x[:1]])),
    "stats-gram-not-square": _set("logit_gram", lambda x: x[:, :, :-1]),
    "stats-hidden-axis-disagrees": _set("act_sumsq", lambda x: x[:, :, :-1]),
    "stats-vocab-axis-disagrees": _set("vocab_bits", lambda x: np.zeros((*x.shape[:2], 0), np.uint8)),
    "stats-extra-axis": _set("tokens", lambda x: x[:, None]),
    "stats-scalar-field": _set("act_outliers", lambda x: np.int64(3)),
    # values
    "stats-nan": _set("logit_gram", _poke(np.nan, (1, 2, 3))),
    "stats-inf": _set("act_norm_sum", _poke(np.inf)),
    "stats-negative-infinity": _set("logit_sum", _poke(-np.inf)),
    "stats-negative-counts": _set("hard_counts", lambda x: -np.abs(x) - 1),
    "stats-negative-tokens": _set("tokens", lambda x: -x),
    "stats-negative-norm-sum": _set("act_weighted_norm_sum", _poke(-1.0)),
    "stats-negative-sumsq": _set("act_sumsq", _poke(-0.5, (0, 0, 0))),
    "stats-negative-gram-diagonal": _set("logit_gram", _poke(-2.0, (0, 1, 1))),
    "stats-negative-soft-counts": _set("soft_counts", _poke(-0.1)),
    "stats-counts-above-tokens": lambda a: a["hard_counts"].__setitem__((0, 0), a["tokens"][0] + 1),
    "stats-soft-counts-above-tokens": lambda a: a.update(soft_counts=a["soft_counts"] + a["tokens"].max() + 1.0),
    "stats-coselection-disagrees": _set("coselection", _poke(10**6, (0, 1, 1))),
}

for _name, _edit in STATS_EDITS.items():
    hostile(_name, STATS_READERS, "stats.npz")(_edit_stats(_edit))

for _name in ("stats-nan", "stats-counts-float", "stats-expert-axis-short", "stats-meta-not-object"):
    hostile(f"{_name}-second-file", ("combine",), "stats2.npz")(_edit_stats(STATS_EDITS[_name], second=True))


@hostile("stats-truncated", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    blob = ws.stats.read_bytes()
    ws.stats.write_bytes(blob[: len(blob) // 2])


@hostile("stats-truncated-tail", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    blob = ws.stats.read_bytes()
    ws.stats.write_bytes(blob[:-40])


@hostile("stats-empty-file", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    ws.stats.write_bytes(b"")


@hostile("stats-plain-npy", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    with open(ws.stats, "wb") as handle:
        np.save(handle, np.zeros(3))


@hostile("stats-is-a-folder", STATS_READERS, "stats.npz")
def _(ws: Workspace) -> None:
    ws.stats.unlink()
    ws.stats.mkdir()


@hostile("stats-second-file-truncated", ("combine",), "stats2.npz")
def _(ws: Workspace) -> None:
    blob = ws.stats2.read_bytes()
    ws.stats2.write_bytes(blob[: len(blob) // 3])


# ---- masks ------------------------------------------------------------------------------------------------------


def _edit_mask(edit: Callable[[dict], object]) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        mask = ws.mask_json()
        replaced = edit(mask)
        ws.write_mask(mask if replaced is None else replaced)

    return build


def _first_layer(mask: dict) -> dict:
    layer = next(iter(mask["layers"].values()))
    layer.pop("drop", None)
    return layer


MASK_EDITS: dict[str, Callable[[dict], object]] = {
    "mask-float-ids": lambda m: _first_layer(m).update(keep=[float(i) for i in _first_layer(m)["keep"]]),
    "mask-bool-ids": lambda m: _first_layer(m).update(keep=[True, False]),
    "mask-string-ids": lambda m: _first_layer(m).update(keep=[str(i) for i in _first_layer(m)["keep"]]),
    "mask-float-drop-ids": lambda m: next(iter(m["layers"].values())).update(
        drop=[float(i) for i in next(iter(m["layers"].values()))["drop"]]
    ),
    "mask-keep-not-a-list": lambda m: _first_layer(m).update(keep=",".join(map(str, _first_layer(m)["keep"]))),
    "mask-keep-an-object": lambda m: _first_layer(m).update(keep={"0": 1}),
    "mask-layer-entry-a-list": lambda m: m["layers"].update({next(iter(m["layers"])): [0, 1]}),
    "mask-layer-key-not-canonical": lambda m: m.update(layers={f"0{k}": v for k, v in m["layers"].items()}),
    "mask-layer-key-negative": lambda m: m.update(layers={f"-{k}": v for k, v in m["layers"].items()}),
    "mask-layer-key-float": lambda m: m.update(layers={f"{k}.0": v for k, v in m["layers"].items()}),
    "mask-layer-entry-typo": lambda m: _first_layer(m).update(kept=_first_layer(m).pop("keep")),
    "mask-layers-a-list": lambda m: m.update(layers=list(m["layers"].values())),
    "mask-version-bool": lambda m: m.update(version=True),
    "mask-version-float": lambda m: m.update(version=1.0),
    "mask-identity-layers-string": lambda m: m["model"].update(num_layers=str(m["model"]["num_layers"])),
    "mask-identity-ids-float": lambda m: m["model"]["original_ids"].update(
        {k: [float(i) for i in v] for k, v in m["model"]["original_ids"].items()}
    ),
    "mask-identity-missing": lambda m: m.pop("model"),
    "mask-provenance-a-string": lambda m: m.update(provenance="made by hand"),
    "mask-a-list": lambda m: [m],
}

for _name, _edit in MASK_EDITS.items():
    hostile(_name, ("prune",), "mask.json")(_edit_mask(_edit))


@hostile("mask-duplicate-layer-key", ("prune",), "mask.json")
def _(ws: Workspace) -> None:
    mask = ws.mask_json()
    key, entry = next(iter(mask["layers"].items()))
    other = {"keep": entry["keep"][:-1]}
    text = json.dumps(mask)
    first = json.dumps({key: entry})[1:-1]
    ws.write_mask(text.replace(first, f"{json.dumps(key)}: {json.dumps(other)}, {first}", 1))


@hostile("mask-duplicate-top-level-key", ("prune",), "mask.json")
def _(ws: Workspace) -> None:
    ws.write_mask(ws.mask.read_text().replace('"layers":', '"layers": {}, "layers":', 1))


@hostile("mask-nan-constant", ("prune",), "mask.json")
def _(ws: Workspace) -> None:
    ws.write_mask(ws.mask.read_text().replace('"version": 1', '"version": 1, "x": NaN', 1))


@hostile("mask-empty", ("prune",), "mask.json")
def _(ws: Workspace) -> None:
    ws.write_mask("")


@hostile("mask-not-utf8", ("prune",), "mask.json")
def _(ws: Workspace) -> None:
    ws.mask.write_bytes(b'{"schema": "\xff\xfe"}')


@hostile("mask-deeply-nested", ("prune",), "mask.json")
def _(ws: Workspace) -> None:
    ws.write_mask("[" * 100_000 + "]" * 100_000)


# ---- checkpoint manifest (moe_prune.json comes inside checkpoints from strangers) -------------------------------

MANIFEST_READERS = ("prune", "merge", "score-weights", "profile")


def _manifest(ws: Workspace) -> dict:
    layers = {str(k): {"slots": list(range(v))} for k, v in _experts_per_layer(ws).items()}
    return {"schema": "moe-prune/checkpoint", "version": 1, "tool_version": "0", "layers": layers, "history": []}


def _experts_per_layer(ws: Workspace) -> dict[int, int]:
    meta = json.loads(str(ws.stats_arrays()["__meta__"]))
    return {int(k): v for k, v in meta["model"]["experts_per_layer"].items()}


def _write_manifest(edit: Callable[[dict], object]) -> Callable[[Workspace], None]:
    def build(ws: Workspace) -> None:
        manifest = _manifest(ws)
        replaced = edit(manifest)
        (ws.model / "moe_prune.json").write_text(json.dumps(manifest if replaced is None else replaced))

    return build


MANIFEST_EDITS: dict[str, Callable[[dict], object]] = {
    "manifest-float-slots": lambda m: m["layers"]["0"].update(slots=[float(i) for i in m["layers"]["0"]["slots"]]),
    "manifest-string-slots": lambda m: m["layers"]["0"].update(slots=[str(i) for i in m["layers"]["0"]["slots"]]),
    "manifest-negative-slot": lambda m: m["layers"]["0"]["slots"].__setitem__(0, -1),
    "manifest-repeated-slot": lambda m: m["layers"]["0"]["slots"].__setitem__(0, 1),
    "manifest-layer-key-not-canonical": lambda m: m.update(layers={f" {k}": v for k, v in m["layers"].items()}),
    "manifest-layers-a-list": lambda m: m.update(layers=list(m["layers"].values())),
    "manifest-members-bad-weight": lambda m: m["layers"]["0"].update(
        members=[[{"id": i, "weight": "1"}] for i in m["layers"]["0"]["slots"]]
    ),
    "manifest-history-an-object": lambda m: m.update(history={"a": 1}),
    "manifest-a-list": lambda m: [m],
}

for _name, _edit in MANIFEST_EDITS.items():
    hostile(_name, MANIFEST_READERS, "moe_prune.json")(_write_manifest(_edit))


@hostile("manifest-duplicate-layer-key", MANIFEST_READERS, "moe_prune.json")
def _(ws: Workspace) -> None:
    text = json.dumps(_manifest(ws))
    (ws.model / "moe_prune.json").write_text(text.replace('"layers": {', '"layers": {"0": {"slots": [0]}, ', 1))


# ---- data files -------------------------------------------------------------------------------------------------


@hostile("data-empty", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    ws.data.write_text("")


@hostile("data-blank", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    ws.data.write_text(" \n\n\t\n")


@hostile("data-binary", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    ws.data.write_bytes(bytes(range(256)) * 4)


@hostile("data-nul-bytes", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    ws.data.write_bytes(b"\x00" * 4096)


@hostile("data-too-short", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    ws.data.write_text("a b")


@hostile("data-is-a-folder", DATA_READERS, "data.txt")
def _(ws: Workspace) -> None:
    ws.data.unlink()
    ws.data.mkdir()


# ---- options that make no sense: refused before any work, naming the option -----------------------------------


def _nothing(ws: Workspace) -> None:
    """The inputs stay good; the case is in the extra options."""


FINETUNE_OPTIONS = {
    "top-k-zero": ("--top-k", "0"),
    "top-k-negative": ("--top-k", "-1"),
    "tokens-zero": ("--tokens", "0"),
    "tokens-negative": ("--tokens", "-5k"),
    "tokens-nan": ("--tokens", "nan"),
    "seq-len-zero": ("--seq-len", "0"),
    "batch-size-zero": ("--batch-size", "0"),
    "grad-accum-zero": ("--grad-accum", "0"),
    "lr-zero": ("--lr", "0"),
    "lr-negative": ("--lr", "-1e-4"),
    "lr-nan": ("--lr", "nan"),
    "warmup-ratio-one": ("--warmup-ratio", "1"),
    "warmup-ratio-negative": ("--warmup-ratio", "-0.1"),
    "top-k-anneal-malformed": ("--top-k-anneal", "2-1"),
    "top-k-anneal-increasing": ("--top-k-anneal", "1:2"),
    "top-k-anneal-to-zero": ("--top-k-anneal", "2:0"),
    "top-k-anneal-empty": ("--top-k-anneal", ""),
    "entropy-weight-negative": ("--entropy-weight", "-0.1"),
    "weight-decay-negative": ("--weight-decay", "-1"),
    "max-grad-norm-inf": ("--max-grad-norm", "inf"),
    "router-warmup-steps-negative": ("--router-warmup-steps", "-1"),
    "save-every-negative": ("--save-every", "-1"),
    "eval-tokens-negative": ("--eval-tokens", "-1"),
    "train-unknown-group": ("--train", "experts,everything"),
    "mixed-precision-unknown": ("--mixed-precision", "fp8"),
}
for _name, _extra in FINETUNE_OPTIONS.items():
    hostile(f"finetune-{_name}", ("finetune",), _extra[0], extra=_extra)(_nothing)

PROFILE_OPTIONS = {
    "samples-zero": ("--samples", "0"),
    "seq-len-zero": ("--seq-len", "0"),
    "batch-size-zero": ("--batch-size", "0"),
    "shard-beyond-count": ("--shard", "3/2"),
    "shard-negative": ("--shard", "-1/2"),
    "shard-malformed": ("--shard", "1"),
    "save-every-negative": ("--save-every", "-1"),
}
for _name, _extra in PROFILE_OPTIONS.items():
    hostile(f"profile-{_name}", ("profile",), _extra[0], extra=_extra)(_nothing)

SCORE_OPTIONS = {
    "ratio-above-one": ("--ratio", "1.5"),
    "ratio-negative": ("--ratio", "-0.5"),
    "ratio-one": ("--ratio", "1"),
}
for _name, _extra in SCORE_OPTIONS.items():
    hostile(f"score-{_name}", ("score",), _extra[0], extra=_extra)(_nothing)


@hostile("combine-the-same-file-twice", ("combine",), "stats.npz", extra=("{stats}",))
def _(ws: Workspace) -> None:
    """`--combine a b a`: the sums of a would count twice."""


@hostile("combine-the-same-windows", ("combine",), "stats2.npz")
def _(ws: Workspace) -> None:
    import shutil

    shutil.copyfile(ws.stats, ws.stats2)  # a copy under another name: the same data, seed and shard
