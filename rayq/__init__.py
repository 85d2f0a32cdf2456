"""rayq: large-scale sweeps over quantized LLMs on Ray, into a resumable Parquet dataset.

As a library (docs/library.md): `rayq.sweep`, `rayq.plan`, `rayq.run`, `rayq.open` and
`rayq.RayqError`. Importing the package costs what validating a sweep costs (pydantic,
PyYAML) and imports none of torch, Ray or Polars: each function imports what it needs when
called, because `rayq plan` and every Ray worker import this package and must not pay for
them. The modules behind them are named for their jobs (rayq.planning.planner, rayq.execution.driver), so
these names stay plain functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rayq.api import plan, run, sweep
from rayq.errors import RayqError

if TYPE_CHECKING:
    from rayq.store.query import Tables

__version__ = "0.1.0"
__all__ = ["RayqError", "open", "plan", "run", "sweep"]


def open(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Tables:
    """Lazy Polars tables `completions`, `models` and `layers` of a results directory (see rayq.store.query.open)."""
    from rayq.store.query import open as open_tables

    return open_tables(path, storage_options)
