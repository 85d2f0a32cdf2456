"""The founding study on a simulated cluster: how close rayq's scheduling gets to the best possible.

    .venv/bin/python bench/schedule.py [--shapes 1x8,2x8] [--seconds-per-hour 4]

`sweeps/roy2023.yaml` (42 hosts, 2,646 blocks, 264,600 completions) runs on a real
`ray.cluster_utils.Cluster` with logical GPUs, once per shape (`NxG`: N nodes of G GPUs of
80 GB). Every host is a stand-in that sleeps its predicted time (rayq.planning.throughput: Table 7 or
the bandwidth estimate), scaled so one predicted hour lasts `--seconds-per-hour`; everything
else is the real driver: placement, the scheduler, Ray Tune (one trial per block), the
Parquet store and compaction. The one change to the sweep is `flush_every: 100`, one file
per block, so the store writes 2,646 files rather than 26,460.

Per shape it prints:
- the makespan: from the first host's start to the last host's end;
- the lower bound: max(total GPU-time / GPUs, the longest host), from the same predictions;
- Tune's overhead per trial: the time hosts sat idle (alive, holding their GPUs, no block
  to work on) divided by the trials, and the trials per second the driver sustained;
and last `scheduler efficiency: 0.NN` (lower bound / makespan; the smaller over the shapes).

Tune spends a fixed time between two trials (tens to hundreds of ms on a small machine), so
the shorter the scale the more of the makespan it takes: the default, 4 s per predicted hour,
gave 0.918 (1x8) and 0.925 (2x8) here; 3 s gave 0.879 and 0.910. It takes ~30 minutes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class StandInHost:
    """A model host that sleeps for its predicted time instead of decoding (same interface as ModelHost)."""

    RATES: ClassVar[dict[str, float]] = {}  # model/precision -> predicted tokens/s
    LOAD_S: ClassVar[dict[str, float]] = {}  # model/precision -> predicted load seconds
    SCALE: ClassVar[float] = 1.0  # seconds slept per predicted second

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The host pool passes ModelHost's arguments; bind them to its signature to pick ours.
        from rayq.host.transformers_host import ModelHost

        given = inspect.signature(ModelHost).bind(*args, **kwargs).arguments
        sweep, model, precision, placement = given["sweep"], given["model"], given["precision"], given.get("placement")
        self.created = time.time()
        self.sweep = sweep
        self.key = f"{model['name']}/{precision}"
        self.model_name, self.precision = model["name"], precision
        self.load_s = self.LOAD_S[self.key] * self.SCALE
        time.sleep(self.load_s)
        self.busy_s = 0.0
        self.tokens = 0
        self.last_end = time.time()
        self.placement = placement or {}

    def generate(self, completions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from rayq.store.dataset import completion_row

        tokens = sum(c["params"]["max_new_tokens"] for c in completions)
        seconds = tokens / self.RATES[self.key] * self.SCALE
        time.sleep(seconds)
        self.busy_s += seconds
        self.tokens += tokens
        self.last_end = time.time()
        now = datetime.now(UTC)
        return [
            completion_row(
                self.sweep,
                c,
                status="ok",
                text="",
                n_new_tokens=c["params"]["max_new_tokens"],
                latency_s=seconds / len(completions),
                node="stand-in",
                device="stand-in",
                batch_size=1,
                protocol="serial",
                finished_at=now,
            )
            for c in completions
        ]

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "precision": self.precision,
            "device": "stand-in",
            "load_s": self.load_s,
            "load_status": "ok",
            "num_gpus": self.placement.get("num_gpus"),
            "settings": {"created": self.created, "last_end": self.last_end, "busy_s": self.busy_s},
            "generated_tokens": self.tokens,
            "generate_s": self.busy_s,
        }


def run_shape(nodes: int, gpus: int, seconds_per_hour: float) -> dict[str, float]:
    import polars as pl

    from rayq.execution.driver import run_sweep
    from rayq.planning import placement, planner, spec
    from tests.conftest import ray_cluster

    sweep = spec.load(ROOT / "sweeps" / "roy2023.yaml")
    runtime = sweep.spec.runtime.model_copy(update={"gpu_memory": "80GB", "flush_every": 100})
    sweep = sweep.model_copy(update={"spec": sweep.spec.model_copy(update={"runtime": runtime})})
    scale = seconds_per_hour / 3600
    predicted = placement.plan_placement(sweep, placement.named_cluster(gpus, "80GB", nodes))
    StandInHost.RATES = {p.key: p.rate.tokens_per_s for p in predicted.scheduled if p.rate}
    StandInHost.LOAD_S = {p.key: p.predicted_s - p.tokens / p.rate.tokens_per_s for p in predicted.scheduled if p.rate}
    StandInHost.SCALE = scale
    bound = predicted.lower_bound_s * scale
    print(
        f"{nodes}x{gpus}: {len(predicted.scheduled)} hosts; predicted {predicted.makespan_s / 3600:.1f} h "
        f"(lower bound {predicted.lower_bound_s / 3600:.1f} h) -> {bound:.0f} s here at {seconds_per_hour:g} s/h",
        flush=True,
    )
    out = Path(tempfile.mkdtemp(prefix="rayq-bench-schedule-")) / "out"
    with ray_cluster([{"num_cpus": 2, "num_gpus": gpus}] * nodes) as cluster:
        t0 = time.time()
        result = run_sweep(sweep, out, address=cluster.address, quiet=True, host_class=StandInHost, time_scale=scale)
        wall = time.time() - t0
    assert result.complete and result.stalled is None, result.errors
    models = pl.read_parquet(str(out / "models" / "**" / "*.parquet"), hive_partitioning=True)
    spans = [json.loads(s) for s in models["settings_json"]]
    start = min(s["created"] for s in spans)
    end = max(s["last_end"] for s in spans)
    makespan = end - start
    held = sum((s["last_end"] - s["created"]) * g for s, g in zip(spans, models["num_gpus"], strict=True))
    busy = sum((s["busy_s"]) * g for s, g in zip(spans, models["num_gpus"], strict=True))
    loads = sum(load * g for load, g in zip(models["load_s"], models["num_gpus"], strict=True))
    files = sum(1 for _ in (out / "completions").glob("*/*/*.parquet"))  # compacted: one file per host
    n_trials = len(planner.block_tokens(sweep))  # one trial per block
    rows = pl.scan_parquet(str(out / "completions" / "**" / "*.parquet"), hive_partitioning=True)
    n_rows = rows.select(pl.len()).collect().item()
    n_ids = rows.select(pl.col("completion_id").n_unique()).collect().item()
    idle = held - busy - loads  # GPU-seconds a host held its GPUs with no block to decode
    efficiency = bound / makespan
    print(
        f"{nodes}x{gpus}: makespan {makespan:.1f} s; lower bound {bound:.1f} s; run_sweep wall {wall:.1f} s; "
        f"{n_rows} rows, {n_ids} unique, {files} files after compaction",
        flush=True,
    )
    print(
        f"{nodes}x{gpus}: Tune overhead per trial: {idle / n_trials * 1000:.1f} ms of host idle time "
        f"(GPU-seconds; {idle / held * 100:.1f}% of the GPU-time held); driver: {n_trials / makespan:.1f} trials/s",
        flush=True,
    )
    print(f"{nodes}x{gpus}: efficiency {efficiency:.3f}", flush=True)
    return {"efficiency": efficiency, "makespan": makespan, "bound": bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1x8,2x8", help="comma-separated NxG: N nodes of G logical 80GB GPUs")
    ap.add_argument("--seconds-per-hour", type=float, default=4.0, help="seconds slept per predicted hour")
    args = ap.parse_args()
    results = []
    for shape in args.shapes.split(","):
        n, g = (int(x) for x in shape.split("x"))
        results.append(run_shape(n, g, args.seconds_per_hour))
    print(f"scheduler efficiency: {min(r['efficiency'] for r in results):.2f}")


if __name__ == "__main__":
    main()
