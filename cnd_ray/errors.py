"""The one exception type the CLI turns into a one-line message and exit code 2 (house rule 10)."""


class UserError(ValueError):
    """A user's mistake: the message names the key, file or value and what to do."""
