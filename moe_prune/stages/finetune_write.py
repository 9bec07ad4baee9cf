"""`finetune`'s writers: resumable state during training and the output checkpoint at the end. Split from
`stages.finetune` (issue #22: files <= 300 lines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from moe_prune.artifacts.manifest import Manifest
from moe_prune.checkpoint.relayout import restore_source_layout
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.checkpoint.writer import copy_side_files
from moe_prune.errors import MoePruneError
from moe_prune.io.output import atomic_folder
from moe_prune.runtime.skeleton import quiet_transformers
from moe_prune.sizes import parse_size
from moe_prune.stages.finetune_setup import _Plan, _save_dtype
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.state import WorkFolder


def _save_state(accelerator: Any, work: WorkFolder, step: int, fingerprint: dict[str, Any]) -> None:
    """Resumable state after `step` steps: written by all processes, then committed by the main one."""
    if accelerator.is_main_process:
        work.path.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(work.state_dir(step)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        work.commit(step, fingerprint)
    accelerator.wait_for_everyone()


def _write(
    accelerator: Any,
    wrapped: Any,
    inner: Any,
    ckpt: Checkpoint,
    model: str | Path,
    provenance: dict[str, Any],
    out: Path,
    options: FinetuneOptions,
    plan: _Plan,
    top_k: int,
) -> None:
    """The output checkpoint, written by the main process into a temp folder that then replaces `out`;
    `provenance`: --data as given and every source with its share and tokens (for the history entry)."""
    state = accelerator.get_state_dict(wrapped)  # gathers shards under FSDP / DeepSpeed: every process calls it
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    dtype = _save_dtype(ckpt)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}
    config = ckpt.config
    previous = ckpt.manifest.history if ckpt.manifest else []
    entry = {
        "stage": "finetune",
        "source": str(model),
        **provenance,
        "steps": plan.steps,
        "tokens": plan.steps * plan.tokens_per_step,
        "top_k": top_k,
        "options": options.fingerprint_fields(),
    }
    manifest = Manifest(slots=dict(ckpt.identity.original_ids), history=[*previous, entry])
    new_config = config.with_expert_count(config.num_experts, top_k)
    max_bytes = parse_size(options.max_shard_size, "--max-shard-size")
    with atomic_folder(out, options.force, protect=(ckpt.folder,)) as tmp:
        try:
            with quiet_transformers():
                inner.save_pretrained(tmp, state_dict=state, max_shard_size=max_bytes)
        except SafetensorError as exc:  # the Rust writer's I/O errors (a full disk) are not OSErrors
            raise MoePruneError(f"{out}: cannot write ({str(exc).splitlines()[0]})") from exc
        restore_source_layout(tmp, ckpt, max_bytes)  # a wrapper's vision tower and key names, as in the input
        copy_side_files(ckpt.folder, tmp)
        raw = {k: v for k, v in new_config.raw.items() if k != "quantization_config"}  # written dequantized
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        manifest.write(tmp)
    accelerator.wait_for_everyone()
