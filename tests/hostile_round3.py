"""Hostile inputs, round 3 (registered with @hostile): what a new user or an attacker tries next.

- config.json fields that transformers' own config class refuses (a string for a bool, an int epsilon, a
  list for rope parameters, a quantization_config that is no object, a dtype torch lacks): refused in one
  line naming config.json by every command that reads the model (`architectures.config.check_transformers_reads`),
  not as a tokenizer failure in the loaders, nor copied by prune/merge/score into an output transformers
  cannot load (dtype is outside the mask's config fingerprint, so prune accepted it).
"""

from __future__ import annotations

from hostile import MODEL_READERS, Workspace, hostile

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
