"""The engine end to end on a real local Ray: dataset shape, determinism, resume after SIGKILL.

Uses the tiny random-weight model for speed; tests/test_bundled.py runs the real model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from rayq.execution.driver import run_sweep
from rayq.planning import spec
from rayq.store.dataset import SCHEMA
from tests.conftest import rayq_cmd, sweep_dict, write_sweep

REPO = Path(__file__).resolve().parent.parent


def read_all(out: Path) -> pl.DataFrame:
    return pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, local_ray: None) -> tuple[spec.Sweep, Path]:
    sweep = spec.parse(sweep_dict(tiny_model, precisions=["fp32", "bf16"]), "tiny.yaml")
    out = tmp_path_factory.mktemp("run")
    result = run_sweep(sweep, out, quiet=True)
    assert result.complete and result.written == result.planned == 48
    return sweep, out


def test_dataset_has_documented_columns_and_one_row_per_completion(tiny_run: tuple[spec.Sweep, Path]) -> None:
    _sweep, out = tiny_run
    df = read_all(out)
    assert df.height == 48 and df["completion_id"].n_unique() == 48
    assert set(df.columns) == set(SCHEMA.names) | {"model", "precision"}
    assert (df["status"] == "ok").all()
    # the default protocol: batched; a block of 6 goes to its host whole (committed in parts of
    # flush_every=4) and decodes as one batch (batch_size auto is 8 on a CPU)
    assert df["protocol"].unique().to_list() == ["batched"]
    assert df["batch_size"].unique().to_list() == [6]
    assert sorted(df["precision"].unique().to_list()) == ["bf16", "fp32"]
    # finished partitions are compacted to one file each
    assert len(list((out / "completions").glob("*/*/*.parquet"))) == 2
    documented = (REPO / "docs" / "schema.md").read_text()
    for col in [*SCHEMA.names, "model", "precision"]:
        assert f"`{col}`" in documented, f"column {col} is not documented in docs/schema.md"
    m = json.loads((out / "manifest.json").read_text())
    assert m["versions"]["torch"] and m["versions"]["ray"] and m["hardware"]["cpus"]
    assert m["runs"][-1]["complete"] is True and m["planned"] == {"tiny/fp32": 24, "tiny/bf16": 24}
    assert {(h["model"], h["precision"], h["torch_threads"]) for h in m["runs"][-1]["hosts"]} == {
        ("tiny", "fp32", 1),
        ("tiny", "bf16", 1),
    }


def test_models_table_has_one_row_per_host(tiny_run: tuple[spec.Sweep, Path]) -> None:
    from rayq.store.dataset import LAYERS_SCHEMA, MODELS_SCHEMA

    _, out = tiny_run
    models = pl.scan_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert set(models.columns) == set(MODELS_SCHEMA.names) | {"model", "precision"}
    assert models.height == 2 and (models["load_status"] == "ok").all()
    fp = dict(zip(models["precision"], models["footprint_bytes"], strict=True))
    assert 1.9 < fp["fp32"] / fp["bf16"] <= 2.0  # half the bytes per parameter (buffers stay fp32)
    assert models["n_params"].n_unique() == 1 and (models["peak_memory_mb"] > 0).all()
    assert (models["held_bytes"] == models["footprint_bytes"]).all()  # dense models hide no scales
    assert models["reference_tokens"].list.len().min() > 0 and models["measure_error"].is_null().all()
    layers = pl.scan_parquet(str(out / "layers" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert set(layers["kind"].unique()) == {"attn.attn", "att.proj", "mlp.fc", "mlp.proj", "other"}
    bf16 = layers.filter((pl.col("precision") == "bf16") & (pl.col("kind") != "other"))["sqnr_db"]
    assert bf16.len() == 14 and 40 < bf16.mean() < 70  # 2 layers x 7 linears; bf16 keeps ~8 bits
    documented = (REPO / "docs" / "schema.md").read_text()
    for col in [*MODELS_SCHEMA.names, *LAYERS_SCHEMA.names]:
        assert f"`{col}`" in documented, f"models/layers column {col} is not documented in docs/schema.md"


def test_duckdb_reads_the_same_rows_as_polars(tiny_run: tuple[spec.Sweep, Path]) -> None:
    import duckdb

    _, out = tiny_run
    cols = "completion_id, model, precision, temperature, top_k, text, duplicate_content_words"
    duck = duckdb.sql(
        f"select {cols} from read_parquet('{out}/completions/*/*/*.parquet', hive_partitioning=true)"
    ).pl()
    pol = read_all(out).select(cols.split(", "))
    assert duck.height == 48
    assert duck.sort("completion_id").equals(pol.sort("completion_id"))


def test_a_finished_sweep_is_not_redone(tiny_run: tuple[spec.Sweep, Path]) -> None:
    sweep, out = tiny_run
    before = read_all(out).sort("completion_id")
    result = run_sweep(sweep, out, quiet=True)
    assert result.written == 0 and result.done_before == 48 and result.complete
    assert read_all(out).sort("completion_id").equals(before)


def test_same_sweep_twice_gives_identical_text(tiny_run: tuple[spec.Sweep, Path], tmp_path: Path) -> None:
    sweep, out = tiny_run
    run_sweep(sweep, tmp_path, quiet=True)
    a = read_all(out).select("completion_id", "text").sort("completion_id")
    b = read_all(tmp_path).select("completion_id", "text").sort("completion_id")
    assert a.equals(b)
    assert a["text"].n_unique() > 10  # sampling really varied the text


def test_status_shows_done_over_total(tiny_run: tuple[spec.Sweep, Path]) -> None:
    _, out = tiny_run
    proc = subprocess.run([*rayq_cmd(), "status", str(out)], capture_output=True, text=True, check=True)
    assert re.search(r"tiny/fp32\s+24\s+24\s+24\s+0", proc.stdout), proc.stdout
    assert re.search(r"all\s+48\s+48", proc.stdout)


def test_sigkill_then_resume_gives_each_completion_exactly_once(tmp_path: Path, tiny_model: Path) -> None:
    data = sweep_dict(
        tiny_model,
        grid={"max_new_tokens": [24, 48], "temperature": [0.5, 0.8, 1.0], "top_k": [1, 5, 50]},
        seeds=4,
        runtime={"num_cpus": 1, "flush_every": 2},
    )
    f = write_sweep(tmp_path / "sweep.yaml", data)
    out = tmp_path / "out"
    planned = 3 * 2 * 3 * 3 * 4
    # A private Ray temp root, so the processes the killed driver leaves behind can be found.
    ray_tmp = Path(f"/tmp/rq{os.getpid()}")
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    cmd = [*rayq_cmd(), "run", str(f), "--output", str(out)]
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 240
        while len(list(out.glob("completions/*/*/*.parquet"))) < 4:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "no results written in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill = read_all(out)
        assert 0 < at_kill.height < planned

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert second.returncode == 0, second.stdout + second.stderr
        done_before = int(re.search(r"(\d+) already in", second.stdout).group(1))  # type: ignore[union-attr]
        assert done_before >= at_kill.height

        files = list(out.glob("completions/*/*/*.parquet"))
        for p in files:
            pq.read_table(p)  # every file readable
        df = read_all(out)
        assert df.height == planned and df["completion_id"].n_unique() == planned
        runs = json.loads((out / "manifest.json").read_text())["runs"]
        assert len(runs) == 2 and "ended_at" not in runs[0]
        assert runs[1]["written"] == planned - done_before  # nothing redone
        assert not any(ray_tmp.glob("**/*.parquet"))
    finally:
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
