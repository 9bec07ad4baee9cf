"""Expert merging (UNCURL and baselines): cluster experts per layer, align them, average them.

similarity: router-logit similarity; clustering: spectral clustering and clusters; registry: the
merge methods (one function each); alignment: permutation alignment of intermediate neurons;
averaging: frequency-weighted means; layer: one MoE layer's merged tensors, computed on demand.
"""
