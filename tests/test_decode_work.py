"""The study at batch speed, timed the paper's way: a serial sample per grid cell, the rest
batched, and greedy outputs decoded once (runtime.serial_sample, runtime.share_greedy)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest

from rayq.execution.driver import run_sweep
from rayq.planning import planner, spec
from tests.conftest import rayq_cmd, sweep_dict

REPO = Path(__file__).resolve().parent.parent
GRID = {"max_new_tokens": [4, 8], "temperature": [0.0, 0.7], "top_k": [1, 50]}


def _sweep(tiny_model: Path, **runtime: object) -> spec.Sweep:
    data = sweep_dict(tiny_model, grid=GRID, seeds=2, runtime={"num_cpus": 1, "flush_every": 4, **runtime})
    return spec.parse(data, "tiny.yaml")


def test_the_plan_counts_serial_batched_and_shared_rows(tiny_model: Path) -> None:
    sweep = _sweep(tiny_model, serial_sample=1)
    w = planner.decode_work(sweep)
    # 8 cells of 3 prompts x 2 seeds; one serial row per cell. Greedy cells: temperature 0 (both
    # top_k) and top_k 1 at 0.7, so 3 per length: 18 rows, 3 serial, 15 sharing 3 outputs (one per prompt).
    assert (w.total, w.serial, w.shared, w.batched) == (48, 8, 2 * (15 - 3), 48 - 8 - 24)
    marked = [c for c in planner.iter_completions(sweep, sweep.spec.models[0], "fp32") if c.protocol == "serial"]
    assert len(marked) == 8 and {(c.prompt_id, c.seed) for c in marked} == {(0, 0)}
    by = _sweep(tiny_model, serial_sample=2, serial_sample_by=["max_new_tokens"])
    marked = [c for c in planner.iter_completions(by, by.spec.models[0], "fp32") if c.protocol == "serial"]
    assert len(marked) == 4 and {dict(c.params)["temperature"] for c in marked} == {0.0}
    assert planner.decode_work(_sweep(tiny_model, share_greedy=False)).shared == 0
    with pytest.raises(spec.SpecError, match="serial_sample needs protocol: batched"):
        spec.parse(sweep_dict(tiny_model, runtime={"protocol": "serial", "serial_sample": 1}), "t.yaml")


def test_plan_shows_the_work_saved(tmp_path: Path) -> None:
    p = subprocess.run(
        [*rayq_cmd(), "plan", "sweeps/roy2023.yaml"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "6300 completions: 630 serial (timing sample: 1 per grid cell), 4950 batched, 720 copy" in p.stdout
    assert "5670 of 6300 completions per host not decoded one at a time, 720 not decoded at all" in p.stdout


def test_a_run_decodes_each_greedy_output_once_and_times_a_serial_sample(
    tmp_path: Path, tiny_model: Path, local_ray: None
) -> None:
    sweep = _sweep(tiny_model, serial_sample=1, block_by=["temperature"])
    result = run_sweep(sweep, tmp_path / "out", quiet=True)
    assert result.complete and result.failed == 0
    df = pl.scan_parquet(str(tmp_path / "out" / "completions" / "**" / "*.parquet")).collect()
    assert df.height == 48 and df["completion_id"].n_unique() == 48
    w = planner.decode_work(sweep)
    serial = df.filter(pl.col("protocol") == "serial")
    assert serial.height == w.serial == 8 and (serial["batch_size"] == 1).all()
    assert serial.select("prompt_id", "seed").unique().rows() == [(0, 0)]
    shared = df.filter(pl.col("shares_output_of").is_not_null())
    assert shared.height == w.shared == 24
    source = df.filter(pl.col("shares_output_of").is_null()).select(
        pl.col("completion_id").alias("shares_output_of"),
        pl.col("text").alias("source_text"),
        pl.col("prompt").alias("source_prompt"),
        pl.col("max_new_tokens").alias("source_max_new_tokens"),
        pl.col("temperature").alias("source_temperature"),
        pl.col("top_k").alias("source_top_k"),
    )
    joined = shared.join(source, on="shares_output_of", how="left")
    assert joined["source_text"].null_count() == 0  # every source is a row of the dataset, decoded itself
    assert (joined["text"] == joined["source_text"]).all()
    assert (joined["prompt"] == joined["source_prompt"]).all()
    assert (joined["max_new_tokens"] == joined["source_max_new_tokens"]).all()
    greedy = (pl.col("temperature") == 0) | (pl.col("top_k") == 1)
    assert joined.filter(~greedy).height == 0
    assert joined.filter(~((pl.col("source_temperature") == 0) | (pl.col("source_top_k") == 1))).height == 0
    # A sampled row never shares, and the seeds of one greedy output really are different completions.
    assert df.filter(~greedy & pl.col("shares_output_of").is_not_null()).height == 0
    assert joined["seed"].n_unique() == 2
