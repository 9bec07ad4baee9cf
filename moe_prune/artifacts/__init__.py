"""Artifacts passed between stages, each defined once with a schema version and validated on read."""
