"""Low-level input/output every layer may use: atomic outputs and locks, quiet offline-aware hub requests.

It imports nothing of moe-prune but `errors`, so artifacts, checkpoints, plots and stages all write
through the same safe writer without importing upward.
"""
