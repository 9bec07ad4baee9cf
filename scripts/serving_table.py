"""Print the README's vLLM serving table (markdown) from the plugin's data (moe_prune/checkpoint/serving.py).

One row per MoE family moe-prune edits (a table row or a derived adapter of the installed transformers): the
class a ragged checkpoint of it names, and whether moe-prune's vLLM plugin serves it, or why not. Uniform
outputs are stock checkpoints: vLLM serves them with its own class wherever it has one.
Run: python scripts/serving_table.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def status(base_class: str) -> str:
    """The serving column of one family."""
    from moe_prune.checkpoint.serving import SERVED, served_architecture, unserved_reason

    served = SERVED.get(base_class)
    if served is None:
        return f"not served: {unserved_reason(base_class, {})}"
    extra = [f"every layer needs {served.min_experts} experts"] if served.min_experts > 1 else []
    extra += [served.note] if served.note else []
    dense = (
        ""
        if served.mtp_moe
        else "; its MTP layer is dense there: a ragged result whose MTP layer holds experts is refused"
    )
    extra += [f"keeps its MTP layers (speculative decoding: vLLM `{served.mtp}`{dense})"] if served.mtp else []
    return f"**served** (vLLM `{served_architecture(base_class)}`)" + "".join(f"; {e}" for e in extra)


def rows() -> list[tuple[str, str, str]]:
    """(model_type, base class, status) of every family moe-prune supports, served ones first."""
    from moe_prune.architectures import find_adapter
    from moe_prune.architectures.derive_models import moe_causal_lm_types
    from moe_prune.checkpoint.ragged import causal_lm_class
    from moe_prune.checkpoint.serving import SERVED

    found = []
    for model_type in moe_causal_lm_types():
        if find_adapter(model_type) is None:
            continue
        base = causal_lm_class(model_type)
        found.append((model_type, base, status(base)))
    return sorted(found, key=lambda row: (row[1] not in SERVED, row[0]))


def main() -> None:
    from moe_prune.checkpoint.serving import SERVED

    table = rows()
    served = sum(1 for _, base, _ in table if base in SERVED)
    print(f"{served} of {len(table)} families moe-prune edits serve ragged in vLLM through its plugin.\n")
    print("| model_type | ragged architecture | vLLM (moe-prune plugin) |")
    print("|---|---|---|")
    for model_type, base, text in table:
        print(f"| {model_type} | `MoePruneRagged{base}` | {text} |")


if __name__ == "__main__":
    main()
