"""`runtime.sources.take`: a source's n tokens, its first ones or seeded whole windows in stream order.

The stream is `arange`, so every token says where it came from: the windows' positions are read off the
result instead of recomputed. The seeded draw is held to the single-stream draw profile always made
(`randperm` of the windows, the first ceil(n / unit), sorted), written out here.
"""

from __future__ import annotations

import pytest
import torch

from moe_prune.runtime.sources import take


def window_starts(tokens: torch.Tensor, unit: int) -> list[int]:
    """The start of each `unit`-token window `tokens` is cut into; asserts each is a whole aligned window."""
    starts = []
    for piece in tokens.split(unit):
        start = int(piece[0])
        assert start % unit == 0 and torch.equal(piece, torch.arange(start, start + len(piece))), piece
        starts.append(start)
    return starts


def old_draw(length: int, n: int, unit: int, seed: int) -> torch.Tensor:
    """The single-stream draw: ceil(n / unit) of the stream's whole windows, seeded, in order, cut to n."""
    chunks = torch.arange(length)[: length // unit * unit].view(-1, unit)
    needed = (n + unit - 1) // unit
    chosen = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))[:needed]
    return chunks[chosen.sort().values].flatten()[:n]


@pytest.mark.parametrize(("length", "n", "unit"), [(200, 48, 16), (203, 40, 16), (100, 7, 3), (64, 15, 16)])
def test_seeded_windows_are_distinct_whole_windows_in_stream_order(length, n, unit):
    stream = torch.arange(length)
    got = take(stream, n, unit, seed=5)
    assert got.numel() == n
    starts = window_starts(got, unit)
    assert starts == sorted(set(starts)) and starts[-1] + unit <= length  # never past the last whole window
    assert torch.equal(got, old_draw(length, n, unit, seed=5))
    assert torch.equal(take(stream, n, unit, seed=5), got)  # the seed decides, nothing else


def test_the_seed_chooses_the_windows():
    """Different seeds draw different windows; over many seeds every whole window is drawn, none past the end."""
    stream = torch.arange(163)  # ten whole windows of 16 and three tokens that never make one
    draws = {tuple(window_starts(take(stream, 32, 16, seed), 16)) for seed in range(60)}
    assert len(draws) > 20
    assert {s for d in draws for s in d} == set(range(0, 160, 16))


@pytest.mark.parametrize(
    ("length", "n", "unit", "seed"),
    [(200, 48, 16, None), (48, 48, 16, 3), (47, 40, 16, 3), (50, 49, 16, 3), (30, 50, 16, 3)],
    ids=["no-seed", "exactly-enough-windows", "fewer-windows-than-needed", "partial-last-window", "short-stream"],
)
def test_first_tokens_without_a_seed_or_without_spare_windows(length, n, unit, seed):
    """No seed, or no more whole windows than needed: the stream's first n tokens (all of it when shorter)."""
    got = take(torch.arange(length), n, unit, seed)
    assert torch.equal(got, torch.arange(min(n, length)))
