"""The one error type a user sees: a message naming the file or key and the fix."""


class VlddError(Exception):
    """Bad input or configuration. The CLI prints the message and exits with status 2."""
