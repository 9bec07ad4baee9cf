"""Expert merging (UNCURL, HC-SMoE and baselines): cluster experts per layer, align them, average them.

similarity: router-logit similarity; clustering: spectral and hierarchical clustering and clusters;
registry: the merge methods (one function each), the statistics they read and the `--weights` rules;
alignment: permutation alignment of intermediate neurons; averaging: weighted means; refit: output
merging, least-squares down projections (`--refit`); layer_plan: what becomes of one MoE layer (prune's
plan too: one-expert clusters); tensors: the output tensors of a prune or merge, byte selections or
computed; layer_experts: one layer's merged experts, computed on demand; planning: per-layer counts and
clusters.
"""
