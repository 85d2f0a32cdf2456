"""rayq: large-scale sweeps over quantized LLMs on Ray, into a resumable Parquet dataset.

As a library (docs/library.md): `rayq.sweep`, `rayq.plan`, `rayq.run`, `rayq.open` and
`rayq.RayqError`. Importing the package imports none of torch, Ray or Polars; each function
imports what it needs when called, because `rayq plan` and every `rayq.spec` user import this
package and must not pay for them. The modules behind them are named for their jobs
(rayq.planner, rayq.driver), so these names stay plain functions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rayq.errors import RayqError  # no imports of its own: cheap, and `except rayq.RayqError` needs no call first

if TYPE_CHECKING:
    from rayq.api import Plan, SweepLike
    from rayq.driver import RunResult
    from rayq.query import Tables
    from rayq.spec import Sweep

__version__ = "0.1.0"
__all__ = ["RayqError", "open", "plan", "run", "sweep"]


def open(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Tables:
    """Lazy Polars tables `completions`, `models` and `layers` of a results directory (see rayq.query.open)."""
    from rayq.query import open as open_tables

    return open_tables(path, storage_options)


def sweep(fields: Mapping[str, Any] | None = None, /, **more: Any) -> Sweep:
    """A sweep built in Python, validated as a sweep file is (see rayq.api.sweep)."""
    from rayq import api

    return api.sweep(fields, **more)


def plan(sweep_or_path: SweepLike, output: str | os.PathLike[str] | None = None) -> Plan:
    """The plan of a sweep and what its results already hold; starts nothing (see rayq.api.plan)."""
    from rayq import api

    return api.plan(sweep_or_path, output)


def run(
    sweep_or_path: SweepLike,
    output: str | os.PathLike[str] | None = None,
    *,
    address: str | None = None,
    retry_failed: bool = False,
    force: bool = False,
    quiet: bool = False,
    **options: Any,
) -> RunResult:
    """Run (or resume) a sweep into `output` (see rayq.api.run)."""
    from rayq import api

    return api.run(
        sweep_or_path, output, address=address, retry_failed=retry_failed, force=force, quiet=quiet, **options
    )
