"""Build the small trained demo Mixtral-style MoE model shipped with moe-prune.

The demo model lets users (and tests) exercise expert pruning/merging without
downloading a multi-GB checkpoint. Everything is seeded so a rebuild with the
same arguments reproduces the same corpus, tokenizer and (on the same
hardware/library versions) the same weights:

    python scripts/build_demo.py --out-dir moe_prune/demo --seed 0 --steps 1000 --threads 1

Outputs under ``--out-dir``:

* ``model/``: ``save_pretrained`` checkpoint (float32 safetensors), tokenizer,
  and ``training_report.json`` (perplexities, expert usage per domain).
* ``data/calibration.jsonl``: a slice of training documents for profiling.
* ``data/heldout.jsonl``: documents never seen in training, same domain mix.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    get_cosine_schedule_with_warmup,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_corpus import DOMAINS, Document, generate_corpus  # noqa: E402

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


@dataclass(frozen=True)
class Splits:
    """Corpus split: held-out docs are disjoint (by text) from training docs."""

    train: list[Document]
    calibration: list[Document]
    heldout: list[Document]


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------


def take_rounds(docs: list[Document], start: int, target_bytes: int) -> int:
    """Return the end index of whole domain rounds from ``start`` reaching ``target_bytes``.

    The corpus is interleaved round-robin over domains, so cutting at round
    boundaries keeps every split's domain mix identical.
    """
    n_domains, size, end = len(DOMAINS), 0, start
    while size < target_bytes and end + n_domains <= len(docs):
        size += sum(len(d["text"].encode()) for d in docs[end : end + n_domains])
        end += n_domains
    return end


def split_corpus(docs: list[Document], heldout_bytes: int, calibration_bytes: int, seed: int) -> Splits:
    """Held-out = first rounds; calibration = next rounds; train = all but held-out.

    Calibration is deliberately part of the training distribution (and of the
    training set). Training docs whose text equals a held-out text are dropped
    so held-out perplexity is measured on truly unseen documents.
    """
    h_end = take_rounds(docs, 0, heldout_bytes)
    c_end = take_rounds(docs, h_end, calibration_bytes)
    heldout = docs[:h_end]
    heldout_texts = {d["text"] for d in heldout}
    train = [d for d in docs[h_end:] if d["text"] not in heldout_texts]
    random.Random(seed).shuffle(train)
    return Splits(train=train, calibration=docs[h_end:c_end], heldout=heldout)


def write_jsonl(path: Path, docs: list[Document]) -> None:
    """Write documents as JSON lines ``{"domain": ..., "text": ...}``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"domain": d["domain"], "text": d["text"]}) + "\n")


# ---------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style, no unknown tokens) and wrap it for HF.

    No post-processor is attached: callers add ``eos`` between documents
    themselves, which keeps packing and perplexity evaluation explicit.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=512,
    )


