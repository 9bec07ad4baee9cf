"""`eval`: perplexity, routing counts, load metrics, parameter counts and the CLI, on tiny random models."""

from __future__ import annotations

import json
import math
import random
import shutil
import string

import pytest
import torch
from reference import router_weight

from moe_prune.architectures.config import ModelConfig
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.runtime.loading import load_model
from moe_prune.runtime.routing import RoutingRecorder, load_balance
from moe_prune.specs.eval import EvalSpec
from moe_prune.stages import evaluate

SEQ = 16


@pytest.fixture(scope="module")
def docs() -> list[str]:
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 7))) for _ in range(60)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) + "." for _ in range(12)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return str(path)


def independent_nll(folder, docs: list[str], trust_remote_code: bool = False) -> tuple[float, int]:
    """Mean NLL via the model's own loss (labels=input), chunking the stream by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    stream = [i for d in docs for i in [*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - SEQ + 1, SEQ):
            chunk = torch.tensor([stream[start : start + SEQ]])
            total += float(model(chunk, labels=chunk).loss) * (SEQ - 1)
            count += SEQ - 1
    return total / count, count


@pytest.mark.parametrize("model_type", ["mixtral", "llama4_text"])
def test_perplexity_matches_the_models_own_loss(tiny, docs, data_file, model_type):
    folder = tiny(model_type)
    result = evaluate.run(str(folder), EvalSpec(data=data_file, seq_len=SEQ, batch_size=3)).model
    nll, count = independent_nll(folder, docs)
    assert result.tokens_scored == count == result.sequences * (SEQ - 1)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "granitemoe", "dbrx", "llama4_text", "gpt_oss"])
def test_routing_counts_equal_top_k_of_router_matmul(tiny, model_type):
    """These families select on the logits' order, so top-k of hidden @ W_router.T is the choice."""
    folder = tiny(model_type)
    config = ModelConfig.load(folder / "config.json")
    model = load_model(folder)
    adapter, experts, k = config.adapter, config.num_experts, config.top_k
    expected = {}

    def capture(layer, module, args):
        weight = router_weight(module, experts)
        bias = getattr(getattr(module, "layer", module), "bias", None) if adapter.router_bias else None
        hidden = args[0].reshape(-1, weight.shape[1])
        logits = torch.nn.functional.linear(hidden, weight, bias)
        expected[layer] = torch.bincount(logits.topk(k).indices.flatten(), minlength=experts)

    for layer in config.moe_layers:
        router = model.get_submodule(f"{adapter.runtime_layers}.{layer}.{adapter.runtime_router}")
        router.register_forward_pre_hook(lambda m, a, layer=layer: capture(layer, m, a))
    ids = torch.randint(0, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    with RoutingRecorder(model, config) as recorder, torch.no_grad():
        model(ids, use_cache=False)
    assert recorder.tokens.tolist() == [ids.numel()] * len(config.moe_layers)
    for slot, layer in enumerate(config.moe_layers):
        assert recorder.hard_counts[slot].tolist() == expected[layer].tolist()
    assert recorder.hard_counts.sum(1).tolist() == [ids.numel() * k] * len(config.moe_layers)
    counted = recorder.hard_counts.clone()
    with torch.no_grad():
        model(ids[:, :4], use_cache=False)  # after exit the hooks are gone: nothing more is counted
    assert torch.equal(recorder.hard_counts, counted)


def test_load_balance_on_constructed_counts():
    assert load_balance([5, 5, 5, 5]) == pytest.approx((1.0, 1.0))
    assert load_balance([0, 0, 12, 0]) == pytest.approx((4.0, 0.0))
    p = [0.25, 0.75]
    assert load_balance([1, 3]) == pytest.approx((3 / 2, -sum(x * math.log(x) for x in p) / math.log(2)))
    assert load_balance([7]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in load_balance([0, 0]))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "dbrx", "granitemoe", "llama4_text", "gpt_oss"])
def test_param_counts_equal_the_loaded_models_parameters(tiny, model_type):
    folder = tiny(model_type)
    config = ModelConfig.load(folder / "config.json")
    model = load_model(folder)
    adapter = config.adapter
    prefixes = tuple(f"{adapter.runtime_layers}.{L}.{adapter.runtime_experts}." for L in config.moe_layers)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    routed = sum(p.numel() for name, p in params.items() if name.startswith(prefixes))
    embedding = model.get_input_embeddings().weight.numel()
    counts = evaluate.count_params(Checkpoint.open(folder), model)
    assert routed > 0
    assert (counts.total, counts.routed_experts, counts.non_expert) == (total, routed, total - routed)
    assert counts.active * config.num_experts == (total - routed) * config.num_experts + routed * config.top_k
    assert counts.embedding == embedding
    assert counts.flops_per_token == 2 * (counts.active - embedding)  # untied head: a matmul counted in active


