"""The one user-facing exception type: the CLI prints its message as one line and exits 1."""


class MoePruneError(Exception):
    """A problem with the user's input (file, model, mask, option), not a bug in moe-prune."""


class MoePruneWarning(UserWarning):
    """Something the user should know that does not stop the command (the CLI prints it as one line)."""
