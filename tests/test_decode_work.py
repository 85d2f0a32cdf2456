"""The study at batch speed, timed the paper's way: a serial sample per grid cell, the rest
batched, and greedy outputs decoded once (runtime.serial_sample, runtime.share_greedy)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest

from rayq.execution.driver import run_sweep
from rayq.planning import greedy, planner, spec
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


def test_greedy_is_the_argmax_path_and_sampling_is_do_sample_at_a_positive_temperature() -> None:
    p = {"do_sample": True, "temperature": 0.7, "top_k": 50, "max_new_tokens": 4, "repetition_penalty": 1.0}
    assert greedy.samples(p) and not greedy.is_greedy(p)
    assert greedy.samples({**p, "top_k": 1}) and greedy.is_greedy({**p, "top_k": 1})  # drawn from one token
    assert not greedy.samples({**p, "temperature": 0.0}) and greedy.is_greedy({**p, "temperature": 0.0})
    assert not greedy.samples({**p, "do_sample": False}) and greedy.is_greedy({**p, "do_sample": False})
    row = {"prompt": "Hi", "params": {**p, "top_k": 1}, "protocol": None}
    assert greedy.greedy_key(row) == ("Hi", 4, 1.0)
    assert greedy.greedy_key({**row, "protocol": "serial"}) is None  # the serial sample decodes itself
    assert greedy.greedy_key({**row, "params": p}) is None


def test_the_plan_and_the_host_group_greedy_rows_by_one_key_even_for_a_repeated_prompt(tiny_model: Path) -> None:
    """The plan counts the rows that copy a greedy output with the key the host shares them by
    (rayq.planning.greedy.greedy_key): the prompt's text, which the model reads and the id hashes.

    A sweep file refuses a prompt listed twice, so there the text and the index group the same
    rows (and no `shares_output_of` written before changes); built past that check, prompt 3
    repeats prompt 0, and its greedy rows are the same outputs (the same ids, even): one key
    for both indices, in the plan as in the host.
    """
    base = _sweep(tiny_model, serial_sample=1)
    sweep = base.model_copy(update={"prompt_texts": (*base.prompt_texts, base.prompt_texts[0])})
    for s in (base, sweep):
        rows = [c.to_dict() for c in planner.iter_completions(s, s.spec.models[0], "fp32")]
        keys = [k for k in map(greedy.greedy_key, rows) if k is not None]  # what the host keys each row by
        assert planner.decode_work(s).shared == len(keys) - len(set(keys))
    # base: 6 greedy cells x (6 rows - 1 serial) = 30 greedy rows, 3 texts x 2 lengths = 6 outputs: 24 copies.
    # The repeat adds 2 seeds x 6 greedy cells = 12 rows and no output (by index it would add 2).
    assert planner.decode_work(base).shared == 24 and planner.decode_work(sweep).shared == 24 + 12
