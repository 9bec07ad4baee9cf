"""Pieces of `finetune`: which parameters train, top-k at runtime, router losses, batches, resumable state.

Everything here works on a loaded transformers model through the adapter's runtime module paths,
so no family is special-cased; `stages.finetune` wires the pieces into one training loop.
"""
