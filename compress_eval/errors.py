"""One exception type for bad input, so the CLI can print one line instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""
