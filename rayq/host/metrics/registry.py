"""The metric registry itself, apart from the package that fills it (its metric modules import this)."""

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
