"""The one exception type for user mistakes, turned into a one-line message at the CLI."""


class UserError(Exception):
    """A mistake in the user's input (config, path, checkpoint); the message says what to change."""
