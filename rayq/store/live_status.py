"""DIR/run_status.json: what a running sweep's scheduler is doing, for `rayq status` elsewhere.

The driver rewrites it every few seconds while it runs (atomically, like every other file of
the results directory) and once more when it ends, so `rayq status` in another shell, or on
another machine reading the same bucket, can say which host waits for what. It is a view,
never read back by a run: the dataset alone says what is done. Imports neither torch nor ray.
"""

from __future__ import annotations

import json
import time
from typing import Any

from rayq.store.storage import Storage

FILE = "run_status.json"


def write(storage: Storage, status: dict[str, Any]) -> None:
    storage.write_bytes(storage.path(FILE), json.dumps(status, indent=1).encode())


def read(storage: Storage) -> dict[str, Any] | None:
    try:
        data = storage.read_bytes(storage.path(FILE))
        return json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None


def describe(status: dict[str, Any], live: bool) -> list[str]:
    """The lines `rayq status` prints about the scheduler of the last (or current) run."""
    age = time.time() - float(status.get("updated_unix", 0))
    when = f"{age:.0f} s ago" if age < 3600 else status.get("updated_at", "?")
    head = "scheduler (live run" if live else "scheduler (when the last run ended"
    lines = [f"{head}, as of {when}): {status.get('summary', '')}"]
    for h in status.get("hosts", []):
        lines.append(f"  {h['key']:40s} {h['phase']:10s} blocks {h['blocks_done']}/{h['blocks']}  {h.get('note', '')}")
    for w in status.get("waiting", []):
        lines.append(f"  {w}")
    if status.get("stalled"):
        lines.append(f"  stopped: {status['stalled']}")
    return lines
