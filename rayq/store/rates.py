"""Measured decoding rates, read back from a results directory's models table.

The throughput model (rayq.planning.throughput) prefers these to any estimate; the caller reads
them here and hands them to the plan, so that planning never reads a results directory itself.
"""

from __future__ import annotations

import polars as pl

from rayq.planning.throughput import MeasuredKey, gpu_type_of_device
from rayq.store import query


def measured_rates(location: str) -> dict[MeasuredKey, float]:
    """Tokens per second of `generate` per (model, precision, protocol, GPU type) in a results
    directory's `models` table, summed over its runs; {} when there is none to read."""
    try:
        models = query.open(location).models
        df = models.select("model", "precision", "protocol", "device", "generated_tokens", "generate_s").collect()
    except Exception:  # noqa: BLE001 - no models table yet, or one written before these columns
        return {}
    out: dict[MeasuredKey, list[float]] = {}
    for row in df.filter(pl.col("generate_s") > 0).iter_rows(named=True):
        g = gpu_type_of_device(row["device"])
        if g is None or not row["generated_tokens"]:
            continue
        acc = out.setdefault((row["model"], row["precision"], row["protocol"] or "serial", g), [0.0, 0.0])
        acc[0] += row["generated_tokens"]
        acc[1] += row["generate_s"]
    return {k: t / s for k, (t, s) in out.items() if s > 0}
