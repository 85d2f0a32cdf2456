"""`rayq status`: done / total per model and precision, and what the scheduler is doing."""

from __future__ import annotations

import argparse
import sys

from rayq.catalog.hosts import HostKey
from rayq.cli.common import cannot_read
from rayq.errors import EXIT_OK, EXIT_REFUSED


def cmd(args: argparse.Namespace) -> int:
    from rayq.store import live_status, manifest
    from rayq.store.dataset import Store

    try:
        store = Store(args.dir)
        if not store.exists():
            print(f"rayq: {args.dir}: no such results directory", file=sys.stderr)
            return EXIT_REFUSED
        m = manifest.load(store.storage)
        counts = store.status_counts()
    except (OSError, ValueError) as e:  # an unreachable bucket, missing keys, a URI pyarrow cannot parse
        return cannot_read(args.dir, e)
    planned: dict[str, int] = m.get("planned", {})
    keys = sorted(set(planned) | {str(HostKey(*mp)) for mp in counts})
    print(f"{'model/precision':40s} {'done':>8s} {'total':>8s} {'ok':>8s} {'failed':>8s}")
    tot_done = tot_planned = 0
    for key in keys:
        host = HostKey.parse(key)
        c = counts.get((host.model, host.precision), {})  # type: ignore[call-overload]
        n = sum(c.values())
        ok = c.get("ok", 0)
        total = planned.get(key, 0)
        tot_done += n
        tot_planned += total
        print(f"{key:40s} {n:8d} {total:8d} {ok:8d} {n - ok:8d}")
    print(f"{'all':40s} {tot_done:8d} {tot_planned:8d}")
    runs = m.get("runs", [])
    if runs:
        last = runs[-1]
        state = (
            "running or killed" if "ended_at" not in last else ("complete" if last.get("complete") else "incomplete")
        )
        print(f"last run: {last.get('started_at')} ({state}); {len(runs)} run(s) in all")
        status = live_status.read(store.storage)
        if status and status.get("run_id") == last.get("run_id"):
            for line in live_status.describe(status, live="ended_at" not in last):
                print(line)
    return EXIT_OK
