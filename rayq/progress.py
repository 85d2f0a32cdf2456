"""A one-line progress display: completions done / total, rate, ETA, and what the hosts do.

Printed to stderr at most every few seconds (in place on a terminal, as plain lines in a
log), so it stays readable while Ray and transformers are kept quiet. The scheduler's
`note` (hosts by phase, the first host that waits and for what) rides on the same line, and
`tick` prints it even while no completion is written, so a wait is never silent.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(self, total: int, done_before: int = 0, stream: TextIO | None = None, every_s: float = 2.0) -> None:
        self.total = total
        self.done_before = done_before
        self.written = 0
        self._stream = stream
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else max(every_s, 10.0)
        self.start = time.monotonic()
        self._last = 0.0
        self.note = ""
        self._width = 0

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __getstate__(self) -> dict[str, object]:
        # Tune pickles its callbacks (and so this) into its experiment state; a stream cannot be.
        return {**self.__dict__, "_stream": None}

    @property
    def done(self) -> int:
        return self.done_before + self.written

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.written / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = fmt_duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = f"rayq: {self.done}/{self.total} completions ({pct:.1f}%) | {rate:.2f}/s | ETA {eta}"
        return f"{line} | {self.note}" if self.note else line

    def add(self, n: int) -> None:
        self.written += n
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            self.show()

    def tick(self) -> None:
        """Show the line if it is due, whether or not anything was written since."""
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.show()

    def show(self) -> None:
        end = "\r" if self.tty else "\n"
        line = self.line()
        if self.tty:  # erase what a longer line before left behind
            line = line.ljust(self._width)
            self._width = len(line)
        print(line, end=end, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=self.stream)
