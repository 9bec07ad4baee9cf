"""`scoring.selection` directly: global drops against an exhaustive search, and the budget's refusals.

Dropping `total` experts in score order under per-layer floors and protected slots is a partition matroid
(each layer may lose at most its count minus max(floor, its protected slots), protected slots never), so the
greedy answer is the feasible set whose sorted score positions are smallest: found here by trying every set.
The greedy pair rule (`pick_by_pairs`) against the same rule written out by hand.
(Survivors of the mutation run of issue #22 over scoring/.)
"""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest

from moe_prune.errors import MoePruneError
from moe_prune.scoring.selection import Budget, global_drops, group_quota


def exhaustive_drops(scores, direction, total, floor, counts, protected) -> list[list[int]] | None:
    """Every feasible set of `total` (layer, slot) drops; the one whose sorted (score, position) list is least."""
    layers, experts = scores.shape
    counts = counts or [experts] * layers
    sign = 1 if direction == "min" else -1
    rank = {
        (layer, slot): (sign * scores[layer, slot], layer * experts + slot)
        for layer in range(layers)
        for slot in range(experts)
    }
    candidates = [p for p in rank if p[1] < counts[p[0]] and p not in protected]
    best = None
    for chosen in itertools.combinations(candidates, total):
        if all(sum(1 for c in chosen if c[0] == n) <= max(counts[n] - floor, 0) for n in range(layers)):
            key = sorted(rank[c] for c in chosen)
            if best is None or key < best[0]:
                best = (key, chosen)
    if best is None:
        return None
    return [sorted(slot for layer, slot in best[1] if layer == index) for index in range(layers)]


def test_global_drops_equal_the_least_feasible_set():
    rng = random.Random(0)
    for _ in range(150):
        layers, experts = rng.randint(1, 3), rng.randint(2, 4)
        scores = np.array([[rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(experts)] for _ in range(layers)])
        counts = rng.choice([None, [rng.randint(1, experts) for _ in range(layers)]])
        slots = [(layer, slot) for layer in range(layers) for slot in range(experts)]  # past a layer's count too
        protected = set(rng.sample(slots, min(len(slots), rng.randint(0, 2))))
        floor, total, direction = rng.randint(0, 2), rng.randint(0, 4), rng.choice(["min", "max"])
        want = exhaustive_drops(scores, direction, total, floor, counts, protected)
        case = (scores.tolist(), direction, total, floor, counts, protected)
        if want is None:
            with pytest.raises(MoePruneError, match="cannot drop"):
                global_drops(scores, direction, total, floor, counts, protected)
        else:
            got = global_drops(scores, direction, total, floor, counts, protected)
            assert [sorted(d) for d in got] == want, case


def test_protected_slots_count_toward_their_own_layers_floor():
    """Layer 0 has 2 protected of 4 (floor 1): 2 can go there, 3 in layer 1; one more than 5 is refused."""
    scores = np.zeros((2, 4))
    protected = {(0, 0), (0, 1)}
    assert [len(d) for d in global_drops(scores, "min", 5, 1, None, protected)] == [2, 3]
    message = "cannot drop 6 experts globally while keeping at least 1 per layer (at most 5 can go)"
    with pytest.raises(MoePruneError, match=re.escape(message)):
        global_drops(scores, "min", 6, 1, None, protected)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give exactly one of --drop N, --keep N or --ratio R"),
        ({"drop": 1, "keep": 2}, "give exactly one of --drop N, --keep N or --ratio R"),
        ({"ratio": 1.0}, "--ratio 1.0 must be in [0, 1)"),
        ({"keep": -1}, "--keep -1 must not be negative"),
    ],
)
def test_budget_refusals_say_what_to_give(fields, message):
    with pytest.raises(MoePruneError) as raised:
        Budget(**fields)
    assert str(raised.value) == message


@pytest.mark.parametrize("fields", [{"drop": 3}, {"keep": 5}, {"ratio": 0.25}])
def test_budget_records_what_was_given(fields):
    """to_dict names all three fields, the given one set: a recorded budget builds the same Budget again."""
    recorded = Budget(**fields).to_dict()
    assert recorded == {"drop": None, "keep": None, "ratio": None, **fields}
    assert Budget(**recorded) == Budget(**fields)


def test_groups_left_with_one_expert_are_refused():
    """4 groups of 4, dropping 12 leaves 1 per group: grouped routing picks top groups by their best two."""
    assert group_quota(16, 4, 8, 0)(0, []) is True  # 2 per group left: allowed
    message = "layer 3: dropping 12 leaves 1 experts per routing group; grouped routing needs at least 2 per group"
    with pytest.raises(MoePruneError) as raised:
        group_quota(16, 4, 12, 3)
    assert str(raised.value) == message


def test_protected_slots_past_a_ragged_layers_count_take_no_room():
    """A protected (layer, slot) past the layer's experts is no expert of it: both real experts may still go."""
    scores = np.zeros((1, 4))
    assert global_drops(scores, "min", 2, 0, [2], {(0, 3)}) == [[0, 1]]
    assert exhaustive_drops(scores, "min", 2, 0, [2], {(0, 3)}) == [[0, 1]]


def greedy_pairs_by_hand(values, usage, direction, n_drop, allowed):
    """The pair rule step by step in plain Python: every remaining pair (p < q) whose loser (less used; ties: the
    higher slot) is allowed; the least (min) or greatest (max) value, ties to the first pair in row order."""
    experts, dropped, pairs = len(usage), [], []
    while len(dropped) < n_drop:
        best = None
        for p in range(experts):
            for q in range(p + 1, experts):
                if p in dropped or q in dropped:
                    continue
                loser = p if (usage[p], -p) < (usage[q], -q) else q
                if not allowed(loser, list(dropped)):
                    continue
                value = float(values[p, q]) if direction == "min" else -float(values[p, q])
                if best is None or value < best[0]:
                    best = (value, p, q, loser)
        if best is None:
            break
        dropped.append(best[3])
        pairs.append((best[1], best[2], float(values[best[1], best[2]])))
    return dropped, pairs


def test_pick_by_pairs_equals_the_rule_by_hand():
    from moe_prune.scoring.selection import pick_by_pairs

    rng = random.Random(5)
    for _ in range(300):
        experts = rng.randint(2, 6)
        values = np.array([[rng.choice([-1.0, 0.0, 0.5, 2.0]) for _ in range(experts)] for _ in range(experts)])
        usage = np.array([rng.choice([0, 1, 3]) for _ in range(experts)])
        banned = set(rng.sample(range(experts), rng.randint(0, experts - 1)))
        cap = rng.randint(1, experts)

        def allowed(slot, dropped, banned=banned, cap=cap):
            return slot not in banned and len(dropped) < cap

        n_drop, direction = rng.randint(0, experts), rng.choice(["min", "max"])
        want = greedy_pairs_by_hand(values, usage, direction, n_drop, allowed)
        assert pick_by_pairs(values, usage, direction, n_drop, allowed) == want, (values, usage, banned, cap)
