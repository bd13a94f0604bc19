"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class AutojudgeError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