def test_sizes_in_the_result(tiny, data_file):
    folder = tiny("mixtral")
    result = evaluate.run(str(folder), EvalSpec(data=data_file, seq_len=SEQ, max_tokens=4 * SEQ + 3)).model
    model = load_model(folder)
    assert result.sequences == 4
    assert result.bytes_on_disk == sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert result.bytes_in_memory == 4 * sum(p.numel() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert [load.tokens for load in result.load] == [4 * SEQ] * 3
    assert result.experts_per_layer == 8 and result.top_k == 2 and result.shared_experts is None


def test_bad_numbers_are_user_errors(tiny, data_file):
    folder = str(tiny("mixtral"))
    with pytest.raises(MoePruneError, match="batch size"):
        evaluate.run(folder, EvalSpec(data=data_file, batch_size=0))
    with pytest.raises(MoePruneError, match="max tokens 5 is fewer than one sequence of 16"):
        evaluate.run(folder, EvalSpec(data=data_file, seq_len=SEQ, max_tokens=5))


def test_a_checkpoint_missing_a_weight_is_refused_not_filled_at_random(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny("mixtral"), tmp_path / "broken")
    tensors = load_file(tmp_path / "broken" / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoePruneError, match=r"missing weight model\.norm\.weight"):
        load_model(tmp_path / "broken")


def test_seq_len_is_clipped_to_the_context(tiny, data_file):
    result = evaluate.run(str(tiny("mixtral")), EvalSpec(data=data_file, seq_len=1000, max_tokens=200))
    assert result.model.seq_len == 128  # tiny_models.COMMON max_position_embeddings
    assert any("exceeds the model's context" in w for w in result.warnings)


# ---------------------------------------------------------------- CLI


def cli(*args: str):
    from typer.testing import CliRunner

    from moe_prune.cli import app

    return CliRunner().invoke(app, ["eval", *args])


def test_cli_json(tiny, data_file):
    result = cli(str(tiny("qwen2_moe")), "--data", data_file, "--seq-len", str(SEQ), "--batch-size", "2", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model = out["model"]
    assert model["tokens_scored"] == model["sequences"] * (SEQ - 1)
    assert model["perplexity"] == pytest.approx(math.exp(model["nll"]))
    assert model["shared_experts"] == {"key": "shared_expert_intermediate_size", "value": 40}
    assert [layer["layer"] for layer in model["load"]] == [1, 2]
    for layer in model["load"]:
        assert sum(layer["counts"]) == layer["tokens"] * model["top_k"]
    assert out["baseline"] is None and out["comparison"] is None


def test_cli_tables(tiny, data_file):
    result = cli(str(tiny("mixtral")), "--data", data_file, "--seq-len", str(SEQ))
    assert result.exit_code == 0, result.output
    assert (
        "perplexity" in result.stdout and "expert load (top-" in result.stdout and "not recorded" not in result.stdout
    )


def test_cli_baseline_shows_savings_of_a_pruned_model(tiny, data_file, tmp_path):
    from moe_prune.artifacts.mask import DropMask
    from moe_prune.stages import prune

    folder = tiny("mixtral")
    identity = Checkpoint.open(folder).identity
    keep = {layer: [0, 2, 5, 7] for layer in identity.moe_layers}
    prune.run(folder, DropMask.create(identity, keep, "test"), tmp_path / "pruned")
    args = ["--data", data_file, "--seq-len", str(SEQ), "--baseline", str(folder), "--json"]
    result = cli(str(tmp_path / "pruned"), *args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    model, base, comparison = out["model"], out["baseline"], out["comparison"]
    assert model["params"]["routed_experts"] * 2 == base["params"]["routed_experts"]
    assert model["params"]["non_expert"] < base["params"]["non_expert"]  # routers lost rows
    for key in ("params", "active_params", "flops_per_token", "bytes_on_disk", "bytes_in_memory"):
        assert comparison[key]["change"] < 0, key
    assert comparison["params"]["model"] == model["params"]["total"]
    assert model["tokens_scored"] == base["tokens_scored"]
    assert [load["original_ids"] for load in model["load"]] == [keep[layer] for layer in identity.moe_layers]
    assert [load["original_ids"] for load in base["load"]] == [list(range(8))] * len(identity.moe_layers)
    assert comparison["perplexity"]["change"] == pytest.approx(model["perplexity"] - base["perplexity"])
    table = cli(str(tmp_path / "pruned"), *args[:-1])
    assert table.exit_code == 0 and "baseline" in table.stdout and "change" in table.stdout


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing model", "model folder not found"),
        ("not a model", "no safetensors weights"),
        ("no tokenizer", "no tokenizer files"),
        ("empty data", "contains no text"),
        ("bad dtype", "unknown dtype"),
    ],
)
def test_cli_bad_input_is_one_error_line(tiny, tmp_path, data_file, problem, message):
    (tmp_path / "empty.jsonl").write_text("")
    folder = tiny("mixtral")
    args = {"model": str(folder), "--data": data_file, "--dtype": "float32"}
    if problem == "missing model":
        args["model"] = str(tmp_path / "nope")
    elif problem == "not a model":
        args["model"] = str(tmp_path)
    elif problem == "no tokenizer":
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(folder / name, bare / name)
        args["model"] = str(bare)
    elif problem == "empty data":
        args["--data"] = str(tmp_path / "empty.jsonl")
    else:
        args["--dtype"] = "fp8"
    result = cli(args.pop("model"), *[item for pair in args.items() for item in pair], "--json")
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_cli_demo_defaults():
    from moe_prune.demo import DEMO_HELDOUT, DEMO_MODEL_DIR

    assert (DEMO_MODEL_DIR / "config.json").exists() and DEMO_HELDOUT.exists(), "the demo model ships with the package"
    result = cli("--json", "--max-tokens", "4096")
    assert result.exit_code == 0, result.output
    model = json.loads(result.stdout)["model"]
    assert model["tokens_scored"] == model["sequences"] * (model["seq_len"] - 1) > 0
    # Independent path: transformers' own shifted next-token loss over the same leading tokens.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    texts = [json.loads(line)["text"] for line in DEMO_HELDOUT.read_text().splitlines() if line.strip()]
    ids = [i for text in texts for i in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]]
    seq = model["seq_len"]
    rows = torch.tensor(ids[: model["sequences"] * seq]).reshape(model["sequences"], seq)
    reference = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    with torch.no_grad():
        nll = torch.stack([reference(input_ids=row[None], labels=row[None]).loss for row in rows]).mean()
    assert model["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
