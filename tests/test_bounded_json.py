"""The one bounded JSON reader (`artifacts.common`), the .npz size checks (`open_npz`), safetensors' header
limit and the recipe's field types: what each refuses, and that ordinary input reads as before."""

from __future__ import annotations

import io
import json
import re
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hostile_parsing import npy_claims, zip_claims
from safetensors import SafetensorError, safe_open
from typer.testing import CliRunner

import moe_prune
from moe_prune.artifacts import npz
from moe_prune.artifacts.common import (
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    parse_json,
    read_capped,
    read_json,
)
from moe_prune.artifacts.npz import open_npz
from moe_prune.checkpoint.safetensors_io import MAX_HEADER, read_header
from moe_prune.cli import app
from moe_prune.errors import MoePruneError
from moe_prune.lottery.recipe import LotteryParams

# ---- parse_json ------------------------------------------------------------------------------------------------

ORDINARY = [
    '{"a": 1, "b": [1, 2.5, -3e-7, true, false, null], "c": {"d": "\\u00e9\\ud83d\\ude00"}}',
    "[]",
    '"text"',
    "-0",
    "1.7976931348623157e308",
    "[" + ",".join(str(10**k) for k in range(MAX_INT_DIGITS)) + "]",
    "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH,
    json.dumps({"layers": {str(i): {"keep": list(range(64))} for i in range(48)}}),
]


@pytest.mark.parametrize("text", ORDINARY, ids=range(len(ORDINARY)))
def test_ordinary_json_reads_as_the_json_module_reads_it(text):
    assert parse_json(text, "f.json", "x") == json.loads(text)


def _nested(kind: str, depth: int) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a": ' * (depth - 1) + "{}" + "}" * (depth - 1)


@pytest.mark.parametrize("kind", ["list", "object"])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 900, 100_000])
def test_deep_nesting_is_one_line_naming_the_file(kind, depth):
    """Just over the limit (json parses it; code walking it could not), near json's own limit, far past it."""
    assert parse_json(_nested(kind, MAX_JSON_DEPTH), "f.json", "x") is not None
    with pytest.raises(MoePruneError, match=r"^f\.json: x is nested too deeply"):
        parse_json(_nested(kind, depth), "f.json", "x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("9" * (MAX_INT_DIGITS + 1), f"an integer of {MAX_INT_DIGITS + 1} digits"),
        ("-" + "9" * 5_000, "an integer of 5000 digits"),
        ('{"n": ' + "1" * 100_000 + "}", "an integer of 100000 digits"),
        ("1e309", "beyond the range of a float"),
        ("[-1e400]", "beyond the range of a float"),
        ("NaN", "not valid JSON"),
        ('{"a": 1, "a": 2}', "key 'a' appears twice"),
    ],
    ids=["101-digits", "5000-digits", "100000-digits", "1e309", "-1e400", "nan", "duplicate"],
)
def test_numbers_beyond_bounds_are_one_line(text, message):
    with pytest.raises(MoePruneError) as caught:
        parse_json(text, "f.json", "x")
    line = str(caught.value)
    assert line.startswith("f.json: x ") and message in line and "\n" not in line and len(line) < 300
    assert parse_json(str(10 ** (MAX_INT_DIGITS - 1)), "f.json", "x") == 10 ** (MAX_INT_DIGITS - 1)


def test_duplicates_last_wins_only_when_asked():
    assert parse_json('{"a": 1, "a": 2}', "h", "x", duplicates=True) == json.loads('{"a": 1, "a": 2}')


def test_text_longer_than_the_limit_is_refused_before_parsing():
    assert parse_json("[1]  ", "f", "x", limit=5) == [1]
    with pytest.raises(MoePruneError, match="longer than the 5 characters"):
        parse_json("[1]   ", "f", "x", limit=5)


# ---- reading with a byte cap -------------------------------------------------------------------------------------


def test_a_link_to_dev_zero_is_refused_quickly(tmp_path):
    link = tmp_path / "mask.json"
    link.symlink_to("/dev/zero")
    start = time.monotonic()
    with pytest.raises(MoePruneError, match=rf"^{re.escape(str(link))}: mask is not a regular file"):
        read_json(link, "mask")  # a device is refused before any read (it was read up to the cap before)
    assert time.monotonic() - start < 30


