"""Progress bars with an ETA, on stderr, for the steps that can take more than a few seconds.

The CLI's ``--quiet`` turns them off (``enabled``). Off a terminal (a log file, a batch job's output)
a bar appears only once its step has run ``NON_TTY_INTERVAL`` seconds and is redrawn at that
interval: short steps leave nothing there, long ones a line now and then rather than a flood.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

enabled = True  # False: no bars (the CLI's --quiet)
NON_TTY_INTERVAL = 10.0  # seconds


class Bar(tqdm):
    """tqdm, except that a message written above the bars (``tqdm.write``, as the CLI's log handler does)
    neither draws nor clears a bar still within its delay: a short step stays unseen."""

    def _due(self) -> bool:  # no start_t yet: tqdm's first draw, of a bar without delay
        return self.disable or not hasattr(self, "start_t") or self._time() >= self.start_t + self.delay

    def clear(self, nolock=False):
        if self._due():
            super().clear(nolock)

    def refresh(self, nolock=False, lock_args=None):
        if self._due():
            super().refresh(nolock, lock_args)


def bar(iterable=None, desc: str = "", total: float | None = None, *, leave: bool = True,
        disable: bool = False, **kwargs) -> Bar:
    """A tqdm bar on the current stderr (looked up now: the CLI's test runner swaps it). Nested bars
    (a step inside an outer loop that has its own bar) pass ``leave=False``."""
    stream = sys.stderr
    tty = stream.isatty()
    interval = 0.1 if tty else NON_TTY_INTERVAL
    # Off a terminal a nested bar could only move the cursor up (escape codes in a log): the outer one shows.
    nested = not tty and any(not b.disable for b in list(Bar._instances))
    return Bar(iterable, desc=desc, total=total, leave=leave, file=stream,
               disable=disable or not enabled or nested, mininterval=interval, delay=0 if tty else interval,
               dynamic_ncols=True, **kwargs)
