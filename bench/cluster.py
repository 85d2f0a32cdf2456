"""Placement and node-loss recovery on a real multi-node Ray cluster on this machine.

    .venv/bin/python bench/cluster.py
    .venv/bin/python bench/cluster.py --tiny   # the same two parts, less work (TINY_GRID)

1. Time to place: `rayq plan`'s placement of the Roy 2023 sweep (42 hosts) on a named
   8 x 80 GB shape, and the placement `rayq run` does against a live `ray.cluster_utils`
   cluster (reading the nodes included).
2. Recovery: a sweep of the tiny model on a head plus three 1-CPU worker nodes; once the
   fp32 host has committed a few files its node is removed without warning. Recovery time
   is from the removal to the first file committed by the restarted host on another node.
   Then: completions planned, unique on disk (lost = planned - unique, must be 0), and
   duplicates left after compaction (must be 0); whether the run completed, and on which nodes
   the fp32 rows were written (the removed one and another).

`--tiny` is the suite's end-to-end test of node loss (tests/test_bench_cluster.py runs it; the lines
it must print are in tests/test_bench.py's TINY).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# `--tiny`: the recovery sweep with 8- and 16-token completions and 1 seed (54 per precision, 27
# fp32 files: the node still goes after 3), a quicker node health check, and the placement timed twice.
TINY_GRID = {"max_new_tokens": [8, 16], "temperature": [0.5, 0.8, 1.0], "top_k": [1, 5, 50]}


def time_to_place(n: int = 20) -> None:
    from rayq.planning import placement, spec

    sweep = spec.load(ROOT / "sweeps" / "roy2023.yaml")
    t0 = time.perf_counter()
    for _ in range(n):
        plan = placement.plan_placement(sweep, placement.named_cluster(8, "80GB"))
    dt = (time.perf_counter() - t0) / n
    print(f"place roy2023 (42 hosts) on 8 x 80GB: {dt * 1000:.1f} ms; {plan.at_once} hosts at once")


def recovery(tiny: bool = False) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from rayq.execution.driver import run_sweep
    from rayq.planning import spec
    from tests.conftest import build_tiny_model, sweep_dict

    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    tmp = Path(tempfile.mkdtemp(prefix="rayq-bench-cluster-"))
    model = build_tiny_model(tmp / "tiny")
    grid = {"max_new_tokens": [48, 64], "temperature": [0.5, 0.8, 1.0], "top_k": [1, 5, 50]}
    if tiny:  # TINY_GRID: shorter completions, 1 seed
        grid = TINY_GRID
    data = sweep_dict(
        model,
        precisions=["fp32", "bf16"],
        grid=grid,
        seeds=1 if tiny else 3,
        runtime={"num_cpus": 1, "protocol": "serial", "flush_every": 2, "max_trial_retries": 3},
    )
    sweep = spec.parse(data, "bench-cluster.yaml")
    out = tmp / "out"
    head: dict = {"num_cpus": 0}
    if tiny:  # Ray declares the removed node dead after 3 failed checks 0.5 s apart, not 5 checks 3 s apart
        head["_system_config"] = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    seen_rows: dict[str, int] = {}  # file -> number of distinct nodes in it
    marks: dict[str, float | str] = {}

    def watch() -> None:
        part = out / "completions" / "model=tiny" / "precision=fp32"
        while "done" not in marks:
            for f in sorted(part.glob("*.parquet")) if part.is_dir() else []:
                if f.name in seen_rows:
                    continue
                try:
                    nodes = set(pq.read_table(f, columns=["node"])["node"].to_pylist())
                except Exception:  # noqa: BLE001 - compacted away between listing and reading
                    continue
                seen_rows[f.name] = len(nodes)
                lost = marks.get("lost")
                if lost and "recovered" not in marks and nodes - {lost}:
                    marks["recovered"] = time.monotonic()
                if len(seen_rows) >= 3 and "lost" not in marks:
                    # the host's node, from the rows it wrote: no call that would queue behind its work
                    victim = next(w for w in workers if w.node_id in nodes)
                    marks["removed_at"] = time.monotonic()
                    cluster.remove_node(victim, allow_graceful=False)
                    marks["lost"] = victim.node_id
                    marks["files_before"] = len(seen_rows)
            time.sleep(0.05)

    try:
        ray.init(address=cluster.address, log_to_driver=False, include_dashboard=False)
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        result = run_sweep(sweep, out, address=cluster.address, quiet=True)
        marks["done"] = "yes"
        t.join(timeout=30)
    finally:
        ray.shutdown()
        cluster.shutdown()
    df = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    unique = df["completion_id"].n_unique()
    removed = float(marks["removed_at"])
    recovered = float(marks["recovered"]) if "recovered" in marks else float("nan")
    print(f"time to place (live cluster, 2 hosts): {result.place_s:.3f} s")
    print(
        f"node removed after {marks['files_before']} fp32 files; recovery (removal -> first commit on another "
        f"node): {recovered - removed:.1f} s"
    )
    fp32_nodes = set(df.filter(pl.col("precision") == "fp32")["node"].unique().to_list())
    print(
        f"sweep wall time {result.wall_s:.1f} s; completions planned {result.planned}, unique on disk {unique}, "
        f"lost {result.planned - unique}, duplicated {df.height - unique}; all ok: {(df['status'] == 'ok').all()}; "
        f"complete: {result.complete}; fp32 rows written on {len(fp32_nodes)} nodes, the removed one among them: "
        f"{marks['lost'] in fp32_nodes}"
    )
    shutil.rmtree(tmp, ignore_errors=True)  # kept only when the run fails, to look at


if __name__ == "__main__":
    tiny = sys.argv[1:] == ["--tiny"]
    if sys.argv[1:] and not tiny:
        sys.exit(f"usage: {sys.argv[0]} [--tiny]")
    time_to_place(2 if tiny else 20)
    recovery(tiny)