def encode_docs(tokenizer: PreTrainedTokenizerFast, docs: list[Document]) -> torch.Tensor:
    """Concatenate documents into one token stream, each followed by ``eos``."""
    ids: list[int] = []
    for enc in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def chunk(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D stream into full non-overlapping rows of ``seq_len`` (tail dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless seeded stream of batches; a fresh permutation every epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(rows.shape[0], generator=gen)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield rows[perm[i : i + batch_size]]


# ---------------------------------------------------------------------------
# model, training, evaluation
# ---------------------------------------------------------------------------


def build_model(vocab_size: int, args: argparse.Namespace) -> PreTrainedModel:
    """Tiny Mixtral: 4 layers x 8 experts, top-2, with load-balancing aux loss."""
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@torch.no_grad()
def perplexity(model: PreTrainedModel, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Token-level perplexity over fixed-length rows (next-token NLL, aux loss excluded)."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        x = rows[i : i + batch_size]
        logits = model(input_ids=x, output_router_logits=False).logits[:, :-1]
        targets = x[:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    return math.exp(nll / count)


def losses(model: PreTrainedModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss and a *per-layer* load-balancing loss (mean over layers).

    transformers' built-in aux loss concatenates all layers' router logits and
    balances experts only globally, which lets individual layers leave experts
    idle. For a pruning demo every expert of every layer should be used, so we
    apply Mixtral's balancing loss to each layer separately (perfect balance
    gives ``top_k`` = 2.0).
    """
    out = model(input_ids=x, output_router_logits=True)
    logits = out.logits[:, :-1]
    lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    cfg = model.config
    aux = [load_balancing_loss_func((r,), cfg.num_local_experts, cfg.num_experts_per_tok) for r in out.router_logits]
    return lm_loss, torch.stack(aux).mean()


def train(
    model: PreTrainedModel,
    rows: torch.Tensor,
    eval_rows: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """AdamW + warmup/cosine; returns a log of losses and held-out perplexities."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    data = batches(rows, args.batch_size, args.seed)
    eval_every = max(1, args.steps // args.n_evals)
    history: list[dict[str, float]] = [{"step": 0, "heldout_ppl": perplexity(model, eval_rows)}]
    print(f"step 0: held-out ppl {history[0]['heldout_ppl']:.2f}", flush=True)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        lm_loss, aux_loss = losses(model, next(data))
        (lm_loss + args.aux_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / step * (args.steps - step)
            print(
                f"step {step}/{args.steps} lm loss {lm_loss.item():.4f} "
                f"aux {aux_loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s",
                flush=True,
            )
        if step % eval_every == 0 or step == args.steps:
            ppl = perplexity(model, eval_rows)
            history.append({"step": step, "heldout_ppl": ppl})
            print(f"step {step}: held-out ppl {ppl:.2f}", flush=True)
    wall = time.perf_counter() - start
    return {
        "wall_time_s": round(wall, 1),
        "tokens_seen": args.steps * args.batch_size * rows.shape[1],
        "eval_history": history,
    }


def unigram_perplexity(train_rows: torch.Tensor, eval_rows: torch.Tensor, vocab_size: int) -> float:
    """Baseline: perplexity of add-one-smoothed training token frequencies on the eval targets."""
    counts = torch.bincount(train_rows.flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[eval_rows[:, 1:].flatten()].mean().item())


def routers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The per-layer top-k routers (``model.model.layers[i].mlp.gate`` in transformers 5)."""
    return [layer.mlp.gate for layer in model.model.layers]


@torch.no_grad()
def expert_usage(model: PreTrainedModel, rows_by_domain: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
    """Fraction of top-k selections per expert, per layer, for every domain.

    A forward hook on each router reads the ``top_k_index`` it returns, which
    is exactly what the experts block dispatches on.
    """
    model.eval()
    gates = routers(model)
    counts = torch.zeros(len(gates), gates[0].num_experts, dtype=torch.long)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, _inp: Any, out: tuple[torch.Tensor, ...]) -> None:
            counts[layer] += torch.bincount(out[2].flatten(), minlength=counts.shape[1])

        return hook

    handles = [g.register_forward_hook(make_hook(i)) for i, g in enumerate(gates)]
    usage: dict[str, list[list[float]]] = {}
    try:
        for domain, rows in rows_by_domain.items():
            counts.zero_()
            for i in range(0, rows.shape[0], 16):
                model(input_ids=rows[i : i + 16], output_router_logits=False)
            frac = counts.float() / counts.sum(dim=1, keepdim=True)
            usage[domain] = [[round(v, 4) for v in layer.tolist()] for layer in frac]
    finally:
        for h in handles:
            h.remove()
    return usage


@contextmanager
def dropped_experts(model: PreTrainedModel, layer: int, experts: list[int]) -> Iterator[None]:
    """Temporarily remove ``experts`` from ``layer`` by masking their router logits to -inf.

    The router's outputs are recomputed from the masked logits (softmax, top-k,
    renormalisation) exactly as ``MixtralTopKRouter.forward`` does, so the
    dropped experts can never be selected.
    """
    gate = routers(model)[layer]
    drop = torch.tensor(experts)

    def hook(m: torch.nn.Module, _inp: Any, out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        logits = out[0].clone()
        logits[:, drop] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top_v, top_i = torch.topk(probs, m.top_k, dim=-1)
        assert not torch.isin(top_i, drop).any()
        return logits, top_v / top_v.sum(dim=-1, keepdim=True), top_i

    handle = gate.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults reproduce the shipped demo model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "moe_prune" / "demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--aux-coef", type=float, default=0.0)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=224)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--n-docs-per-domain", type=int, default=6000)
    p.add_argument("--heldout-bytes", type=int, default=100_000)
    p.add_argument("--calibration-bytes", type=int, default=200_000)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--n-evals", type=int, default=8, help="held-out evaluations during training")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 is ~10x faster than 2 on a shared 2-core box (oversubscription)",
    )
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps, then exit")
    return p.parse_args(argv)


def time_steps(model: PreTrainedModel, rows: torch.Tensor, args: argparse.Namespace) -> None:
    """Measure seconds per training step to size ``--steps`` for a time budget."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    data = batches(rows, args.batch_size, args.seed)
    for i in range(args.time_steps):
        t = time.perf_counter()
        lm_loss, aux_loss = losses(model, next(data))
        (lm_loss + args.aux_coef * aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {i}: {time.perf_counter() - t:.3f}s", flush=True)


def by_domain(docs: list[Document]) -> dict[str, list[Document]]:
    """Group documents by domain, in canonical domain order."""
    return {dom: [d for d in docs if d["domain"] == dom] for dom in DOMAINS}


@dataclass(frozen=True)
class Prepared:
    """Tokenizer and token tensors derived from the corpus splits."""

    tokenizer: PreTrainedTokenizerFast
    train_rows: torch.Tensor
    heldout_stream: torch.Tensor
    eval_rows: torch.Tensor


def prepare_data(splits: Splits, args: argparse.Namespace) -> Prepared:
    """Train the tokenizer on training docs only and tokenize train/held-out text."""
    tokenizer = train_tokenizer([d["text"] for d in splits.train], args.vocab_size)
    train_rows = chunk(encode_docs(tokenizer, splits.train), args.seq_len)
    heldout_stream = encode_docs(tokenizer, splits.heldout)
    eval_rows = chunk(heldout_stream, args.seq_len)
    print(
        f"vocab {len(tokenizer)}; train tokens {train_rows.numel()}; "
        f"held-out tokens {heldout_stream.numel()} ({eval_rows.shape[0]} rows of {args.seq_len})",
        flush=True,
    )
    return Prepared(tokenizer, train_rows, heldout_stream, eval_rows)


def random_drop_eval(model: PreTrainedModel, eval_rows: torch.Tensor, seed: int, drop_layer: int = 1) -> dict[str, Any]:
    """Perplexity with a random half of the experts removed (reported for ``drop_layer``).

    The same expert subset is also dropped in every other layer, one layer at
    a time, to show how sensitive each layer is.
    """
    n_experts = model.config.num_local_experts
    dropped = sorted(random.Random(seed).sample(range(n_experts), n_experts // 2))
    per_layer = []
    for layer in range(model.config.num_hidden_layers):
        with dropped_experts(model, layer, dropped):
            per_layer.append(round(perplexity(model, eval_rows), 4))
    return {
        "layer": drop_layer,
        "dropped_experts": dropped,
        "method": "router logits of dropped experts set to -inf (top-2 re-chosen among the rest)",
        "perplexity": per_layer[drop_layer],
        "same_experts_dropped_per_layer": per_layer,
    }


def evaluate(model: PreTrainedModel, data: Prepared, splits: Splits, args: argparse.Namespace) -> dict[str, Any]:
    """Held-out perplexity (overall, per domain, unigram baseline), expert usage, random drop."""
    ppl = perplexity(model, data.eval_rows)
    rows_by_domain = {
        dom: chunk(encode_docs(data.tokenizer, ds), args.seq_len) for dom, ds in by_domain(splits.heldout).items()
    }
    drop = random_drop_eval(model, data.eval_rows, args.seed)
    drop["perplexity_increase"] = round(drop["perplexity"] / ppl - 1, 4)
    unigram = unigram_perplexity(data.train_rows, data.eval_rows, len(data.tokenizer))
    print(f"held-out ppl {ppl:.3f} (unigram baseline {unigram:.1f})")
    print(f"layer {drop['layer']} experts {drop['dropped_experts']} dropped: ppl {drop['perplexity']:.3f}")
    print(f"same experts dropped in layer 0..3 instead: {drop['same_experts_dropped_per_layer']}")
    return {
        "heldout_eval": {
            "method": f"non-overlapping {args.seq_len}-token rows over concatenated held-out "
            "docs (each followed by eos), tail dropped; next-token NLL, router aux loss excluded",
            "heldout_tokens_total": data.heldout_stream.numel(),
            "tokens_evaluated": data.eval_rows.numel(),
            "tokens_predicted": data.eval_rows.shape[0] * (args.seq_len - 1),
            "perplexity": round(ppl, 4),
            "unigram_baseline_perplexity": round(unigram, 4),
            "per_domain_perplexity": {dom: round(perplexity(model, r), 4) for dom, r in rows_by_domain.items()},
        },
        "random_expert_drop": drop,
        "expert_usage": {
            "description": "fraction of top-2 selections per expert; [domain][layer][expert], "
            "measured on held-out docs of that domain",
            "router_module": "model.model.layers[i].mlp.gate (MixtralTopKRouter)",
            "experts_module": "model.model.layers[i].mlp.experts (MixtralExperts, fused 3-D weights)",
            "per_domain": expert_usage(model, rows_by_domain),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Generate data, train tokenizer and model, evaluate, save everything."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    total_start = time.perf_counter()

    docs = generate_corpus(args.seed, args.n_docs_per_domain)
    splits = split_corpus(docs, args.heldout_bytes, args.calibration_bytes, args.seed)
    print(
        f"docs: train {len(splits.train)}, calibration {len(splits.calibration)}, held-out {len(splits.heldout)}",
        flush=True,
    )
    data = prepare_data(splits, args)
    model = build_model(len(data.tokenizer), args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_params}", flush=True)
    if args.time_steps:
        time_steps(model, data.train_rows, args)
        return

    log = train(model, data.train_rows, data.eval_rows, args)
    results = evaluate(model, data, splits, args)
    results["heldout_eval"]["history"] = [{k: round(v, 4) for k, v in h.items()} for h in log["eval_history"]]
    report = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": log["tokens_seen"],
        "train_tokens": data.train_rows.numel(),
        "n_parameters": n_params,
        "training_wall_time_s": log["wall_time_s"],
        **results,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    save_outputs(model, data.tokenizer, splits, report, args.out_dir)
    print(f"total wall time {time.perf_counter() - total_start:.0f}s")


def save_outputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    splits: Splits,
    report: dict[str, Any],
    out_dir: Path,
) -> None:
    """Write the checkpoint, tokenizer, data splits and training report."""
    model_dir = out_dir / "model"
    # Router logits were needed for the aux loss during training only; users
    # calling the model with labels should get the plain LM loss by default.
    model.config.output_router_logits = False
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(out_dir / "data" / "calibration.jsonl", splits.calibration)
    write_jsonl(out_dir / "data" / "heldout.jsonl", splits.heldout)
    (model_dir / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "expert_usage"}, indent=2))
    print_usage_table(report["expert_usage"]["per_domain"])


def print_usage_table(usage: dict[str, list[list[float]]]) -> None:
    """Compact per-domain, per-layer expert-usage table (percent of selections)."""
    print("expert usage (% of top-2 selections), experts 0..7")
    for domain, layers in usage.items():
        for i, frac in enumerate(layers):
            cells = " ".join(f"{100 * v:4.0f}" for v in frac)
            print(f"{domain:>10} L{i}: {cells}")


if __name__ == "__main__":
    main()
