"""Placement on a real multi-node Ray cluster with logical GPUs (`ray.cluster_utils.Cluster`).

The model is the tiny one, but its `size:` hint tells placement it is a 30B model, so an
fp32 host needs two 80 GiB GPUs (sharded, one placement group), bf16/fp16 hosts need 0.72
of one GPU each, and a 200B model fits no node at all. The test checks that every host
lands on the node, and gets the GPUs, that the plan computed before the run said.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from rayq.execution.cluster import live_cluster
from rayq.execution.driver import run_sweep
from rayq.planning import placement, spec
from tests.conftest import ray_cluster, sweep_dict


def _sweep(tiny_model: Path) -> spec.Sweep:
    data = sweep_dict(
        tiny_model,
        models=[
            {"name": "tiny", "path": str(tiny_model), "size": {"params": "30B"}},
            {"name": "huge", "path": str(tiny_model), "size": {"params": "200B"}},
        ],
        precisions=["fp32", "bf16", "fp16"],
        grid={"max_new_tokens": [4], "temperature": [1.0], "top_k": [1, 50]},
        runtime={"num_cpus": 1, "gpu_memory": "80GB", "flush_every": 3, "layer_sqnr": False},
    )
    return spec.parse(data, "cluster.yaml")


@pytest.fixture(scope="module")
def first_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, Any]]:
    """The sweep run once on two nodes of 2 GPUs: its plan (made against the live cluster), its
    output and its result. Both tests read it; the second resumes a copy on another shape."""
    sweep = _sweep(tiny_model)
    out = tmp_path_factory.mktemp("first") / "out"
    with ray_cluster([{"num_cpus": 2, "num_gpus": 2}] * 2) as cluster:
        planned = placement.plan_placement(sweep, live_cluster("80GB")).by_key()
        result = run_sweep(sweep, out, address=cluster.address, quiet=True)
    yield planned, out, result


def test_hosts_land_where_the_plan_says(first_run: tuple[Any, Path, Any]) -> None:
    planned, out, result = first_run
    fp32 = planned["tiny/fp32"]
    assert fp32.request.num_gpus == 2 and fp32.start_s == 0
    assert 0.70 < planned["tiny/bf16"].request.num_gpus < 0.75  # 56 GiB + 1 GiB context of 80
    assert all(planned[f"huge/{p}"].unplaceable for p in ("fp32", "bf16", "fp16"))

    assert result.complete and result.planned == 36
    assert result.place_s is not None
    models = pl.read_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True)
    assert models.height == 3  # the unplaceable hosts never started
    for row in models.iter_rows(named=True):
        p = planned[f"{row['model']}/{row['precision']}"]
        assert p.node is not None
        assert row["node"] == p.node.node_id, (row["model"], row["precision"])
        assert row["num_gpus"] == pytest.approx(p.request.num_gpus)
        ids = row["gpu_ids"].split(",")
        assert len(ids) == max(1, int(p.request.num_gpus))
    sharded = models.filter(pl.col("precision") == "fp32").row(0, named=True)
    assert len(set(sharded["gpu_ids"].split(","))) == 2  # two GPUs of one node, one actor

    rows = pl.read_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)
    assert rows.height == 36 and rows["completion_id"].n_unique() == 36
    by_model = dict(rows.group_by("model").agg(pl.col("status").unique().sort()).iter_rows())
    assert by_model == {"tiny": ["ok"], "huge": ["unplaceable"]}
    error = rows.filter(pl.col("model") == "huge")["error"][0]
    assert "unplaceable" in error and "largest node has 2 GPU" in error


def test_a_sweep_resumes_on_a_cluster_of_another_shape(
    tiny_model: Path, tmp_path: Path, first_run: tuple[Any, Path, Any]
) -> None:
    """Hosts unplaceable on 2-GPU nodes run when the sweep resumes on a 12-GPU node; nothing is duplicated."""
    sweep = _sweep(tiny_model)
    out = tmp_path / "out"
    shutil.copytree(first_run[1], out)
    rows = pl.read_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)
    assert rows.height == 36 and rows["completion_id"].n_unique() == 36
    statuses = dict(rows.group_by("model").agg(pl.col("status").unique().sort()).iter_rows())
    assert statuses == {"tiny": ["ok"], "huge": ["unplaceable"]}
    with ray_cluster([{"num_cpus": 4, "num_gpus": 12}]) as cluster:
        result = run_sweep(sweep, out, address=cluster.address, retry_failed=True, quiet=True)
    rows = pl.read_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)
    assert rows.height == 36 and rows["completion_id"].n_unique() == 36
    statuses = dict(rows.group_by("model").agg(pl.col("status").unique().sort()).iter_rows())
    assert result.done_before == 18 and result.written == 18  # only the unplaceable ones ran
    assert statuses == {"tiny": ["ok"], "huge": ["ok"]}
    models = pl.read_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True)
    huge = models.filter(pl.col("model") == "huge").sort("precision")
    assert huge["num_gpus"].to_list() == [5.0, 5.0, 10.0]  # bf16, fp16, fp32: sharded on the big node
