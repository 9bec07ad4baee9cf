"""Drop the experts a mask names: slice routers and per-expert biases, fix the config, reshard.

Reads the shard headers and every router (weight, bias, selection bias): NaN or Inf there is refused.

Not read: kept experts, attention, embeddings and all other tensors are copied byte for byte unchecked.

(A NaN there is copied too; eval, profile and finetune refuse it when they load the model.)
"""

from __future__ import annotations

from dataclasses import fields
from typing import Annotated

import typer
from rich.table import Table

from moe_prune.cli.common import (
    DEFAULT_MODEL,
    JsonOpt,
    ModelArg,
    OutDirOpt,
    byte_progress,
    human_bytes,
    out_console,
    print_json,
    user_errors,
    warn,
)
from moe_prune.cli.spec_options import takes_spec
from moe_prune.specs.prune import PruneSpec
from moe_prune.stages.common import check_not_input


def _counts(per_layer: dict[int, int]) -> str:
    """'6' when every layer has 6 experts, else each layer's count: '6/3/5'."""
    values = list(per_layer.values())
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


@user_errors
@takes_spec(PruneSpec, "spec")
def prune(
    out: OutDirOpt,
    mask: Annotated[str, typer.Option("--mask", "-m", help="Drop mask JSON (from `moe-prune score`); - reads stdin.")],
    model: ModelArg = DEFAULT_MODEL,
    *,
    spec: PruneSpec,  # one option per field (cli/spec_options.py), named as stages.prune.run's keywords
    json_output: JsonOpt = False,
) -> None:
    from moe_prune.stages import prune as stage
    from moe_prune.stages.prune import DropMask

    check_not_input(out, (model, mask))
    drop_mask = DropMask.read(mask)
    with byte_progress("writing shards") as update:
        options = {f.name: getattr(spec, f.name) for f in fields(spec)}
        result = stage.run(
            model, drop_mask, out, mask_name="<stdin>" if mask == "-" else mask, progress=update, **options
        )
    for message in result.warnings:
        warn(message)
    if json_output:
        print_json(result.to_dict())
        return
    table = Table(title=f"pruned → {result.out}")
    table.add_column("layer", justify="right")
    table.add_column("kept (original ids)")
    table.add_column("dropped")
    for layer, kept in result.kept.items():
        table.add_row(str(layer), " ".join(map(str, kept)), str(result.experts_before_per_layer[layer] - len(kept)))
    out_console.print(table)
    out_console.print(
        f"experts per layer {_counts(result.experts_before_per_layer)} → {_counts(result.experts_after_per_layer)}, "
        f"top-k {result.top_k}, "
        f"weights {human_bytes(result.bytes_before)} → {human_bytes(result.bytes_after)} "
        f"in {len(result.shards)} shard(s)"
    )
    for line in result.notes():
        out_console.print(line)
