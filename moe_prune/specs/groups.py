"""Option groups several stages share, each stated once: its fields, defaults, help and checks.

A stage spec composes them by inheritance (`class FinetuneSpec(Training, TextData)`) when it uses the
fields under the same names, or reuses single fields with `fields.like` under another name (lottery's
`--profile-samples` is profile's `--samples`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe_prune.demo import DEMO_HELDOUT
from moe_prune.errors import MoePruneError
from moe_prune.specs.fields import option
from moe_prune.specs.parse import MAX_SEED, device_map

TRAIN = "Training"
SPLIT_ON_HELP = (
    "How .txt/.text/.md files become documents: none (the whole file is one document) or blank-lines "
    "(each paragraph one document; documents are joined by EOS)."
)


def data_help(tasks: bool) -> str:
    """`--data`'s help, naming task:NAME only where the command reads tasks (through profile's reader)."""
    return (
        "Data file (.txt/.jsonl/.json/.parquet/.csv; chat 'messages' records go through the model's chat "
        f"template){', hub dataset id or task:NAME' if tasks else ' or hub dataset id'}. "
        "Repeat to mix: SOURCE:SHARE (0.5, 50%) or SOURCE:TOKENS (20k)."
    )


@dataclass(frozen=True)
class TextData:
    """How structured and plain-text data become documents."""

    text_field: str = option("text", "Field/column holding the text in structured data.")
    split_on: str = option("none", SPLIT_ON_HELP)  # runtime.data.SPLIT_ON


@dataclass(frozen=True)
class Calibration:
    """Which windows of the calibration data a profile reads, and how many per forward pass."""

    samples: int = option(256, "Calibration sequences (drawn with --seed when more exist).")
    seq_len: int = option(2048, "Tokens per sequence (capped at the model's context).")
    seed: int = option(0, "Seed of the choice of sequences.", min=0, max=MAX_SEED)
    batch_size: int = option(8, "Sequences per forward pass.")


@dataclass(frozen=True)
class ModelLoading:
    """How a model is loaded: dtype, placement, and whether its own code may run."""

    dtype: str = option("float32", "float32, bfloat16, float16 or auto (the checkpoint's).")
    device: str = option("cpu", "cpu, cuda, cuda:1, ... or auto (spread over GPUs).", affects_result=False)
    device_map: str | None = option(
        None,
        "auto: spread a model larger than one device over all (accelerate).",
        parse=device_map,
        affects_result=False,
    )
    trust_remote_code: bool = option(
        False,
        "Allow the checkpoint's own Python code to run (never without this flag).",
        "--trust-remote-code/--no-trust-remote-code",
        affects_result=False,
    )

    def __post_init__(self) -> None:
        """--device-map auto is accelerate's big-model placement, the same as --device auto."""
        if self.device_map is not None:
            object.__setattr__(self, "device", device_map(self.device_map, "--device-map"))


@dataclass(frozen=True)
class Training:
    """The optimizer and batching of next-token training (finetune, and every lottery round)."""

    seq_len: int = option(
        256, "Tokens per sequence (chat/completion: longer examples keep their first ones).", panel=TRAIN
    )
    batch_size: int = option(8, "Sequences per micro-batch per process.", panel=TRAIN)  # on each process
    grad_accum: int = option(1, "Micro-batches per optimizer step.", panel=TRAIN)
    lr: float = option(1e-5, "Peak AdamW learning rate.", panel=TRAIN)
    weight_decay: float = option(0.01, "AdamW weight decay (2-D weights).", panel=TRAIN)
    warmup_ratio: float = option(  # share of steps with a linear warm-up before the cosine decay
        0.05, "Share of steps of linear warm-up before cosine decay.", panel=TRAIN
    )
    max_grad_norm: float = option(1.0, "Gradient clipping (0: off).", panel=TRAIN)


@dataclass(frozen=True)
class Heldout(TextData):
    """Perplexity on held-out text: which text, and how much of it per forward pass (eval, sweep)."""

    data: str = option(
        str(DEMO_HELDOUT),
        "Text file (.txt/.jsonl/.json/.parquet/.csv; chat 'messages' records through the model's chat "
        "template) or hub dataset id.",
        "--data",
        "-d",
    )
    seq_len: int = option(256, "Tokens per evaluated sequence (capped at the model's context).")
    batch_size: int = option(8, "Sequences per forward pass.")
    max_tokens: int | None = option(None, "Evaluate at most this many tokens of the data.")


@dataclass(frozen=True)
class Tasks:
    """lm-eval task accuracy (`--tasks`) and its options, which apply to --tasks only (eval, sweep)."""

    tasks: str | None = option(  # the names as given; `stages.tasks.parse_tasks` reads them
        None,
        "Comma-separated lm-eval tasks/groups to score (e.g. demo: the demo model's offline suite). "
        "Needs moe-prune\\[tasks].",
        "--tasks",
    )
    num_fewshot: int | None = option(None, "Few-shot demonstrations per task question (default: each task's own).")
    limit: int | None = option(None, "Score at most this many documents per task.")
    include_path: Path | None = option(
        None,
        "Folder of your own lm-eval task YAMLs, usable by name in --tasks (their code, such as "
        "!function, runs only with --trust-remote-code).",
    )

    def check_tasks(self) -> None:
        """The task options alone are refused: they would silently do nothing."""
        options = {"--num-fewshot": self.num_fewshot, "--limit": self.limit, "--include-path": self.include_path}
        if self.tasks is None and any(v is not None for v in options.values()):
            raise MoePruneError(f"{', '.join(list(options)[:-1])} and {list(options)[-1]} apply to --tasks only")


@dataclass(frozen=True)
class Output:
    """How a shrunk checkpoint is written (prune, merge)."""

    max_shard_size: str = option("5GB", "Largest output shard, e.g. 5GB, 500MB, 2GiB.", affects_result=False)
    drop_mtp: bool = option(
        False,
        "Remove the multi-token-prediction layers (vLLM/SGLang speculative decoding); count set to 0.",
        "--drop-mtp",
    )
    force: bool = option(False, "Replace an existing output.", "--force", affects_result=False)
