"""The exceptions the library raises for failures a user can act on.

The CLI turns any of them into one `error:` line and a non-zero exit. The subclasses are for
callers that must tell cases apart; each is still a TransferError.
"""


class TransferError(Exception):
    """A failure the user can act on: says what was expected and what was found."""


class SettingError(TransferError, ValueError):
    """A setting or argument outside what is allowed (C <= 0, an unknown backbone, --top-k 0, ...)."""


class InputFileError(TransferError):
    """An input file or folder that is missing, of the wrong kind, or damaged."""


class IncompleteCacheError(InputFileError):
    """A feature cache whose extraction has not finished (or is still running); the message says
    which command resumes it."""


class IncompatibleCachesError(TransferError):
    """Caches that cannot be compared or combined: other images, labels, classes or splits."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM, which the CLI turns into one) during a stage; the message says what was
    kept and how to go on. Still a KeyboardInterrupt, so code that catches those keeps working."""
