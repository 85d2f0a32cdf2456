"""The errors rayq raises on purpose, and the exit statuses the command line maps them to.

Every refusal a user can cause (a bad sweep file, a results directory held by a live run or
holding another sweep, a prompt past the model's context, ...) is a `RayqError`: the command
line prints its message as one line, without a traceback, and exits with its `exit_status`.
A library caller catches `RayqError` (or a subclass) instead. Exit statuses, documented in
docs/cli.md:

    0  complete, every row ok
    1  complete, some rows failed (status error / oom / unplaceable)
    2  refused: nothing was started (bad input, a held or mismatched results directory)
    3  incomplete: stopped before every completion was on disk (resume by running again)
    4  a problem found by `rayq check`
    5  internal error (a bug in rayq; RAYQ_DEBUG=1 shows the traceback)
    130 interrupted (Ctrl-C); run again to resume
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_REFUSED = 2
EXIT_INCOMPLETE = 3
EXIT_CHECK_FAILED = 4
EXIT_INTERNAL = 5
EXIT_INTERRUPTED = 130


class RayqError(Exception):
    """A refusal or failure whose message is for the user, as it is (one line where possible)."""

    exit_status = EXIT_REFUSED


class ResultsDirError(RayqError, RuntimeError):
    """The results directory cannot be used as asked (held by a live run, another sweep, unreadable)."""


class RunStoppedError(RayqError):
    """A run stopped early for a reason that running again cannot fix by itself: every block of a
    host failed with the same error (a bug, rayq.execution.launcher.RepeatedFailures). The
    message names the error. What was written is kept and the rest is not on disk: exit status
    3 (incomplete), and the same command resumes once the cause is fixed. `result` is the
    run's RunResult (rayq.execution.driver), as `rayq.run` would have returned it."""

    exit_status = EXIT_INCOMPLETE

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result
