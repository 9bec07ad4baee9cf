"""The serving table (moe_prune/checkpoint/serving.py) agrees with vLLM's own model registry.

The table is data, read without vLLM (prune warns from it), so the family -> vLLM class mapping cannot be read
from vLLM at run time; instead this lane test reads vLLM's registry under MOE_PRUNE_VLLM_PYTHON and holds the
table to it: a served family's vLLM architecture is a native vLLM class (transformers' class name unless its row
names another; its MTP class too), a family marked "no model class" has none, one marked "Transformers backend" is
in that list.
The default-run test: every family scripts/serving_table.py lists has a measured status, none "not checked yet".
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_vllm_serving import vllm_python  # noqa: F401  (the lane's fixture: fails when the Python is unset)

from moe_prune.checkpoint.serving import (
    DEFAULT_REASON,
    NO_CLASS,
    NOT_SERVED,
    SERVED,
    TRANSFORMERS_BACKEND,
    served_architecture,
)

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
VLLM_SPELLING = {"PhimoeForCausalLM": "PhiMoEForCausalLM"}  # transformers' class -> vLLM's name, where they differ

# vLLM's registry, split by how it runs an architecture (module "transformers": its Transformers backend).
REGISTRY_CODE = """
import json
from vllm.model_executor.models import registry as r
native = {a: m for a, (m, _) in r._VLLM_MODELS.items() if m != "transformers"}
print(json.dumps({"native": sorted(native), "transformers": sorted(r._TRANSFORMERS_SUPPORTED_MODELS)}))
"""


def table_classes() -> list[str]:
    """The base classes of every family the README's serving table lists."""
    from serving_table import rows

    return [base for _, base, _ in rows()]


def test_every_family_in_the_table_has_a_measured_status():
    unchecked = [base for base in table_classes() if base not in SERVED and base not in NOT_SERVED]
    assert unchecked == [], f"{DEFAULT_REASON}: {unchecked}"


@pytest.mark.vllm
def test_table_agrees_with_vllms_registry(vllm_python):  # noqa: F811
    proc = subprocess.run([vllm_python, "-c", REGISTRY_CODE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    registry = json.loads(proc.stdout.strip().splitlines()[-1])
    native, backend = set(registry["native"]), set(registry["transformers"])
    bases = table_classes()
    assert not [b for b in bases if b in SERVED and served_architecture(b) not in native]
    # the MTP class a served row names for drafting is vLLM's own (the plugin subclasses it)
    assert not [s.mtp for s in SERVED.values() if s.mtp and s.mtp not in native]
    assert not [b for b in bases if NOT_SERVED.get(b) == NO_CLASS and (b in native or b in backend)]
    assert not [b for b in bases if NOT_SERVED.get(b) == TRANSFORMERS_BACKEND and b not in backend]
    # the rest of NOT_SERVED: vLLM has the class, and the reason is what serving it measured
    measured = [b for b in bases if NOT_SERVED.get(b) not in (None, NO_CLASS, TRANSFORMERS_BACKEND)]
    assert not [b for b in measured if VLLM_SPELLING.get(b, b) not in native]
