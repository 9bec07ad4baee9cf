"""`allocate`: search how many experts each MoE layer keeps under one budget (EvoESAP-style).

objective  teacher-forced agreement of a candidate with the original (ESAP, KL), from stored references
masking    candidates on one loaded model: dropped experts' router logits set to -inf
search     starts (uniform, global) and a seeded exchange search of per-layer counts under the budget
"""
