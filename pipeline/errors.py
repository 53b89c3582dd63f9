"""The one exception type the CLI turns into a single line and a non-zero exit."""


class TransferError(Exception):
    """A failure the user can act on: says what was expected and what was found."""
