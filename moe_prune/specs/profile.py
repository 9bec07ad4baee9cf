"""How a profile run chooses its calibration data and runs the model: `stages.profile.run`'s settings and
`moe-prune profile`'s options (the data sources, output and `--combine` are the command's own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_prune.errors import MoePruneError
from moe_prune.specs import parse
from moe_prune.specs.fields import option
from moe_prune.specs.groups import Calibration, ModelLoading, TextData

BUFFER_MEMORY_HELP = (
    "Layer-by-layer runs (profile --sequential, merge --refit without refit sums): hidden states "
    "kept in memory, e.g. 8GB; more spill to disk."
)
EXPERT_MEMORY_HELP = (
    "--sequential: bytes of a layer's experts loaded at once, e.g. 4GB; a layer whose experts are larger "
    "runs them a chunk at a time, read again for every batch."
)
FOR_HELP = (
    "Record only what these read: criteria, merge methods, refit, protect-super-experts, weights-output "
    "(comma-separated, e.g. reap,uncurl)."
)

# The resume fingerprint of a profile's partial files (`stages.profile.resume_options`): the result-affecting fields
# a resumed run must match, in the layout of the first releases' files (which must still resume): the first group
# always, each later group only when one of its fields is set. The other result-affecting fields choose the
# windows, whose token ids the fingerprint hashes instead, or never save partial sums (--sequential). A new
# result-affecting field goes in one of the two (tests/test_specs.py checks it).
RESUMED = (("batch_size", "dtype", "gradients"), ("expert_outputs", "refit_stats"), ("for_names",))
NOT_RESUMED = ("samples", "seq_len", "seed", "shard", "text_field", "split", "split_on", "include_path", "sequential")


def _names(text: str | None, flag: str) -> tuple[str, ...]:
    """`--for a,b` -> ('a', 'b') as given; `stages.profile_for.wanted` checks and cleans them."""
    return () if text is None else tuple(text.split(","))


@dataclass(frozen=True)
class ProfileSpec(ModelLoading, TextData, Calibration):
    """How the calibration data is chosen and the model run."""

    shard: tuple[int, int] = option(
        (0, 1),
        "Profile only slice i of n of the sequences, e.g. 0/4.",
        cli_type=str,
        cli_default="0/1",
        parse=parse.shard,
    )
    split: str = option("train", "Split of a hub dataset (streamed).")
    include_path: Path | None = option(  # task YAMLs of the user's, for `data="task:NAME"`
        None, "Folder of your own lm-eval task YAMLs (--task); their code needs --trust-remote-code."
    )
    gradients: bool = option(False, "Also backpropagate the next-token loss: gradient statistics.", "--gradients")
    expert_outputs: bool = option(  # out_all_sum: every expert on every token (runtime.expert_outputs)
        False, "Also run every expert on every token: HC-SMoE's output statistic.", "--expert-outputs"
    )
    refit_stats: bool = option(  # refit_hh / refit_hy: the normal equations of `merge --refit`
        False, "Also record what `merge --refit` needs (every expert, every token).", "--refit-stats"
    )
    for_names: tuple[str, ...] = option(  # `--for`: record only what these criteria / merge options read
        (), FOR_HELP, "--for", cli_type=str | None, cli_default=None, parse=_names
    )
    sequential: bool = option(  # one decoder layer at a time from the safetensors files
        False, "Load one decoder layer at a time: memory of one layer.", "--sequential"
    )
    buffer_memory: int | None = option(  # bytes of hidden states kept in memory (sequential); more spill to disk
        None, BUFFER_MEMORY_HELP, cli_type=str | None, parse=parse.size_or_none, affects_result=False
    )
    expert_memory: int | None = option(  # bytes of a layer's experts loaded at once (runtime.expert_chunks)
        None, EXPERT_MEMORY_HELP, cli_type=str | None, parse=parse.size_or_none, affects_result=False
    )
    save_every: int = option(  # batches between resumable checkpoints (0: none)
        0, "Save resumable progress every N batches (0: never).", affects_result=False
    )

    def check(self) -> None:
        from moe_prune.runtime.data import check_split_on
        from moe_prune.runtime.skeleton import parse_dtype

        if self.samples < 1:
            raise MoePruneError(f"--samples must be at least 1 (got {self.samples})")
        if self.seq_len < 2:
            raise MoePruneError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.batch_size < 1:
            raise MoePruneError(f"--batch-size must be at least 1 (got {self.batch_size})")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise MoePruneError(f"shard {index}/{count}: expected i/n with 0 <= i < n")
        parse_dtype(self.dtype)
        check_split_on(self.split_on)
        if self.sequential and self.gradients:
            raise MoePruneError(
                "--sequential cannot collect --gradients (backpropagation needs every layer at once); "
                "profile gradients without --sequential, with --device-map auto for large models"
            )
        if self.sequential and self.save_every:
            raise MoePruneError("--save-every/--resume work without --sequential only")
        check_sequential_only(self.sequential, buffer_memory=self.buffer_memory, expert_memory=self.expert_memory)
        if self.expert_memory is not None and (self.expert_outputs or self.refit_stats):
            raise MoePruneError(
                "--expert-memory cannot be combined with --expert-outputs or --refit-stats (or a --for name that "
                "needs them): they run every expert on every token from the layer's whole expert weights"
            )
        if self.save_every < 0:
            raise MoePruneError(f"--save-every must be at least 0 (got {self.save_every})")


def check_sequential_only(sequential: bool, **sizes: int | None) -> None:
    """Memory bounds of --sequential's layer-by-layer run (`buffer_memory=...`): refused without it."""
    for name, size in sizes.items():
        if size is not None and not sequential:
            flag = "--" + name.replace("_", "-")
            raise MoePruneError(f"{flag} applies to --sequential only; add --sequential or leave it out")
