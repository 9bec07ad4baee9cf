"""The parts of `runtime.sources` the mixed-stream tests pass over (survivors of the mutation run, issue #22).

`_fit` (a source short of its tokens) against an exhaustive search over every total; `Mix.provenance` of a
slice against tokens counted position by position; `mix` with a character tokenizer written here, so every
stream is known without a model; `read_source` and the local-file guess of `--data` values by their results.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from fractions import Fraction

import pytest
import torch

from moe_prune.errors import MoePruneError, MoePruneWarning
from moe_prune.runtime.shares import allocate, largest_remainder, parse_source, parse_sources, share_weights
from moe_prune.runtime.sources import Mix, SourceData, Taken, _fit, mix, read_source


class Chars:
    """A tokenizer of one id per character (its code point); `eos` ends each document unless None."""

    is_fast = False
    chat_template = None

    def __init__(self, eos: int | None = 0) -> None:
        self.eos_token_id = eos

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def exhaustive_fit(specs, planned: list[int], available: list[int], unit: int) -> list[int]:
    """The largest free total R <= the proportional bound whose shares fit and keep the total whole units."""
    free = [i for i, s in enumerate(specs) if s.count is None]
    short = [i for i in free if available[i] < planned[i]]
    if not short:
        return planned
    whole = sum(planned[i] for i in free)
    counted = sum(planned) - whole
    bound = min(Fraction(available[i] * whole, planned[i]) for i in short)
    weights = list(share_weights(specs).values())
    fits = [
        r
        for r in range(0, int(bound) + 1)
        if (counted + r) % unit == 0
        and all(n <= available[i] for i, n in zip(free, largest_remainder(weights, r), strict=True))
    ]
    tokens = list(planned)
    for i, n in zip(free, largest_remainder(weights, max(fits, default=0)), strict=True):
        tokens[i] = n
    return tokens


def random_specs(rng: random.Random):
    """Three sources with shares, counts or neither; or 2-4 shares in twentieths (where rounding up overflows)."""
    if rng.random() < 0.5:
        return parse_sources([f"s{i}.jsonl:{rng.choice(['0.25', '0.5', '30', ''])}".rstrip(":") for i in range(3)])
    cuts = sorted(rng.sample(range(1, 20), rng.randint(1, 3)))
    bounds = zip([0, *cuts], [*cuts, 20], strict=True)
    return parse_sources([f"s{i}.jsonl:{(b - a) * 5}%" for i, (a, b) in enumerate(bounds)])


def test_a_short_source_shrinks_every_share_to_the_largest_total_that_fits():
    rng, skipped = random.Random(0), 0
    for _ in range(1500):
        try:
            specs = random_specs(rng)
        except MoePruneError:  # shares that do not add up: not a mix
            skipped += 1
            continue
        unit = rng.choice([1, 2, 3, 16])
        planned = [s.count if s.count is not None else rng.randint(1, 200) for s in specs]
        free = [i for i, s in enumerate(specs) if s.count is None]
        planned_free = largest_remainder(list(share_weights(specs).values()), sum(planned[i] for i in free))
        for i, n in zip(free, planned_free, strict=True):
            planned[i] = n
        available = [n if s.count is not None else rng.randint(0, n + 3) for s, n in zip(specs, planned, strict=True)]
        tokens, _ = _fit(specs, planned, available, unit)
        assert tokens == exhaustive_fit(specs, planned, available, unit), (specs, planned, available, unit)
        assert all(n <= have for n, have in zip(tokens, available, strict=True))
    assert skipped < 500  # most draws are mixes


def test_rounding_up_past_what_a_source_holds_shrinks_once_more():
    """At the proportional bound (31 of 39) the 0.4 source would round up to 13 of its 12: one token less fits."""
    specs = parse_sources(["a.jsonl:0.3", "b.jsonl:0.3", "c.jsonl:0.4"])
    assert largest_remainder(list(share_weights(specs).values()), 31) == [9, 9, 13]
    assert _fit(specs, [12, 12, 15], [12, 14, 12], 1)[0] == [9, 9, 12]


def test_exactly_enough_is_not_short():
    """A count met exactly is accepted; a share met exactly gives its tokens without a warning."""
    specs = parse_sources(["a.jsonl:40", "b.jsonl:0.5", "c.jsonl:0.5"])
    assert _fit(specs, [40, 30, 30], [40, 30, 31], 1) == ([40, 30, 30], [])
    with pytest.raises(MoePruneError, match=re.escape("a.jsonl:40: holds 39 tokens, fewer than the 40 asked")):
        _fit(specs, [40, 30, 30], [39, 30, 30], 1)


def test_the_warning_names_the_source_shortest_by_its_share():
    """b has 20 of 60 (1/3), c 9 of 20 (0.45): b limits the mix, though c holds fewer tokens."""
    specs = parse_sources(["b.jsonl:0.75", "c.jsonl:0.25"])
    tokens, [warning] = _fit(specs, [60, 20], [20, 9], 1)
    assert tokens == [20, 6] and warning.startswith("b.jsonl:0.75: holds only 20 tokens, fewer than the 60 its")


def test_an_empty_source_beside_counts_gives_nothing():
    """Counts of 3 tokens, windows of 4, a share with no tokens: the share gives 0, never a token it lacks."""
    specs = parse_sources(["a.jsonl:3", "b.jsonl"])
    assert _fit(specs, [3, 5], [3, 0], 4)[0] == [3, 0]


def mixed(lengths: list[int], planned: list[int], taken: list[int]) -> Mix:
    """A Mix whose source i gave `taken[i]` tokens, each token holding its source's index."""
    sources = [SourceData(parse_source(f"s{i}.jsonl"), [], None if i else "train") for i in range(len(lengths))]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(taken)])
    starts = [sum(taken[:i]) for i in range(len(taken))]
    return Mix(ids, [Taken(*row) for row in zip(sources, planned, taken, starts, strict=True)], [])


