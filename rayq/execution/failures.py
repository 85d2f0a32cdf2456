"""Trials that fail the same way on every block: the rule that stops such a run, and naming the error.

A trial (one block, rayq.execution.launcher) that raises is retried by Tune; a block that fails
alone is recorded as failed and the sweep goes on. But when the code fails (rayq's, an
engine's, a benchmark's stand-in host), every block fails the same way and retrying each one
only delays the end. `RepeatedFailures` tells the two apart from the errors Tune keeps for each
failed trial (`error_line`), compared without what varies from block to block
(`failure_signature`). Pure: no Ray needed, except its list of exception names.
"""

from __future__ import annotations

import re

# The run stops once trials of one host failed this many times with the same error, on at
# least this many distinct blocks, none of its blocks succeeding since (RepeatedFailures).
SAME_ERROR_FAILURES = 3
SAME_ERROR_BLOCKS = 2

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# An exception's line in a traceback: `Kind: message`, `module.Kind: message`, or Ray's
# `ray.exceptions.RayTaskError(Kind): ...` (a remote call's error, wrapping Kind).
_EXCEPTION = re.compile(r"(?P<kind>[A-Za-z_][\w.]*)(?:\((?P<inner>[A-Za-z_]\w*)\))?(?:: (?P<message>.*))?")
_VARYING = (  # what differs from block to block in the same error: ids, addresses, numbers
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<address>"),
    (re.compile(r"\b(?=[0-9a-f]*[0-9])[0-9a-f]{8,}\b"), "<id>"),
    (re.compile(r"\d+(?:\.\d+)?"), "N"),
)


def _exception(line: str) -> tuple[str, str] | None:
    """(kind, message) of a traceback's exception line; None for any other line."""
    m = _EXCEPTION.fullmatch(line)
    if m is None:
        return None
    if m["message"] is None and not m["kind"].endswith(("Error", "Exception", "Exit", "Interrupt")):
        return None  # a bare word; an exception raised without a message has a kind that says so
    return m["inner"] or m["kind"], m["message"] or ""


def error_line(text: str) -> str:
    """The error a failed trial last raised, as one line, from Tune's error file (each failure
    appended as "Failure # N ..." and its traceback): the innermost exception of the last
    failure ("AttributeError: ..."), else its last line."""
    last = _ANSI.sub("", text).rsplit("Failure # ", 1)[-1]
    lines = [x.rstrip() for x in last.splitlines() if x.strip()]
    named = [x for x in lines if _exception(x) is not None]
    return (named[-1] if named else lines[-1].strip() if lines else "unknown error")[:500]


def _ray_own(kind: str) -> bool:
    """An error of Ray's own (a lost actor, node or object; a timeout), not of rayq's or an engine's code."""
    if kind.startswith("ray."):
        return True
    import ray.exceptions  # RayTaskError(Kind) names Kind unqualified

    return isinstance(getattr(ray.exceptions, kind, None), type)


def failure_signature(error: str, block: str) -> tuple[str, str] | None:
    """What makes two trials' errors "the same": the exception's kind and message, without the
    block's id and what varies with it (ids, addresses, numbers). None for an error this rule
    leaves alone: Ray's own (a host or node lost is ridden out by restarts and retries) and a
    line that names no exception."""
    found = _exception(error.strip())
    if found is None or _ray_own(found[0]):
        return None
    kind, message = found
    message = message.replace(block, "<block>")
    for pattern, repl in _VARYING:
        message = pattern.sub(repl, message)
    return kind, message


class RepeatedFailures:
    """The rule that stops a run whose trials fail the same way on every block: a bug in the
    code (rayq's, an engine's, a stand-in's), not bad data, and retries cannot fix it.

    `failed` is told every failed trial, a retried one included. Once trials of one host have
    failed `failures` times with the same error (`failure_signature`), on at least `blocks`
    distinct blocks, and no block of that host succeeded since, it returns why the run must
    stop. A block that fails alone, however often Tune retries it, never stops the run: that
    is the block's own trouble, and its rows are recorded as failed. Two blocks are what a
    host has in flight (rayq.planning.scheduler.DEPTH): a third distinct block would start
    only once both had used up their retries: 7 failed trials with the default 2 retries,
    which stopped a run 40 to 62 s after it began on the (busy) 2-core test machine, against
    17 to 27 s for 3 failures (tests/test_launcher.py). Errors of Ray's own (a host or node
    lost) are not counted.
    """

    def __init__(self, failures: int = SAME_ERROR_FAILURES, blocks: int = SAME_ERROR_BLOCKS) -> None:
        self.failures, self.blocks = failures, blocks
        self.seen: dict[str, dict[tuple[str, str], list[str]]] = {}  # host -> signature -> blocks, once per failure

    def failed(self, key: str, block: str, error: str) -> str | None:
        signature = failure_signature(error, block)
        if signature is None:
            return None
        blocks = self.seen.setdefault(key, {}).setdefault(signature, [])
        blocks.append(block)
        if len(blocks) < self.failures or len(set(blocks)) < self.blocks:
            return None
        return (
            f"trials of {key} failed {len(blocks)} times with the same error, on {len(set(blocks))} blocks, "
            f"none succeeding: {error}"
        )

    def succeeded(self, key: str) -> None:
        self.seen.pop(key, None)
