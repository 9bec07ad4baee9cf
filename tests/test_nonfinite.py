"""eval refuses a model whose logits are not finite, however the NaN got there (weights, or overflow at run time)."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_prune.errors import MoePruneError
from moe_prune.stages.evaluate import nll_sum


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nll_sum_refuses_non_finite_logits_naming_the_model(tiny_factory, value):
    _, model = tiny_factory("mixtral")
    model = copy.deepcopy(model)
    chunks = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    total, count = nll_sum(model, chunks, 2, lambda done: None, "good-model")
    assert torch.isfinite(torch.tensor(total)) and count == 4 * 15
    with torch.no_grad():
        model.get_output_embeddings().weight[3] = value  # token 3's logit: +-inf terms sum to NaN at every position
    with pytest.raises(MoePruneError, match=r"^some/folder: the model produces non-finite logits"):
        nll_sum(model, chunks, 2, lambda done: None, "some/folder")


def _poisoned_copy(folder, tmp_path, suffix: str, value: float) -> tuple[object, str]:
    """A copy of `folder` whose first MoE-layer tensor ending in `suffix` has one `value`; (copy, tensor name)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moe_prune.checkpoint.source import Checkpoint

    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    ckpt = Checkpoint.open(copy)
    layer = ckpt.config.moe_layers[0]
    name = next(t.name for t in ckpt.tensors if t.name.endswith(suffix) and f".layers.{layer}." in t.name)
    shard = next(t.file for t in ckpt.tensors if t.name == name)
    tensors = load_file(shard)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return copy, name


def _keep_half(folder):
    from moe_prune.artifacts.mask import DropMask
    from moe_prune.checkpoint.source import Checkpoint

    identity = Checkpoint.open(folder).identity
    keep = {layer: list(ids[::2]) for layer, ids in identity.original_ids.items()}  # grouped routing: per group
    return DropMask.create(identity, keep, "test")


@pytest.mark.parametrize(
    ("model_type", "part"),
    [("mixtral", "router"), ("deepseek_v3", "selection_bias"), ("gpt_oss", "router_bias")],
)
def test_prune_reads_every_router_part_and_refuses_nan_naming_the_tensor(tiny_factory, tmp_path, model_type, part):
    from moe_prune.architectures import get_adapter
    from moe_prune.stages import prune

    folder, _ = tiny_factory(model_type)
    suffix = getattr(get_adapter(model_type), part)
    copy, name = _poisoned_copy(folder, tmp_path, suffix, float("nan"))
    with pytest.raises(MoePruneError, match=rf"\.safetensors: {name} holds NaN or Inf values; refusing to prune"):
        prune.run(copy, _keep_half(copy), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    prune.run(folder, _keep_half(folder), tmp_path / "good")  # the same prune of the clean model works


def test_prune_copies_kept_experts_unread_as_its_help_says(tiny_factory, tmp_path):
    """The documented limit: a NaN in a kept expert is copied; the commands that load the model refuse it."""
    from typer.testing import CliRunner

    from moe_prune.cli import app
    from moe_prune.runtime.loading import load_model
    from moe_prune.stages import prune

    folder, _ = tiny_factory("mixtral")
    copy, name = _poisoned_copy(folder, tmp_path, "experts.0.w2.weight", float("nan"))
    prune.run(copy, _keep_half(copy), tmp_path / "out")
    from safetensors.torch import load_file

    (shard,) = (tmp_path / "out").glob("*.safetensors")
    assert torch.isnan(load_file(shard)[name]).any()  # expert 0 is kept, under its own name
    with pytest.raises(MoePruneError, match="holds NaN or Inf"):
        load_model(tmp_path / "out")
    help_text = CliRunner().invoke(app, ["prune", "--help"]).stdout
    assert "Not read: kept experts" in " ".join(help_text.split())
