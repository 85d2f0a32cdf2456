"""A one-line progress display: completions done / total, rate, ETA, and what the hosts do.

Printed to stderr at most every few seconds, so it stays readable while Ray and
transformers are kept quiet: on a terminal as a live tqdm bar (rate and ETA from tqdm's
smoothed recent speed), in a log as plain lines at most every 10 s, which a log reader or
`grep` takes better than carriage returns. The scheduler's `note` (hosts by phase, the
first host that waits and for what) rides on the same line (the bar's postfix), and `tick`
shows it even while no completion is written, so a wait is never silent.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm

# The plain line's fields, in the same order, with a fixed-width bar: a wide bar would
# leave the note no room, and tqdm cuts the line at the terminal's width rather than wrap
# it (a wrapped line breaks the redraw in place). `rate_noinv_fmt`, because tqdm's default
# turns a slow rate into "2.50s/" (seconds per completion).
BAR_FORMAT = (
    "rayq: {n_fmt}/{total_fmt} completions {percentage:3.0f}%|{bar:20}| {rate_noinv_fmt} | ETA {remaining}{postfix}"
)


def bar_size(stream: TextIO) -> tuple[int, int]:
    """tqdm's `ncols` and `nrows` for a terminal: the line is cut one short of its width, so
    the cursor never wraps and a carriage return redraws the line in place. A terminal that
    says it is 0 x 0 (the one `script` opens, those of some CI runners) is taken as 80 x 24,
    as shutil does: tqdm's own measure would draw nothing at all there."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    return (size.columns or 80) - 1, size.lines or 24


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(
        self,
        total: int,
        done_before: int = 0,
        stream: TextIO | None = None,
        every_s: float = 2.0,
        quiet: bool = False,
    ) -> None:
        self.total = total
        self.quiet = quiet  # a library caller's `quiet=True`: counted, never drawn
        self.done_before = done_before
        self.written = 0
        self._stream = stream
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else max(every_s, 10.0)
        self.start = time.monotonic()
        self._last = 0.0
        self.note = ""
        self._bar: tqdm | None = None  # made on first show, so nothing is drawn before the run prints its plan

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    def __getstate__(self) -> dict[str, object]:
        # Tune pickles its callbacks (and so this) into its experiment state; a stream cannot
        # be, nor a tqdm bar (it holds the stream and a lock). A copy draws a bar of its own.
        return {**self.__dict__, "_stream": None, "_bar": None}

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
        if self.quiet:
            return
        if self.tty:
            self._draw()
        else:
            print(self.line(), file=self.stream, flush=True)

    def _draw(self) -> None:
        if self._bar is None:
            from tqdm import tqdm

            ncols, nrows = bar_size(self.stream)
            self._bar = tqdm(
                total=self.total,
                initial=self.done,
                file=self.stream,
                bar_format=BAR_FORMAT,
                unit="",
                ncols=ncols,
                nrows=nrows,
                mininterval=0,  # this class decides when to draw; tqdm draws when asked
                miniters=1,
                postfix=self.note or None,
            )  # and draws itself
            return
        bar = self._bar
        bar.ncols, bar.nrows = bar_size(self.stream)  # follow a resized terminal
        bar.set_postfix_str(self.note, refresh=False)
        if self.done > bar.n:
            bar.update(self.done - bar.n)  # draws, and feeds tqdm's rate
        else:
            bar.refresh()  # a tick: the same count, a new note and elapsed time

    def close(self) -> None:
        if self._bar is not None:
            # The last count, which every_s may have held back; tqdm's last draw shows the
            # mean rate of the whole run instead of the recent one.
            self._bar.set_postfix_str(self.note, refresh=False)
            self._bar.n = self.done
            self._bar.close()
            self._bar = None
