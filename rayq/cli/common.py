"""What the commands share: flag texts, one-line error text, the results-directory test."""

from __future__ import annotations

import sys

from rayq.errors import EXIT_REFUSED

QUERY_FORMATS = ("table", "csv", "json", "parquet")
TABLE_ROWS = 50  # rows `--format table` prints; the other formats write them all
TABLE_COLS = 12
ALLOW_PAST_CONTEXT_HELP = (
    "run prompts + max_new_tokens past a model's context length, with a warning "
    "(default: refuse; the same as runtime.allow_past_context: true)"
)
ALLOW_SWEEP_CHANGE_HELP = (
    "run a sweep into a directory holding another sweep, or rows this sweep does not plan (kept beside it)"
)


def first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def missing_results_dir(path: str) -> bool:
    """Whether `path` is a local results directory that is not there (said on stderr).

    Object storage has no directory to look for: a wrong prefix reads as empty, or fails
    when read, with its own message.
    """
    from rayq.store.storage import Storage, is_remote  # pyarrow: only for the commands that read results

    if is_remote(path) or Storage.at(path).exists():
        return False
    print(f"rayq: {path}: no such results directory", file=sys.stderr)
    return True


def cannot_read(path: str, e: BaseException) -> int:
    """The one line for a results directory that could not be read (an unreadable file, an
    unreachable bucket), and the refusal's exit status."""
    print(f"rayq: cannot read {path}: {first_line(e)}", file=sys.stderr)
    return EXIT_REFUSED
