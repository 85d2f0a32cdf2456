"""The GPU paths, run by `make gpu-check` on a machine with CUDA; skipped where there is none.

They could not be run where rayq is developed (no GPU): what they found on a GPU goes into
docs/engines.md's matrix when they are run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch

from tests.conftest import rayq_cmd, write_sweep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)"),
]
REPO = Path(__file__).resolve().parent.parent
TRANSFORMERS = ["fp32", "bf16", "fp16", "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq", "gptq-int4"]
VLLM = ["fp32", "bf16", "fp16", "bnb-nf4-dq"]


def _run(tmp_path: Path, name: str, precisions: list[str], **runtime: object) -> tuple[pl.DataFrame, pl.DataFrame]:
    data = {
        "name": name,
        "models": [{"name": "smol", "bundled": "smollm2-135m-instruct"}],
        "precisions": precisions,
        "prompts": ["Life in London", "Hello, my name is"],
        "grid": {"max_new_tokens": [32], "temperature": [0.0, 0.7], "top_k": [50]},
        "runtime": {"num_cpus": 1, **runtime},
    }
    out = tmp_path / name
    p = subprocess.run(
        [*rayq_cmd(), "run", str(write_sweep(tmp_path / f"{name}.yaml", data)), "--output", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=1800,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect()
    models = pl.read_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True)
    return rows, models


@pytest.mark.parametrize(("engine", "precisions"), [("transformers", TRANSFORMERS), ("vllm", VLLM)])
def test_every_precision_on_cuda(tmp_path: Path, engine: str, precisions: list[str]) -> None:
    rows, _models = _run(tmp_path, engine, precisions, engine=engine, num_gpus=1)
    assert rows.height == 4 * len(precisions) and set(rows["status"]) == {"ok"}
    assert rows["device"].str.starts_with("cuda").all() and set(rows["engine"]) == {engine}
    assert (rows["peak_memory_mb"] > 0).all()
    print(rows.group_by("precision").agg(pl.col("tokens_per_s").mean()).sort("precision"))


def test_a_completion_past_the_gpu_memory_is_an_oom_row() -> None:
    from rayq.host.config import HostConfig
    from rayq.host.transformers_host import ModelHost

    # The model (0.5 GB in fp32) fits this process's share; a 16k-token KV cache does not.
    torch.cuda.set_per_process_memory_fraction(min(1.0, 0.9e9 / torch.cuda.get_device_properties(0).total_memory))
    try:
        config = HostConfig(sweep="gpu", model="smol", source="bundled:smollm2-135m-instruct", precision="fp32")
        host = ModelHost(config)
        assert host.info()["load_error"] is None, host.info()["load_error"]
        params = {"temperature": 0.0, "top_k": 50, "top_p": 1.0, "do_sample": False, "repetition_penalty": 1.0}
        big = {"completion_id": "big", "prompt_id": 0, "prompt": "Life in London " * 2000, "seed": 0,
               "sampling_seed": 1, "params": {**params, "max_new_tokens": 8000}}  # fmt: skip
        small = {**big, "completion_id": "small", "prompt": "Life in London", "params": {**params, "max_new_tokens": 8}}
        out = {r["completion_id"]: r for r in host.generate([big, small])}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert out["big"]["status"] == "oom" and "OutOfMemoryError" in out["big"]["error"]
    assert out["small"]["status"] == "ok"  # the host goes on after an out-of-memory row


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a sharded load needs two GPUs")
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_a_sharded_host_spans_two_gpus(tmp_path: Path, engine: str) -> None:
    rows, models = _run(tmp_path, f"sharded-{engine}", ["bf16"], engine=engine, num_gpus=2)
    assert set(rows["status"]) == {"ok"}
    m = models.row(0, named=True)
    assert m["num_gpus"] == 2 and len(m["gpu_ids"].split(",")) == 2
    settings = json.loads(m["settings_json"])
    if engine == "vllm":
        assert settings["tensor_parallel_size"] == 2
    else:
        assert len(settings["device_map"]) == 2
