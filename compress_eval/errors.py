"""The exception for problems the user can fix (bad input, a full disk), so the CLI prints one line
instead of a traceback."""

from __future__ import annotations

import contextlib
import errno

# A full disk, or a full quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """A problem the user can fix: the message names the problem and the fix."""


class NoSpaceError(UserError):
    """A write that ran out of disk space (or quota)."""


@contextlib.contextmanager
def no_space_is_one_line(what: str, kept: str):
    """A write that runs out of disk space inside the block ends in one line naming ``what`` was being
    written and what was ``kept`` (the writer has put the previous state back before the error gets
    here). Nested, the outermost writer names it: a manifest is written as part of its checkpoint."""
    try:
        yield
    except (OSError, NoSpaceError) as exc:
        if isinstance(exc, OSError) and exc.errno not in NO_SPACE:
            raise
        raise NoSpaceError(f"no space left on the device (or in the quota) while writing {what}: {kept}; free "
                           f"some space, or write elsewhere, and run again") from None
