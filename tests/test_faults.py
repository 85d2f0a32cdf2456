"""Faults on a real Ray cluster: a model host killed mid-block, a block out of retries.

The sweep must end with every completion present exactly once: the killed host is restarted
(max_restarts), its trial retried by Tune (max_failures), and whatever a retry writes twice is
removed by compaction, keyed by completion_id. A worker node lost mid-sweep is the same promise
on a multi-node cluster: `bench/cluster.py --tiny`, run by tests/test_bench.py, removes the
node the fp32 host is writing from and checks that nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from rayq.execution.driver import host_name, run_sweep
from rayq.planning import spec
from rayq.planning.scheduler import DEPTH
from tests.conftest import sweep_dict


def _sweep(tiny_model: Path, precisions: list[str]) -> spec.Sweep:
    data = sweep_dict(
        tiny_model,
        precisions=precisions,
        grid={"max_new_tokens": [24, 32], "temperature": [0.5, 0.8, 1.0], "top_k": [1, 5, 50]},
        seeds=3,
        runtime={"num_cpus": 1, "protocol": "serial", "flush_every": 2, "max_trial_retries": 3},
    )
    return spec.parse(data, "faults.yaml")


def _hosts_when_writing(out: Path, n_files: int = 3, timeout: float = 300) -> tuple[str, Any]:
    """Wait until the run has committed a few files; return its namespace and a Ray handle getter."""
    import ray

    deadline = time.monotonic() + timeout
    while len(list(out.glob("completions/*/*/*.parquet"))) < n_files:
        assert time.monotonic() < deadline, "the sweep wrote nothing in time"
        time.sleep(0.1)
    run_id = json.loads((out / "run.lock").read_text())["run_id"]
    namespace = f"rayq-{run_id[:12]}"
    return namespace, lambda key: ray.get_actor(host_name(key), namespace=namespace)


def _in_background(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def wrap() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            errors.append(e)

    t = threading.Thread(target=wrap, daemon=True)
    t.start()
    return t, errors


def _exactly_once(out: Path, planned: int) -> pl.DataFrame:
    df = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert df.height == planned and df["completion_id"].n_unique() == planned
    assert (df["status"] == "ok").all(), df.filter(pl.col("status") != "ok")["error"].to_list()[:2]
    return df


def test_host_killed_mid_block_is_restarted_and_its_block_retried(
    tiny_model: Path, tmp_path: Path, local_ray: None
) -> None:
    import ray

    sweep = _sweep(tiny_model, ["fp32"])
    out = tmp_path / "out"

    def kill_host() -> None:
        _, get = _hosts_when_writing(out)
        host = get("tiny/fp32")
        pid = ray.get(host.info.remote(), timeout=60)["pid"]
        os.kill(pid, signal.SIGKILL)

    t, errors = _in_background(kill_host)
    result = run_sweep(sweep, out, quiet=True)
    t.join(timeout=60)
    assert not errors, errors
    assert result.complete
    assert result.planned == 162
    _exactly_once(out, result.planned)
    assert json.loads((out / "manifest.json").read_text())["runs"][-1]["complete"] is True


def test_a_block_out_of_tries_is_recorded_failed_and_the_sweep_goes_on(
    tiny_model: Path, tmp_path: Path, local_ray: None
) -> None:
    """No retries left: the killed host's blocks in flight (up to the scheduler's depth)
    become `error` rows, a fresh host runs the other blocks, and `--retry-failed` later
    completes them, every completion once."""
    import ray

    data = sweep_dict(
        tiny_model,
        grid={"max_new_tokens": [48, 64], "temperature": [0.5, 1.0], "top_k": [1, 50]},
        seeds=3,
        runtime={"num_cpus": 1, "protocol": "serial", "flush_every": 2, "max_trial_retries": 0},
    )
    sweep = spec.parse(data, "faults.yaml")
    out = tmp_path / "out"

    def kill_host() -> None:
        _, get = _hosts_when_writing(out)
        os.kill(ray.get(get("tiny/fp32").info.remote(), timeout=60)["pid"], signal.SIGKILL)

    t, errors = _in_background(kill_host)
    result = run_sweep(sweep, out, quiet=True)
    t.join(timeout=60)
    assert not errors, errors
    assert result.complete and result.planned == 72
    df = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert df.height == 72 and df["completion_id"].n_unique() == 72
    failed = df.filter(pl.col("status") != "ok")
    assert failed.height > 0 and set(failed["status"]) == {"error"}
    assert failed["error"].str.contains("block failed after retries").all()
    blocks = failed.select("temperature", "top_k").unique()
    assert 1 <= blocks.height <= DEPTH  # only the blocks in flight when the host died
    assert any("failed after 0 retries" in e for e in result.errors)

    again = run_sweep(sweep, out, retry_failed=True, quiet=True)
    assert again.written == failed.height
    _exactly_once(out, 72)
