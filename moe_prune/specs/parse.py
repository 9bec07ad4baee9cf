"""Command-line text -> spec values: each parser takes the value and the flag it came with, for its one-line error."""

from __future__ import annotations

from moe_prune.errors import MoePruneError
from moe_prune.sizes import parse_size, parse_tokens

# Every --seed: numpy and accelerate take 0 to 2**32 - 1, and runs add their round or draw number to it.
MAX_SEED = 2**31 - 1


def tokens(text: str, flag: str) -> int:
    """'1M' -> 1_000_000."""
    return parse_tokens(text, flag)


def size_or_none(text: str | None, flag: str) -> int | None:
    """'8GB' -> bytes; not given -> None."""
    return parse_size(text, flag) if text else None


def device_map(value: str, flag: str) -> str:
    """--device-map auto is accelerate's big-model placement (the only one supported)."""
    if value != "auto":
        raise MoePruneError(f"{flag} {value!r}: only 'auto' is supported")
    return value


def shard(text: str, flag: str = "--shard") -> tuple[int, int]:
    """'i/n' -> (i, n), slice i of n with 0 <= i < n."""
    index, sep, count = text.partition("/")
    try:
        if not sep:
            raise ValueError
        shard = int(index), int(count)
    except ValueError as exc:
        raise MoePruneError(f"{flag} {text!r}: expected i/n, e.g. 0/4") from exc
    if not 0 <= shard[0] < shard[1]:
        raise MoePruneError(f"{flag} {text!r}: slice i of n needs 0 <= i < n")
    return shard


def anneal(text: str | None, flag: str = "--top-k-anneal") -> tuple[int, int] | None:
    """'4:2' -> (4, 2): top-k goes from 4 to 2 over the run; not given -> None, but '' is refused (not 'no anneal')."""
    if text is None:
        return None
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(first), int(last)
    except ValueError as exc:
        raise MoePruneError(f"{flag} {text!r}: expected FROM:TO, e.g. 2:1") from exc


def layer_numbers(values: str | list[str], flag: str) -> list[int]:
    """'0,3' or ['0,3', '5'] (a repeated option) -> [0, 3, 5]: sorted, each once; a blank part is refused."""
    texts = [values] if isinstance(values, str) else values
    try:
        return sorted({int(part) for text in texts for part in text.split(",")})
    except ValueError as exc:
        given = ",".join(texts)
        raise MoePruneError(f"{flag} {given!r}: expected comma-separated layer numbers such as 0 or 0,3") from exc


def comma_list(text: str, flag: str = "") -> tuple[str, ...]:
    """'router,attention' -> ('router', 'attention')."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def one_or_many(values: list[str] | None, flag: str = "") -> str | list[str] | None:
    """Repeated --data: one value as itself, several as a list, none as None."""
    return None if not values else values[0] if len(values) == 1 else list(values)


def negate(passed: bool, flag: str = "") -> bool:
    """`--no-X`: the flag, passed, sets the field X to False."""
    return not passed


def names(text: str, flag: str) -> list[str]:
    """'a, b,a' -> ['a', 'b'] (order kept, duplicates dropped); none is refused."""
    found = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not found:
        raise MoePruneError(f"{flag} needs at least one name")
    return found


def all_or_names(text: str, flag: str) -> tuple[str, ...]:
    """'all' -> () (the stage's every one), else the names."""
    return () if text.strip() == "all" else tuple(names(text, flag))


def name_tuple(text: str, flag: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b')."""
    return tuple(names(text, flag))


def ratios(text: str, flag: str = "--ratios") -> tuple[float, ...]:
    """'0.5,0.25' -> (0.25, 0.5): fractions of experts to drop, each in (0, 1), ascending."""
    found = set()
    for part in names(text, flag):
        try:
            ratio = float(part)
        except ValueError as exc:
            raise MoePruneError(f"{flag} {part!r}: expected a fraction such as 0.25") from exc
        if not 0.0 < ratio < 1.0:
            raise MoePruneError(f"{flag} {part}: each ratio must be above 0 and below 1 (the original is always run)")
        found.add(ratio)
    return tuple(sorted(found))


def as_tuple(values: list[str], flag: str = "") -> tuple[str, ...]:
    """A repeated option's values, as the spec's immutable tuple."""
    return tuple(values)
