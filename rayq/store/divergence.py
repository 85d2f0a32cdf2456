"""Where two token sequences part: the report compares precisions' greedy continuations this way.

Kept apart from rayq.host.measure, which imports torch to produce the continuations, so that a
report (which never imports torch) can compare them.
"""

from __future__ import annotations


def first_divergence(a: list[int] | None, b: list[int] | None) -> int | None:
    """Index of the first token where two continuations differ (None: identical as far as both go)."""
    if a is None or b is None:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
