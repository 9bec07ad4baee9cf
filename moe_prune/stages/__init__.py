"""Pipeline stages, one module each; every stage is a plain function the CLI and tests call."""