@pytest.mark.parametrize(("start", "stop"), [(0, None), (5, 17), (12, 12), (3, 9), (30, 30)])
def test_provenance_of_a_slice_counts_its_tokens(start, stop):
    mix_ = mixed([10, 10, 20], [12, 8, 20], [10, 8, 12])
    part = mix_.ids[start:stop]
    rows = mix_.provenance(start, stop)
    assert [r["source"] for r in rows] == ["s0.jsonl", "s1.jsonl", "s2.jsonl"]
    assert [r["split"] for r in rows] == ["train", None, None]
    assert [r["tokens_planned"] for r in rows] == [12, 8, 20]
    for index, row in enumerate(rows):
        assert row["tokens"] == int((part == index).sum())
        assert row["share_of_tokens"] == (row["tokens"] / part.numel() if part.numel() else 0.0)


def test_mix_reads_each_source_from_its_own_stream_and_warns_once_without_eos():
    """Two one-document sources still need something between them: the mix warns once without EOS."""
    sources = [SourceData(parse_source(f"{name}.txt"), [text]) for name, text in [("a", "abcdef"), ("b", "xyz")]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = mix(sources, Chars(eos=None), [4, 3])
    assert [w.category for w in caught] == [MoePruneWarning]
    assert result.ids.tolist() == [ord(c) for c in "abcdxyz"]
    assert [(t.start, t.tokens, t.planned) for t in result.taken] == [(0, 4, 4), (4, 3, 3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mix(sources[:1], Chars(eos=None), [6]).ids.tolist() == [ord(c) for c in "abcdef"]
    assert caught == []


def test_mix_of_nothing_is_an_empty_token_tensor():
    result = mix([], Chars(), [])
    assert result.ids.dtype == torch.long and result.ids.shape == (0,) and result.taken == []


def test_a_local_file_is_read_with_the_default_field_and_no_split(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"text": t, "other": "no"}) + "\n" for t in ["one", "two"]))
    prose = tmp_path / "p.txt"
    prose.write_text("first part\n\nsecond part\n")
    data = read_source(parse_source(str(records)), None)
    assert [str(d) for d in data.documents] == ["one", "two"] and data.split is None
    assert [str(d) for d in read_source(parse_source(str(prose)), None).documents] == [prose.read_text()]


