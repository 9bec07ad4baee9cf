"""Hostile inputs, round 3 (registered with @hostile): what a new user or an attacker tries next.

- config.json fields that transformers' own config class refuses (a string for a bool, an int epsilon, a
  list for rope parameters, a quantization_config that is no object, a dtype torch lacks): refused in one
  line naming config.json by every command that reads the model (`config_checks.check_transformers_reads`),
  not as a tokenizer failure in the loaders, nor copied by prune/merge/score into an output transformers
  cannot load (dtype is outside the mask's config fingerprint, so prune accepted it).
- tokenizer_config.json fields transformers takes as given and trips over later: model_max_length a string
  ("unexpected TypeError ... a bug in moe-prune" at the first text tokenized) or below 1, a chat template
  that is no text (`runtime.loading.load_tokenizer`).
- `--seed` out of what numpy, torch and accelerate take (negative, past 2**63): an unexpected ValueError
  deep in the run; every --seed is bounded where the option is declared (`cli.common.MAX_SEED`).
"""

from __future__ import annotations

import json

from hostile import LOADERS, MODEL_READERS, Workspace, _nothing, hostile

CONFIG_FIELDS = {
    "bool-a-string": ("tie_word_embeddings", "yes"),
    "epsilon-an-int": ("rms_norm_eps", -1),
    "rope-parameters-a-list": ("rope_parameters", [1, 2]),
    "quantization-config-a-string": ("quantization_config", "fp8"),
    "dtype-torch-lacks": ("dtype", "float7"),
}


def _config_field(field: str, value: object):
    def build(ws: Workspace) -> None:
        config = ws.config()
        config[field] = value
        ws.write_config(config)

    return build


for _name, (_field, _value) in CONFIG_FIELDS.items():
    hostile(f"config-{_name}", MODEL_READERS, "config.json")(_config_field(_field, _value))


TOKENIZER_FIELDS = {
    "model-max-length-a-string": ("model_max_length", "big"),
    "model-max-length-negative": ("model_max_length", -1),
    "chat-template-a-number": ("chat_template", 5),
    "chat-template-names-a-number": ("chat_template", [{"name": "default", "template": 5}]),
}


def _tokenizer_field(field: str, value: object):
    def build(ws: Workspace) -> None:
        path = ws.model / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config[field] = value
        path.write_text(json.dumps(config))

    return build


for _name, (_field, _value) in TOKENIZER_FIELDS.items():
    hostile(f"tokenizer-{_name}", LOADERS, "tokenizer_config.json")(_tokenizer_field(_field, _value))


SEEDED = ("profile", "sequential", "score", "score-weights", "merge", "finetune", "sweep", "lottery", "allocate")
for _name, _seed in (("negative", "-1"), ("past-int64", str(2**64))):
    hostile(f"seed-{_name}", SEEDED, "--seed", extra=("--seed", _seed))(_nothing)
