"""DIR/manifest.json: what ran, with which software, on which hardware, and when.

One manifest per results directory; each `rayq run` on it (the first and every resume)
appends a record to `runs`, so an interrupted-and-resumed sweep keeps its history. It is
read and written through rayq.store.storage, so it lies beside the data wherever that is (a
local directory or object storage) and is replaced atomically.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayq.store import sweep_history
from rayq.store.storage import Storage
from rayq.store.sweep_history import now

if TYPE_CHECKING:
    from rayq.store.sweep_history import Verdict

FILE = "manifest.json"

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


def load(storage: Storage) -> dict[str, Any]:
    """The manifest of the results at `storage` ({} if there is none or it is unreadable)."""
    try:
        data = storage.read_bytes(storage.path(FILE))
        return json.loads(data) if data is not None else {}
    except (OSError, ValueError):
        return {}


def save(storage: Storage, m: dict[str, Any]) -> None:
    storage.write_bytes(storage.path(FILE), json.dumps(m, indent=2, default=str).encode())


def start_run(
    storage: Storage,
    sweep_file: str,
    sweep_text: str,
    sweep_name: str,
    planned: dict[str, int],
    run_id: str,
    verdict: Verdict | None = None,
) -> dict[str, Any]:
    """Record a run's start, and the sweep: every new version of its file is kept in `sweep_versions`."""
    m = load(storage)
    m.setdefault("started_at", now())
    sweep_history.record(m, sweep_file, sweep_text, run_id, verdict or sweep_history.Verdict("new"))
    m.update(
        sweep=sweep_name,
        sweep_file=sweep_file,
        sweep_yaml=sweep_text,
        planned=planned,
        versions=versions(),
        hardware=hardware(),
    )
    m.setdefault("runs", []).append(
        {
            "run_id": run_id,
            "started_at": now(),
            "driver_pid": os.getpid(),
            "sweep_change": verdict.kind if verdict else "new",
        }
    )
    save(storage, m)
    return m


def record_quarantine(storage: Storage, run_id: str, moved: list[dict[str, str]]) -> None:
    """Add the files a run moved aside (file, moved_to, reason) to the manifest's `quarantine`."""
    m = load(storage)
    m.setdefault("quarantine", []).extend({**q, "run_id": run_id, "at": now()} for q in moved)
    save(storage, m)


def end_run(storage: Storage, run_id: str, **fields: Any) -> dict[str, Any]:
    m = load(storage)
    for r in m.get("runs", []):
        if r.get("run_id") == run_id:
            r.update(ended_at=now(), **fields)
    m["ended_at"] = now()
    save(storage, m)
    return m
