"""DIR/manifest.json: what ran, with which software, on which hardware, and when.

One manifest per results directory; each `rayq run` on it (the first and every resume)
appends a record to `runs`, so an interrupted-and-resumed sweep keeps its history.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rayq.store import write_json

PACKAGES = (
    "rayq",
    "torch",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "gptqmodel",
    "ray",
    "pyarrow",
    "polars",
    "gguf",
)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def hardware() -> dict[str, Any]:
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1) if mem_kb else None,
        "system": platform.platform(),
    }


def load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def start_run(
    path: Path, sweep_file: str, sweep_text: str, sweep_name: str, planned: dict[str, int], run_id: str
) -> dict[str, Any]:
    m = load(path)
    m.setdefault("started_at", now())
    m.update(
        sweep=sweep_name,
        sweep_file=sweep_file,
        sweep_yaml=sweep_text,
        planned=planned,
        versions=versions(),
        hardware=hardware(),
    )
    m.setdefault("runs", []).append({"run_id": run_id, "started_at": now(), "driver_pid": os.getpid()})
    write_json(path, m)
    return m


def end_run(path: Path, run_id: str, **fields: Any) -> dict[str, Any]:
    m = load(path)
    for r in m.get("runs", []):
        if r.get("run_id") == run_id:
            r.update(ended_at=now(), **fields)
    m["ended_at"] = now()
    write_json(path, m)
    return m
