"""The benchmark's progress display on stderr (the report itself goes to stdout)."""

from __future__ import annotations

import sys


class Progress:
    """One ``\\r`` status line on stderr (a line per phase when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.tty:
            return
        pad = max(0, self._width - len(text))
        sys.stderr.write("\r" + text + " " * pad)
        sys.stderr.flush()
        self._width = len(text)

    def done(self, text: str) -> None:
        if self.tty:
            self.update(text)
            sys.stderr.write("\n")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self._width = 0


def bar(done: int, total: int, width: int = 24) -> str:
    """``[#####.....]``: ``done`` out of ``total``."""
    filled = width * done // total if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"
