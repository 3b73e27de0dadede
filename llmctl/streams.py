"""The standard streams of a command: closed descriptors (`2>&-`) reopened on /dev/null, and a stderr that a
closed or vanished reader can't break (a training run goes on when its log reader goes away)."""

from __future__ import annotations

import os
import sys


class QuietStderr:
    """sys.stderr that a closed or vanished reader can't break: the first failed write sends fd 2 to /dev/null
    and the run goes on (`llmctl pretrain ... 2>&1 >/dev/null | head -1` trains to the end)."""

    def __init__(self, stream):
        self._stream = stream
        self._dead = False

    def _died(self):
        self._dead = True
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self._stream.fileno())
            os.close(fd)
        except (OSError, ValueError):
            pass

    def write(self, text):
        if not self._dead:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._died()
        return len(text)

    def flush(self):
        if not self._dead:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._died()

    def isatty(self):
        return not self._dead and self._stream.isatty()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def standard_streams() -> None:
    """Closed standard descriptors (`2>&-`) become /dev/null, so that no file llmctl opens later takes fd 0-2 and
    gets written by a stray print; stderr is wrapped in QuietStderr."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            try:
                new = os.open(os.devnull, os.O_RDWR)
                if new != fd:
                    os.dup2(new, fd)
                    os.close(new)
            except OSError:
                pass
    if sys.stdin is None:
        sys.stdin = open(0, "r", closefd=False)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False)
    if not isinstance(sys.stderr, QuietStderr):
        sys.stderr = QuietStderr(sys.stderr)
