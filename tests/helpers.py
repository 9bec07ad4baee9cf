"""Small checks several test modules share (the fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def checkpoint_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder by name, read straight from its shards (not through moe-prune)."""
    found: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        found.update(load_file(shard))
    return found


def tensor_bytes(folder: str | Path) -> dict[str, bytes]:
    """Every tensor's raw bytes by name: equal bytes mean an unchanged tensor, whatever its dtype."""
    return {
        name: tensor.contiguous().view(torch.uint8).numpy().tobytes()
        for name, tensor in checkpoint_tensors(folder).items()
    }


def assert_one_line_error(result, message: str) -> None:
    """A CLI refusal: exit 1 and one line starting `error:` that holds `message` (white space folded)."""
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output
    assert message in " ".join(result.output.split()), result.output


PANGRAMS = "the quick brown fox jumps over the lazy dog; 0123456789 pack my box with five dozen liquor jugs.\n" * 40


def tiny_stats(folder: Path, tmp: Path, *, refit_stats: bool = False) -> Path:
    """Statistics of a tiny model on PANGRAMS (4 sequences of 32 tokens), saved under `tmp`."""
    from moe_prune.stages import profile

    data = tmp / "calibration.txt"
    data.write_text(PANGRAMS)
    path = tmp / "stats.npz"
    settings = profile.Settings(samples=4, seq_len=32, batch_size=4, refit_stats=refit_stats)
    profile.run(folder, str(data), settings).stats.save(path)
    return path


def traced_peaks(monkeypatch, module, name: str) -> list[int]:
    """Replace `module.name` by a wrapper that appends the tracemalloc peak of each call (above what was traced
    when it began) to the returned list; tracemalloc must be started by the caller."""
    import tracemalloc

    whole = getattr(module, name)
    peaks: list[int] = []

    def measured(*args, **kwargs):
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        result = whole(*args, **kwargs)
        peaks.append(tracemalloc.get_traced_memory()[1] - start)
        return result

    monkeypatch.setattr(module, name, measured)
    return peaks