def test_the_cap_counts_bytes_exactly(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'{"a": "\xc3\xa9"}')  # 11 bytes, 10 characters
    assert read_json(path, "x", limit=11)[0] == {"a": "é"}
    with pytest.raises(MoePruneError, match="larger than the 10 bytes"):
        read_json(path, "x", limit=10)


def test_stdin_is_read_with_the_cap(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"[" + b" " * 100 + b"]")))
    with pytest.raises(MoePruneError, match=r"^<stdin>: x is larger than the 50 bytes"):
        read_capped("-", "x", limit=50)


# ---- safetensors' header limit -----------------------------------------------------------------------------------


def _padded_header_file(path: Path, length: int) -> None:
    """One U8 tensor; its header padded with spaces to `length` bytes."""
    text = json.dumps({"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})
    path.write_bytes(struct.pack("<Q", length) + (text + " " * (length - len(text))).encode() + b"\x07")


def _safetensors_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except SafetensorError:
        return False


@pytest.mark.parametrize("length", [MAX_HEADER, MAX_HEADER + 1])
def test_the_header_limit_is_safetensors_own(tmp_path, length):
    """A header both accept or both refuse: 100,000,000 bytes is the last length safetensors reads."""
    assert MAX_HEADER == 100_000_000
    path = tmp_path / "x.safetensors"
    _padded_header_file(path, length)
    accepts = _safetensors_accepts(path)
    assert accepts == (length <= 100_000_000)
    if accepts:
        assert [t.name for t in read_header(path)[0]] == ["t"]
    else:
        with pytest.raises(MoePruneError, match=f"over the {MAX_HEADER} bytes"):
            read_header(path)


# ---- .npz archives -------------------------------------------------------------------------------------------


def _npz(path: Path, compressed: bool = False, **arrays: np.ndarray) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_a_good_archive_reads_as_np_load_reads_it(tmp_path):
    path = _npz(tmp_path / "s.npz", a=np.arange(12.0).reshape(3, 4), b=np.array("meta"), c=np.zeros((0, 5)))
    with open_npz(path, "s.npz") as ours, np.load(path) as theirs:
        assert ours.files == theirs.files
        for key in theirs.files:
            np.testing.assert_array_equal(ours[key], theirs[key])
    packed = _npz(tmp_path / "c.npz", compressed=True, a=np.zeros((1000, 100)))
    with open_npz(packed, "c.npz") as ours:
        assert ours["a"].shape == (1000, 100)


def test_a_zip_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    """800 kB of zeros compress to ~1 kB: more than the file plus the allowed inflation is refused."""
    path = _npz(tmp_path / "bomb.npz", compressed=True, a=np.zeros(100_000))
    monkeypatch.setattr(npz, "MAX_NPZ_INFLATION", 100_000)
    with pytest.raises(MoePruneError, match=r"^\S*bomb\.npz: field a expands the archive to over"):
        open_npz(path, str(path))


def test_claimed_sizes_are_checked_before_numpy_allocates(tmp_path):
    blob = _npz(tmp_path / "s.npz", a=np.zeros((4, 8), np.int64), b=np.ones(3)).read_bytes()
    eight_tb = tmp_path / "8tb.npz"
    eight_tb.write_bytes(npy_claims(blob, "a.npy", (10**12, 8)))
    with pytest.raises(MoePruneError, match=r"field a claims shape \(1000000000000, 8\) of int64"):
        open_npz(eight_tb, "8tb.npz")
    stored = tmp_path / "stored.npz"
    stored.write_bytes(zip_claims(blob, "a.npy", 10**9))
    with pytest.raises(MoePruneError, match="field a claims 1000000000 bytes but stores"):
        open_npz(stored, "stored.npz")


def test_a_plain_npy_is_refused_unread(tmp_path):
    path = tmp_path / "x.npz"
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.with_suffix(".npy").rename(path)
    with pytest.raises(MoePruneError, match=r"not an \.npz archive"):
        open_npz(path, "x.npz")


def test_a_damaged_member_header_raises_a_format_error(tmp_path):
    """Left to the caller to word (statistics and resume files say different things)."""
    with zipfile.ZipFile(tmp_path / "x.npz", "w") as archive:
        archive.writestr("a.npy", b"\x93NUMPY\x01\x00\xff\xff{garbage")
    with pytest.raises(npz.NPZ_ERRORS):
        open_npz(tmp_path / "x.npz", "x.npz")


# ---- recipes ---------------------------------------------------------------------------------------------------


def test_recipe_params_of_every_declared_type_are_accepted():
    params = LotteryParams("m", "usage-frequency", ["a:1", "b:2"], rounds=3, direction="max", compare=True)
    from dataclasses import asdict

    assert LotteryParams.from_dict(json.loads(json.dumps(asdict(params))), "r") == params
    assert LotteryParams.from_dict({"model": "m", "criterion": "c", "data": "d", "lr": 1}, "r").lr == 1.0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"profile_samples": "256"}, "params.profile_samples must be an integer, not a string '256'"),
        ({"target_ratio": [0.5]}, "params.target_ratio must be a number, not a list"),
        ({"model": None}, "params.model must be a string, not null"),
        ({"rounds": True}, "params.rounds must be an integer or null, not a boolean"),
        ({"data": {"a": 1}}, "params.data must be a string or a list of strings, not an object"),
    ],
)
def test_recipe_with_a_field_of_the_wrong_type_is_one_line(tmp_path, edit, message):
    recipe = tmp_path / "recipe.json"
    params = {"model": "m", "criterion": "usage-frequency", "data": "d", **edit}
    obj = {"schema": "moe-prune/lottery-recipe", "version": 1, "tool_version": "0", "params": params}
    recipe.write_text(json.dumps({**obj, "inputs": {}, "schedule": {}}))
    result = CliRunner().invoke(app, ["lottery", "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(recipe) in lines[0] and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


# ---- one reader ----------------------------------------------------------------------------------------------

# json.loads(json.dumps(x)) copies our own objects; the demo tasks read files shipped inside the package.
_ROUND_TRIP = re.compile(r"json\.loads\(json\.dumps\(")
_SHIPPED = {"demo/tasks/utils.py"}


def test_every_json_moe_prune_reads_goes_through_the_bounded_reader():
    root = Path(moe_prune.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root))
        if rel in ("artifacts/common.py", "artifacts/npz.py") or rel in _SHIPPED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bjson\.loads?\(|\bnp\.load\(", _ROUND_TRIP.sub("", line)):
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, (
        "read JSON with artifacts.common.parse_json/read_json, .npz with artifacts.npz.open_npz:\n"
        + "\n".join(offenders)
    )


def test_statistics_arrays_are_read_only_after_their_claimed_shapes_fit_the_model(tmp_path, monkeypatch):
    """A field whose header claims other layer or expert counts than __meta__'s model is refused unread."""
    from hostile import Workspace

    from moe_prune.artifacts import stats

    ws = Workspace(tmp_path)
    source = tmp_path / "good.npz"
    arrays = {"__meta__": np.array(json.dumps(_meta(layers=2, experts=4))), "tokens": np.ones(2, np.int64)}
    ws.write_stats({**arrays, "hard_counts": np.zeros((2, 4), np.int64)}, source)
    assert stats.Stats.load(source).arrays["hard_counts"].shape == (2, 4)
    read: list[str] = []
    member = stats._member
    monkeypatch.setattr(stats, "_member", lambda data, key, name: read.append(key) or member(data, key, name))
    for shape in [(3, 4), (2, 5), (2, 4, 1)]:
        read.clear()
        ws.write_stats({**arrays, "hard_counts": np.zeros(shape, np.int64)}, source)
        with pytest.raises(MoePruneError, match="hard_counts has"):
            stats.Stats.load(source)
        assert read == ["__meta__"], shape


def _meta(layers: int, experts: int) -> dict:
    from moe_prune.artifacts.identity import ModelIdentity

    ids = {layer: list(range(experts)) for layer in range(layers)}
    model = ModelIdentity("mixtral", layers, ids, "sha256:0").to_dict()
    return {"schema": "moe-prune/stats", "version": 1, "model": model, "provenance": {}}
