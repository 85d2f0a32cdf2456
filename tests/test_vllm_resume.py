"""A `rayq run` on the vLLM engine killed with SIGKILL, then resumed: each completion once."""

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

from tests.conftest import QUIET, rayq_cmd, vllm_sweep, write_sweep

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_vllm_run_killed_with_sigkill_resumes_with_each_completion_once(tmp_path: Path) -> None:
    data = vllm_sweep(seeds=4, runtime={"engine": "vllm", "num_cpus": 1, "flush_every": 4, "block_by": ["top_k"]})
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
        shutil.rmtree(ray_tmp, ignore_errors=True)
