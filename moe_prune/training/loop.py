"""The optimizer steps of `finetune`: top-k schedule, learning rate, micro-batches, freezing, clipping.

Kept apart from the stage (which plans, loads, measures and saves) so the loop reads as the algorithm:
every step sets k and the learning rate from the step number alone, accumulates the next-token loss
(+ entropy penalty, + the family's load-balancing loss) over `grad_accum` micro-batches, drops the
gradients of what must not train yet (router warm-up), clips and steps.

The next-token loss of a step is the mean over every loss-carrying token of the step (all micro-batches,
all processes), not a mean of per-batch means: prompt/response batches hold different numbers of response
tokens. Each process knows that count without talking (batches follow from the step, every process holds
all rows), backpropagates its summed NLL / count × processes, and the wrapper's gradient average over
processes (DDP, FSDP, DeepSpeed) turns that into the gradient of the step's mean. The penalties stay
means per micro-batch, averaged over the micro-batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from moe_prune.architectures.config import ModelConfig
from moe_prune.errors import MoePruneError
from moe_prune.training.batches import BatchPlan, Sequences
from moe_prune.training.losses import RouterEntropy, token_cross_entropy
from moe_prune.training.options import FinetuneOptions
from moe_prune.training.schedule import lr_at, warmup_steps
from moe_prune.training.topk import set_top_k, top_k_at

# on_step(steps_done, mean_loss, seconds_since_start): progress and periodic state saving.
StepCallback = Callable[[int, float, float], None]


@dataclass
class TrainingLoop:
    """One run's model, optimizer, data and what trains when."""

    accelerator: Any
    wrapped: Any  # the accelerate-prepared model (forward/backward go through it)
    inner: Any  # the unwrapped model (parameters, hooks, top-k attributes)
    config: ModelConfig
    optimizer: torch.optim.Optimizer
    data: Sequences
    batches: BatchPlan
    options: FinetuneOptions
    steps: int
    top_k: tuple[int, int]  # (first, last) experts per token; annealed linearly in between
    trainable: list[str]  # every parameter the optimizer holds
    routers: set[str]  # the router parameters (alone during warm-up)
    selected: set[str]  # what `--train` asked for (after warm-up)

    def run(self, start_step: int, on_step: StepCallback) -> tuple[list[float], int, int]:
        """Steps `start_step`..`steps`; returns each step's mean loss, the final top-k and the tokens that
        carried loss."""
        options, accelerator = self.options, self.accelerator
        params = dict(self.inner.named_parameters())
        clipped = [params[n] for n in self.trainable]
        warmup = warmup_steps(self.steps, options.warmup_ratio)
        losses: list[float] = []
        loss_tokens = 0
        current_k = self.config.top_k
        started = time.perf_counter()
        self.wrapped.train()
        with ExitStack() as stack:
            entropy = (
                stack.enter_context(RouterEntropy(self.inner, self.config)) if options.entropy_weight > 0 else None
            )
            for step in range(start_step, self.steps):
                k = top_k_at(step, self.steps, *self.top_k)
                if k != current_k:
                    set_top_k(self.inner, self.config, k)
                    current_k = k
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_at(step, self.steps, warmup, options.lr)
                count = self.data.loss_tokens(self.batches.step_indices(step))
                loss_tokens += count
                step_loss = sum(self._micro_batch(step, micro, count, entropy) for micro in range(options.grad_accum))
                frozen = set(self.trainable) - (self.routers if step < options.router_warmup_steps else self.selected)
                for name in frozen:
                    params[name].grad = None
                if options.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(clipped, options.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                mean_loss = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum"))
                losses.append(mean_loss)
                on_step(step + 1, mean_loss, time.perf_counter() - started)
        return losses, current_k, loss_tokens

    def _micro_batch(self, step: int, micro: int, step_tokens: int, entropy: RouterEntropy | None) -> float:
        """Forward and backward of one micro-batch; its share of the step's next-token loss (see the module
        docstring: `step_tokens` is the step's count of loss-carrying tokens over all processes)."""
        options, accelerator = self.options, self.accelerator
        ids, targets, mask = self.data.batch(self.batches.indices(step, micro, accelerator.process_index))
        ids, targets = ids.to(accelerator.device), targets.to(accelerator.device)
        last = micro == options.grad_accum - 1
        want_aux = options.aux_loss_weight > 0
        kwargs: dict[str, Any] = {"output_router_logits": True} if want_aux else {}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(accelerator.device)  # the family's aux loss skips padding
        with nullcontext() if last else accelerator.no_sync(self.wrapped):
            if entropy is not None:
                entropy.mask = None if mask is None else mask.reshape(-1).bool()
            with accelerator.autocast():
                outputs = self.wrapped(input_ids=ids, use_cache=False, **kwargs)
            nll = token_cross_entropy(outputs.logits, targets, reduction="sum")
            loss = nll * (accelerator.num_processes / step_tokens)
            penalty = torch.zeros((), device=loss.device)
            if entropy is not None:
                penalty = penalty + options.entropy_weight * entropy.mean()
                entropy.clear()
            if want_aux:
                if getattr(outputs, "aux_loss", None) is None:
                    raise MoePruneError(f"{self.config.model_type}: the model computes no load-balancing loss")
                penalty = penalty + options.aux_loss_weight * outputs.aux_loss
            accelerator.backward(loss + penalty / options.grad_accum)
        return float(nll.detach()) / step_tokens
