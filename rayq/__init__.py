"""rayq: large-scale sweeps over quantized LLMs on Ray, into a resumable Parquet dataset."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rayq.query import Tables

__version__ = "0.1.0"


def open(path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Tables:
    """Lazy Polars tables `completions` and `models` of a results directory (see rayq.query.open).

    Imported on first use, because `rayq plan` and every `rayq.spec` user import this
    package and must not pay for importing Polars.
    """
    from rayq.query import open as open_tables

    return open_tables(path, storage_options)
