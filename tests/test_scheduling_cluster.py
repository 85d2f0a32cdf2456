"""Scheduling on real Ray clusters with logical GPUs: random shapes always finish; a stuck run stops.

The hosts are the tiny model, but `size:` hints make them 1B to 70B models, so on GPUs of
24 to 80 GiB they need a share of a GPU, one GPU, several GPUs of one node, or fit nowhere.
Whatever the shape, the sweep must end with every completion exactly once, in bounded time
(the pytest timeout); the resume on a cluster of another shape is in tests/test_cluster.py.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from rayq.execution.cluster import live_cluster
from rayq.execution.driver import run_sweep
from rayq.planning import placement, spec
from rayq.store import live_status
from rayq.store.storage import Storage
from tests.conftest import ray_cluster, rayq_cmd, sweep_dict

# Shapes per test run: a few here (each costs a run of real hosts); RAYQ_PROPERTY_SHAPES=N for more.
SHAPES = int(os.environ.get("RAYQ_PROPERTY_SHAPES", "3"))
SEED = int(os.environ.get("RAYQ_PROPERTY_SEED", "20261125"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head only, this process connected; the tests add and remove worker nodes."""
    with ray_cluster([]) as c:
        yield c


def _reshape(cluster: Any, nodes: list[dict[str, Any]]) -> None:
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    for node in nodes:
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    import ray

    deadline = time.monotonic() + 60
    while sum(1 for n in ray.nodes() if n["Alive"]) != len(nodes) + 1:  # removed nodes are seen dead
        assert time.monotonic() < deadline, "the cluster did not settle"
        time.sleep(0.2)


def _random_case(rng: random.Random, tiny_model: Path) -> tuple[list[dict[str, Any]], spec.Sweep]:
    nodes = [{"num_cpus": 2, "num_gpus": rng.randint(1, 4)} for _ in range(rng.randint(1, 2))]
    sizes = rng.sample(["1B", "7B", "13B", "30B", "70B", "200B"], 2)
    data = sweep_dict(
        tiny_model,
        name="shapes",
        models=[{"name": f"m{s.lower()}", "path": str(tiny_model), "size": {"params": s}} for s in sizes],
        precisions=["fp32", "bf16"],
        prompts=["Life in London", "Hello, my name is"],
        grid={"max_new_tokens": [4], "temperature": [1.0], "top_k": [1, 50]},
        runtime={
            "num_cpus": rng.choice([0.5, 1]),
            "gpu_memory": rng.choice(["24GB", "40GB", "80GB"]),
            "gpu_sharing": rng.choice([True, False]),
            "flush_every": 2,
            "layer_sqnr": False,
            "stall_timeout_s": 120,
        },
    )
    return nodes, spec.parse(data, "shapes.yaml")


def test_random_cluster_shapes_finish_with_every_completion_once(
    tiny_model: Path, tmp_path: Path, cluster: Any
) -> None:
    """Each shape runs its own sweep, then resumes the previous shape's sweep with --retry-failed:
    what was unplaceable there runs here if it fits, and every completion is on disk once."""
    rng = random.Random(SEED)
    seen = []
    previous: tuple[spec.Sweep, Path] | None = None
    for i in range(SHAPES):
        nodes, sweep = _random_case(rng, tiny_model)
        _reshape(cluster, nodes)
        runs = [(sweep, tmp_path / f"shape{i}", False)]
        if previous is not None:
            runs.append((*previous, True))
        for run_sweep_of, out, retry in runs:
            live = live_cluster(run_sweep_of.spec.runtime.gpu_memory)
            planned = placement.plan_placement(run_sweep_of, live).by_key()
            requests = {k: (p.request.num_gpus, p.unplaceable) for k, p in planned.items()}
            seen.append((nodes, requests))
            t0 = time.monotonic()
            result = run_sweep(run_sweep_of, out, address=cluster.address, quiet=True, retry_failed=retry)
            case = f"shape {i}{' (resumed)' if retry else ''}: {nodes}, {requests}, {time.monotonic() - t0:.0f} s"
            assert result.complete and result.stalled is None, (case, result.errors)
            rows = pl.read_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)
            assert rows.height == result.planned == 16 and rows["completion_id"].n_unique() == 16, case
            for (model, precision), part in rows.group_by("model", "precision"):
                statuses = part["status"].unique().to_list()
                if planned[f"{model}/{precision}"].unplaceable:
                    # unplaceable now; on a resume, rows that ran before stay as they were
                    assert set(statuses) <= {"unplaceable", "ok"} and (retry or statuses == ["unplaceable"]), case
                else:
                    assert statuses == ["ok"], (case, model, precision, part["error"][0])
        previous = (sweep, tmp_path / f"shape{i}")
    # The draw covered hosts that share a GPU, hosts sharded over several and hosts that fit nowhere.
    kinds = {_kind(g, u) for _, requests in seen for g, u in requests.values()}
    assert len(kinds) >= min(3, SHAPES), seen


def _kind(gpus: float, unplaceable: bool) -> str:
    if unplaceable:
        return "unplaceable"
    return "shared" if gpus < 1 else "sharded" if gpus > 1 else "one GPU"


def test_a_host_ray_cannot_place_stops_the_run_naming_it(tiny_model: Path, tmp_path: Path, cluster: Any) -> None:
    """Another tenant holds the node's GPUs: the host waits in Ray, the watchdog stops the run
    naming it, `rayq status` says so, and once the GPUs are free the same command finishes."""
    import ray

    _reshape(cluster, [{"num_cpus": 2, "num_gpus": 1}])
    squatter = ray.util.placement_group([{"GPU": 1}])  # not rayq's: its books do not see it
    assert squatter.wait(30)
    data = sweep_dict(
        tiny_model,
        name="stuck",
        models=[{"name": "tiny", "path": str(tiny_model), "size": {"params": "7B"}}],
        precisions=["bf16"],
        prompts=["Life in London"],
        grid={"max_new_tokens": [4], "temperature": [1.0], "top_k": [1, 50]},
        runtime={
            "num_cpus": 1,
            "gpu_memory": "80GB",
            "gpu_sharing": False,
            "layer_sqnr": False,
            "stall_timeout_s": 6,
        },
    )
    sweep = spec.parse(data, "stuck.yaml")
    out = tmp_path / "out"
    t0 = time.monotonic()
    result = run_sweep(sweep, out, address=cluster.address, quiet=True)
    assert time.monotonic() - t0 < 120
    assert not result.complete and result.written == 0 and result.exit_status == 3  # incomplete
    assert result.stalled is not None
    assert "tiny/bf16 asked Ray for 1 GPU" in result.stalled and "has not been placed" in result.stalled
    status = live_status.read(Storage.at(str(out)))
    assert status is not None and status["stalled"] == result.stalled
    assert [h["phase"] for h in status["hosts"]] == ["placing"]
    shown = subprocess.run([*rayq_cmd(), "status", str(out)], capture_output=True, text=True, check=True).stdout
    assert "placing" in shown and "stopped: no progress for" in shown, shown

    ray.util.remove_placement_group(squatter)
    result = run_sweep(sweep, out, address=cluster.address, quiet=True)
    assert result.complete and result.stalled is None and result.written == 2 and result.exit_status == 0
    rows = pl.read_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)
    assert rows.height == 2 and rows["status"].to_list() == ["ok", "ok"]
