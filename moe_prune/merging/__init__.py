"""Expert merging (UNCURL, HC-SMoE and baselines): cluster experts per layer, align them, average them.

similarity: router-logit similarity; clustering: spectral and hierarchical clustering and clusters;
registry: the merge methods (one function each), the statistics they read and the `--weights` rules;
alignment: permutation alignment of intermediate neurons; averaging: weighted means; refit: output
merging, least-squares down projections (`--refit`); tensors: one MoE layer's merged tensors, computed
on demand; planning: per-layer counts and clusters.
"""
