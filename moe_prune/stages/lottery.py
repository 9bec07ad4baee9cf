"""`lottery`: MoE lottery subnetworks (MC-Suite section 3, figure 3) from the real stages, round by round.

Each round runs, on the current model, `profile` -> `score` (drop this round's share of the ORIGINAL
experts per layer, `lottery.schedule`) -> `prune` -> `finetune` (token budget doubling each round, a
fresh optimizer each time: every round is its own `finetune.run`), then `eval` on held-out text.
Without finetuning it is iterative pruning; one round without finetuning is one-shot pruning.

Layout of DIR (each file written atomically, so a half-written round is visible as a missing file):
    recipe.json                      every parameter and input fingerprint (`lottery.recipe`)
    round-NN/stats.npz               profile of the round's input (criteria that read statistics)
    round-NN/mask.json               the round's drops, in original expert ids
    round-NN/pruned/  finetuned/     checkpoints (finetuned/ only with finetuning)
    round-NN/round.json              written last: the round is finished
    report.json                      written last: the run is finished
With `compare`, one-shot, iterative and lottery runs live in DIR/one-shot, DIR/iterative, DIR/lottery, and
the control that decides between them in DIR/one-shot-finetuned: one-shot's mask, then ONE finetune of as
many tokens as the lottery's rounds trained together (read from their checkpoints, so the budgets are equal).
A rerun with the same recipe resumes: finished rounds are read back, an unfinished round reuses the
artifacts it already wrote and makes the rest. DIR is locked while a run uses it (`.DIR.lock` beside it).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_prune.artifacts.common import first_difference
from moe_prune.artifacts.provenance import data_fingerprint, model_fingerprint
from moe_prune.checkpoint.source import Checkpoint
from moe_prune.errors import MoePruneError
from moe_prune.io.output import check_not_input, work_lock
from moe_prune.lottery import agreement
from moe_prune.lottery.agreement import PAIRS as PAIRS
from moe_prune.lottery.agreement import plot as agreement_plot
from moe_prune.lottery.recipe import (
    RECIPE_NAME,
    Recipe,
    local_path,
)
from moe_prune.lottery.recipe import LotteryParams as LotteryParams
from moe_prune.lottery.results import LotteryResult, MethodResult
from moe_prune.lottery.schedule import drop_schedule, token_schedule
from moe_prune.runtime.data import load_documents
from moe_prune.runtime.data_plan import parse_data, refuse_prefixed
from moe_prune.runtime.shares import SourceSpec
from moe_prune.runtime.skeleton import code_decision
from moe_prune.scoring import get_criterion
from moe_prune.stages import evaluate as evaluate  # the round stages, as tests patch them (`lottery.finetune.run`)
from moe_prune.stages import finetune as finetune
from moe_prune.stages import profile as profile
from moe_prune.stages import prune as prune
from moe_prune.stages import score as score
from moe_prune.stages.lottery_round import (
    VERSION,
    Method,
    ProgressFn,
    _finetune_fields,
    _perplexity,
    _run_method,
    _write_json,
)
from moe_prune.training.options import FinetuneOptions

REPORT_SCHEMA = "moe-prune/lottery-report"
REPORT_NAME = "report.json"
STEPS = ("profile", "score", "prune", "finetune", "eval")
EQUAL_BUDGET = "one-shot-finetuned"  # one-shot + one finetune of the lottery's total trained tokens


def plan(params: LotteryParams) -> tuple[Recipe, list[Method], Checkpoint]:
    """Validate everything that needs no compute and fix the schedule; nothing is written."""
    recipe, methods, ckpt, _ = _plan(params)
    return recipe, methods, ckpt


def _plan(params: LotteryParams) -> tuple[Recipe, list[Method], Checkpoint, tuple[SourceSpec, ...]]:
    """`plan`, and `--data` parsed once (every round's profile and finetune reads these `SourceSpec`s)."""
    params.check()
    get_criterion(params.criterion)  # unknown names fail here, with "did you mean"
    specs = tuple(s.relocated(local_path(s.source)) for s in parse_data(_data(params)))
    data = specs[0].given if len(specs) == 1 else [s.given for s in specs]
    params = replace(params, model=local_path(params.model), data=data, eval_data=local_path(params.eval_data))
    ckpt = Checkpoint.open(params.model)
    code_decision(ckpt, trust_remote_code=False)  # every stage loads without remote code: refuse it up front
    config = ckpt.config
    counts = set(config.experts_per_layer.values())
    if len(counts) != 1:
        raise MoePruneError(
            f"{params.model}: MoE layers hold different expert counts {sorted(counts)}; lottery needs one"
        )
    drops = drop_schedule(counts.pop(), config.top_k, params.target_ratio, params.rounds)
    tokens = token_schedule(params.tokens_first, len(drops)) if params.finetune else [0] * len(drops)
    FinetuneOptions(**_finetune_fields(params, tokens[0] or 1)).check()
    refuse_prefixed(specs, "lottery")
    for source in (*(s.source for s in specs), *((params.eval_data,) if params.eval_tokens else ())):
        # a missing or unreadable file is reported before any round
        load_documents(source, params.text_field, max_chars=1, split_on=params.split_on)
    methods = [Method("lottery" if params.finetune else "iterative", drops, tokens)]
    if params.compare:
        total = sum(drops)
        methods = [
            Method("one-shot", [total], [0]),
            Method("iterative", drops, [0] * len(drops)),
            methods[0],
            Method(EQUAL_BUDGET, [total], [sum(tokens)]),  # run after the lottery: its trained tokens, see `run`
        ]
    inputs = {
        "model": model_fingerprint(ckpt),
        "data": _fingerprints(specs),
        "eval_data": data_fingerprint(params.eval_data) if params.eval_tokens else None,
    }
    schedule = {
        "drops_per_round": drops,
        "tokens_per_round": tokens,
        "finetune_seeds": [params.seed + r for r in range(len(drops))] if params.finetune else [],
        "profile_seed": params.seed,
        "methods": [m.name for m in methods],
    }
    return Recipe(params, inputs, schedule), methods, ckpt, specs


def run(
    params: LotteryParams,
    out: str | Path,
    force: bool = False,
    progress: ProgressFn | None = None,
    expected: Recipe | None = None,
) -> LotteryResult:
    """Run (or resume) the lottery into `out`; `expected` is a recipe being reproduced (its inputs must match)."""
    out = Path(out).expanduser().absolute()
    recipe, methods, ckpt, specs = _plan(params)
    if expected is not None:
        diff = first_difference(expected.inputs, recipe.inputs)
        if diff:
            raise MoePruneError(f"the recipe's inputs have changed since it was written: {diff}")
    _protect_inputs(out, recipe.params, specs)
    warnings = []
    if expected is not None and expected.tool_version != recipe.tool_version:
        warnings.append(f"the recipe was written by moe-prune {expected.tool_version}; this is {recipe.tool_version}")
    with work_lock(out):  # a second run into DIR is refused before it reads or writes anything there
        fresh = force or not out.exists()
        try:
            resumed = _prepare(out, recipe, force)
            return _run(recipe, methods, ckpt, specs, out, resumed, warnings, progress)
        except BaseException:
            if fresh and out.is_dir() and all(p.is_dir() or p.name == RECIPE_NAME for p in out.rglob("*")):
                _remove(out)  # a fresh run that wrote nothing but its recipe leaves nothing behind (nothing to resume)
            raise


def _run(
    recipe: Recipe,
    methods: list[Method],
    ckpt: Checkpoint,
    specs: tuple[SourceSpec, ...],
    out: Path,
    resumed: bool,
    warnings: list[str],
    progress: ProgressFn | None,
) -> LotteryResult:
    report = progress or (lambda method, r, total, step: None)
    params = recipe.params
    experts = {layer: list(ids) for layer, ids in ckpt.identity.original_ids.items()}
    baseline = _perplexity(params, ckpt.folder) if params.eval_tokens else None
    results: dict[str, MethodResult] = {}
    first_round: Path | None = None  # every method's round 1 profiles the same original model: done once
    for method in methods:
        folder = out / method.name if params.compare else out
        if method.name == EQUAL_BUDGET:  # exactly the tokens the lottery trained (its budgets round down to steps)
            method = replace(method, tokens=[results["lottery"].trained])
        results[method.name] = _run_method(
            params, specs, recipe.digest(), method, folder, ckpt.folder, report, first_round
        )
        first_round = first_round or folder / "round-01"
    dropped = {name: m.dropped for name, m in results.items()}
    result = LotteryResult(
        out, recipe.to_dict(), experts, baseline, results, agreement.all_pairs(dropped, experts), resumed, warnings
    )
    _write_json(out / REPORT_NAME, {"schema": REPORT_SCHEMA, "version": VERSION, **result.to_dict()})
    return result


def _prepare(out: Path, recipe: Recipe, force: bool) -> bool:
    """Start a fresh run in `out`, or find the same unfinished run there to resume (True)."""
    if out.exists() and not out.is_dir():
        raise MoePruneError(f"{out}: exists and is not a folder")
    if out.exists() and force:
        _remove(out)
    if not out.exists():
        out.mkdir(parents=True)
        recipe.write(out / RECIPE_NAME)
        return False
    if not (out / RECIPE_NAME).exists():
        raise MoePruneError(f"{out}: already exists and holds no lottery run; pass --force to replace it")
    saved = Recipe.read(out / RECIPE_NAME)
    diff = first_difference(saved.fingerprint(), recipe.fingerprint())
    if diff:
        raise MoePruneError(
            f"{out}: holds a lottery run with other settings ({diff}); "
            "pass --force to replace it or choose another --out"
        )
    if (out / REPORT_NAME).exists():
        raise MoePruneError(f"{out}: already holds this finished lottery run; pass --force to run it again")
    return True


def _data(params: LotteryParams) -> list[str]:
    return [params.data] if isinstance(params.data, str) else list(params.data)


def _fingerprints(specs: tuple[SourceSpec, ...]) -> dict[str, Any] | list[dict[str, Any]]:
    """One source: its fingerprint (as recipes always had); a mix: each source's, with its share as given."""
    prints = [{**data_fingerprint(s.source), **({"spec": s.given} if s.suffix else {})} for s in specs]
    return prints[0] if len(prints) == 1 else prints


def _protect_inputs(out: Path, params: LotteryParams, specs: tuple[SourceSpec, ...]) -> None:
    """Inputs are never modified: refuse a DIR that is, holds or lies inside the model or the data, before
    anything is written (the recipe, a round's statistics and mask would land inside the input)."""
    data = [spec.source for spec in specs]
    check_not_input(out, (params.model, *data, params.eval_data))


def _remove(out: Path) -> None:
    """Move the old run aside in one rename, then delete it."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    shutil.rmtree(old)


__all__ = ["PAIRS", "LotteryParams", "LotteryResult", "Recipe", "agreement_plot", "run"]
