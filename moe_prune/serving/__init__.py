"""Serving moe-prune's checkpoints in inference engines. Nothing here is imported by the CLI: the engine
(e.g. vLLM, through its plugin entry point) imports the module it needs."""
