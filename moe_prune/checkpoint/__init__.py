"""Checkpoint I/O and surgery on safetensors shards, tensor by tensor, without loading the model."""
