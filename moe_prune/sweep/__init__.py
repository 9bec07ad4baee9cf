"""Pieces of `moe-prune sweep` (run by stages/sweep.py): combinations, work folder, summary, plot."""
