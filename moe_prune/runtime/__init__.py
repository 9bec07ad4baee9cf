"""Code that runs a loaded model: text data, model/tokenizer loading and routing hooks.

Shared by the stages that need forward passes (`eval` now, `profile` later); the checkpoint
stages (`prune`) never import it, so they stay free of model loading.
"""
