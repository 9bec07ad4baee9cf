"""`python -m moe_prune` runs the CLI (also under `accelerate launch -m moe_prune`)."""

from moe_prune.cli import main

main()
