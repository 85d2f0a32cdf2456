"""The one registry of per-completion metrics.

A metric is a function of the finished completion (its text and what decoding measured)
that returns named columns. Registering one adds its columns to every row; each new
column is also declared in `rayq.store.SCHEMA` and documented in docs/schema.md, so the
public schema only ever grows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Finished:
    """What decoding hands to the metrics."""

    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    latency_s: float
    ttft_s: float | None


Metric = Callable[[Finished], dict[str, Any]]
REGISTRY: dict[str, Metric] = {}


def register(name: str) -> Callable[[Metric], Metric]:
    def wrap(fn: Metric) -> Metric:
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} is registered twice")
        REGISTRY[name] = fn
        return fn

    return wrap


def compute_all(done: Finished) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fn in REGISTRY.values():
        out.update(fn(done))
    return out


# Registration happens on import of each metric module.
from rayq.metrics import speed as _speed  # noqa: E402,F401
from rayq.metrics import words as _words  # noqa: E402,F401
