"""Print the README's architecture list (markdown) from what moe-prune derives.

Every MoE causal LM of the installed transformers (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES types whose
modeling file defines an `*Experts` module): a table row, a derived adapter, or the reason there is none.
Run: python scripts/architectures_table.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def describe(model_type: str, unsupported: dict[str, str]) -> tuple[str, str]:
    """(how it is supported, detail) for one model type."""
    from moe_prune.architectures import ADAPTERS, derived_adapter
    from moe_prune.architectures.derive_models import DerivationError, text_model_type

    try:
        text = text_model_type(model_type)
    except DerivationError:
        text = model_type
    if text != model_type:
        untested = f"; not tested: {unsupported[model_type]}" if model_type in unsupported else ""
        return "wrapper", f"its `text_config` ({text}) is what moe-prune edits{untested}"
    if model_type in ADAPTERS:
        return "table", _summary(ADAPTERS[model_type])
    if model_type in unsupported:
        return "unsupported", unsupported[model_type]
    found = derived_adapter(model_type)
    if isinstance(found, str):
        return "unsupported", found
    return "derived", _summary(found)


def _summary(adapter) -> str:
    r = adapter.routing
    renorm = r.renormalize if isinstance(r.renormalize, str) else ("renorm" if r.renormalize else "no renorm")
    routing = f"{r.score}, select on {r.select_on}, {renorm}" + (", grouped" if r.grouped else "")
    tail = f" + `{adapter.router_tail}` rows after the experts'" if adapter.router_tail else ""
    return f"`{adapter.expert_count_keys[0]}` / `{adapter.top_k_keys[0]}`; `{adapter.router}`{tail}; {routing}"


def known_failures(model_type: str, failures: dict[tuple[str, str], str]) -> str:
    """The checks a supported family does not pass yet (tests/test_derived.py KNOWN_FAILURES), for its row."""
    found = [f"not yet: {check} ({reason})" for (check, t), reason in sorted(failures.items()) if t == model_type]
    return "".join(f"; {line}" for line in found)


def main() -> None:
    from test_derived import KNOWN_FAILURES, UNSUPPORTED

    from moe_prune.architectures.derive_models import moe_causal_lm_types

    rows = [(t, *describe(t, UNSUPPORTED)) for t in moe_causal_lm_types()]
    rows = [(t, kind, detail + known_failures(t, KNOWN_FAILURES)) for t, kind, detail in rows]
    counts = {kind: sum(1 for _, k, _ in rows if k == kind) for kind in ("table", "derived", "wrapper", "unsupported")}
    print(
        f"{len(rows)} MoE causal-LM model types in transformers: {counts['table']} from the table, "
        f"{counts['derived']} derived, {counts['wrapper']} wrappers of a text model, "
        f"{counts['unsupported']} unsupported.\n"
    )
    print("| model_type | support | expert count / top-k; router (on disk); routing — or why not |")
    print("|---|---|---|")
    for model_type, kind, detail in rows:
        print(f"| {model_type} | {kind} | {detail} |")


if __name__ == "__main__":
    main()
