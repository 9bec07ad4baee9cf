"""moe-prune: make Mixture-of-Experts language models smaller by dropping or merging whole experts."""

__version__ = "0.1.0"