@pytest.mark.parametrize("given", ["./notes:half", "/data/notes:half", "~/notes:half", "notes.JSONL:half"])
def test_a_local_looking_name_with_a_bad_share_is_refused(given):
    with pytest.raises(MoePruneError, match=re.escape(f"--data {given}: ':half' is neither a share")):
        parse_source(given)


def test_a_hub_name_keeps_what_follows_its_colon_and_relocation_keeps_the_share():
    assert parse_source("org/notes:half").source == "org/notes:half"
    moved = parse_source("a.jsonl:0.5").relocated("/abs/a.jsonl")
    assert (moved.source, moved.share, moved.given) == ("/abs/a.jsonl", Fraction(1, 2), "/abs/a.jsonl:0.5")


def refusal(call, *args, **kwargs) -> str:
    """The one-line message `call(*args, **kwargs)` refuses with."""
    with pytest.raises(MoePruneError) as raised:
        call(*args, **kwargs)
    return str(raised.value)


def test_share_and_count_edges_parse_as_written():
    """A count of 1 is a count; a value that starts with ':' has no source before it, so it is a name."""
    assert parse_source("a.jsonl:1").count == 1
    assert parse_source(":0.5") == parse_source(":0.5", "--eval-data") and parse_source(":0.5").source == ":0.5"
    assert allocate(parse_sources(["a.jsonl:10", "b.jsonl"]), 10) == [10, 0]  # counts may take the whole budget


def test_parse_messages_name_the_option_and_say_what_to_do():
    huge = "9" * 400  # a count past any float: not a number
    assert refusal(parse_source, "a.jsonl:1.5") == (
        "--data a.jsonl:1.5: share 1.5 is not in (0, 1] (a fraction of the token budget; give a token count such "
        "as 20k for an absolute amount)"
    )
    assert refusal(parse_source, f"a.jsonl:{huge}").startswith(f"--data a.jsonl:{huge} '{huge}': expected a count")
    assert refusal(parse_sources, []) == "--data: no data source given"
    assert refusal(parse_sources, ["a.jsonl:2.0"], "--eval-data").startswith("--eval-data a.jsonl:2.0: share 2.0")
    assert refusal(parse_sources, ["a.jsonl:0.25", "b.jsonl:0.25"]) == (
        "--data: shares 0.25 + 0.25 add up to 0.5; make them add up to 1, or leave one source without a share to "
        "take the rest"
    )
    assert refusal(allocate, parse_sources(["a.jsonl:11", "b.jsonl"]), 10) == (
        "--data: token counts add up to 11, more than the 10 tokens of the token budget"
    )


def test_a_short_source_in_a_mix_without_windows_keeps_every_token_it_can():
    """Without `unit` the mix is cut to whole tokens (unit 1): 1 + 4 here, where windows of 2 would give 1 + 3."""
    specs = parse_sources(["a.txt:0.2", "b.txt:0.8"])
    assert _fit(specs, [3, 12], [1, 40], 2)[0] == [1, 3]  # the case is one that the unit changes
    sources = [SourceData(specs[0], ["q"]), SourceData(specs[1], ["abcdefghijklmnop"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MoePruneWarning)  # no EOS: documents joined
        result = mix(sources, Chars(eos=None), [3, 12])
    assert [t.tokens for t in result.taken] == [1, 4] and result.ids.tolist() == [ord(c) for c in "qabcd"]


def test_a_hub_source_is_read_from_the_split_asked_and_records_it(monkeypatch):
    """The reader passes field, split, character limit and --split-on through; a hub source records its split."""
    calls = []

    def load(source, text_field, split, max_chars, split_on):  # no defaults: every argument must be passed
        calls.append((source, text_field, split, max_chars, split_on))
        return ["doc"]

    monkeypatch.setattr("moe_prune.runtime.sources.load_documents", load)
    assert read_source(parse_source("org/corpus"), 100).split == "train"
    assert read_source(parse_source("org/corpus"), None, "body", "validation", "blank-lines").split == "validation"
    assert calls == [
        ("org/corpus", "text", "train", 100, "none"),
        ("org/corpus", "body", "validation", None, "blank-lines"),
    ]
