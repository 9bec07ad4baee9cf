"""One size parser, agreeing with transformers wherever both read a size (finetune hands it on)."""

from __future__ import annotations

import pytest
from transformers.utils.hub import convert_file_size_to_int

from moe_prune.errors import MoePruneError
from moe_prune.sizes import parse_size

BOTH = ["5GB", "5Gb", "5gb", "500MB", "500Mb", "7KB", "7kb", "2GiB", "512MiB", "3KiB", "10GIB", "1MB"]


@pytest.mark.parametrize("text", BOTH)
def test_agrees_with_transformers(text):
    assert parse_size(text) == convert_file_size_to_int(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1000", 1000), (4096, 4096), ("2.5GB", 2_500_000_000), ("1TB", 10**12), ("1TiB", 2**40), ("1e3", 1000)],
)
def test_sizes_transformers_does_not_read(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "-5GB", "0", "0MB", "GB", "", "inf", "1e400GB", "5 G B", "5iB", True])
def test_refused_naming_the_option(text):
    with pytest.raises(MoePruneError, match="--max-shard-size"):
        parse_size(text, "--max-shard-size")
