"""The one registry of per-completion metrics.

A metric is a function of the finished completion (its text and what decoding measured)
that returns named columns. Registering one adds its columns to every row; each new
column is also declared in `rayq.store.dataset.SCHEMA` and documented in docs/schema.md, so the
public schema only ever grows.
"""

from __future__ import annotations

# Registration happens on import of each metric module.
from rayq.host.metrics import speed as _speed  # noqa: F401
from rayq.host.metrics import words as _words  # noqa: F401
from rayq.host.metrics.registry import REGISTRY, Finished, Metric, compute_all, register

__all__ = ["REGISTRY", "Finished", "Metric", "compute_all", "register"]
