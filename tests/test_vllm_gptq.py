"""rayq's GPTQ checkpoint on vLLM's CPU kernel and on the transformers host, in one run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import polars as pl
import pytest

from rayq.catalog import vllm_support
from tests.conftest import QUIET, rayq_cmd, vllm_sweep, write_sweep

REPO = Path(__file__).resolve().parent.parent

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
    data = vllm_sweep(
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
