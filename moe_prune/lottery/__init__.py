"""MoE lottery subnetworks (MC-Suite section 3): k rounds of profile -> score -> prune -> finetune.

`schedule` decides how many experts each round drops and how many tokens it trains on, `recipe` holds
every parameter of a run (the file that reproduces it and the fingerprint a resumed run must match),
`agreement` compares which original experts different methods dropped (the paper's figure 5).
The rounds themselves run in `moe_prune.stages.lottery`.
"""
