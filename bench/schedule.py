"""The founding study on a simulated cluster: how close rayq's scheduling gets to the best possible.

    .venv/bin/python bench/schedule.py [--shapes 1x8,2x8] [--seconds-per-hour 31] [--tiny]

`sweeps/roy2023.yaml` (42 hosts, 2,646 blocks, 264,600 completions) runs on a real
`ray.cluster_utils.Cluster` with logical GPUs, once per shape (`NxG`: N nodes of G GPUs of
80 GB). Every host is a stand-in that sleeps its predicted time (rayq.planning.throughput: Table 7 or
the bandwidth estimate), scaled so one predicted hour lasts `--seconds-per-hour`; everything
else is the real driver: placement, the scheduler, Ray Tune (one trial per block), the
Parquet store and compaction. The stand-in is a host put together as the real ones are
(rayq.host.protocol.Host): rayq's row runner over an engine that sleeps instead of decoding.
The one change to the sweep is `flush_every: 100`, one file per block, so the store writes
2,646 files rather than 26,460.

Per shape it prints:
- the makespan: from the first host's start to the last host's end;
- the lower bound: max(total GPU-time / GPUs, the longest host), from the same predictions;
- Tune's overhead per trial: the time hosts sat idle (alive, holding their GPUs, no block
  to work on) divided by the trials, and the trials per second the driver sustained;
and last `scheduler efficiency: 0.NN` (lower bound / makespan; the smaller over the shapes).

Tune spends a fixed time between two trials (tens to hundreds of ms on a small machine), so
the shorter the blocks the more of the makespan it takes: what a result means depends on the
mean block length it prints. The default, 31 s per predicted hour, gives a mean block of 2.38 s
on 1x8 (a lower bound of 908 s): the block length that 4 s per hour gave before the sweep
decoded batched and the plan's prediction fell from ~230 to ~30 GPU-hours (docs/cluster.md).
Both shapes take ~30 minutes.
`--tiny` runs a cut of the sweep (4 hosts, 16 blocks, on 1x2) with its lower bound scaled to
8 s: the same code path in under a minute, where Tune's fixed cost per trial weighs far more.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayq.host.config import HostConfig  # noqa: E402 - after the repository is on the path
from rayq.host.engine import Decoded, Generated, Measured  # noqa: E402
from rayq.host.runner import HostRunner  # noqa: E402


class StandInEngine:
    """An engine that sleeps for its predicted time instead of decoding (rayq.host.engine.Engine).

    Every completion takes its max_new_tokens at the host's predicted batched rate, and loading
    takes the rest of the host's predicted time (LOAD_S), so a host lasts exactly its prediction.
    """

    name = "stand-in"
    RATES: ClassVar[dict[str, float]] = {}  # model/precision -> predicted tokens/s
    LOAD_S: ClassVar[dict[str, float]] = {}  # model/precision -> predicted seconds besides decoding
    SCALE: ClassVar[float] = 1.0  # seconds slept per predicted second

    def __init__(self, config: HostConfig) -> None:
        self.key = str(config.key)
        now = time.time()
        self.settings: dict[str, Any] = {"created": now, "last_end": now, "busy_s": 0.0}  # read back by run_shape
        self.context_length: int | None = None
        self.batch_size = 1

    def load(self) -> None:
        time.sleep(self.LOAD_S[self.key] * self.SCALE)
        self.settings["last_end"] = time.time()

    def measure(self) -> Measured:
        return Measured()

    def device(self) -> str:
        return "stand-in"

    def sizes(self) -> dict[str, Any]:
        return {"n_params": None, "footprint_bytes": None}

    def weight_columns(self) -> dict[str, Any]:
        return {}

    def decode_serial(self, completion: dict[str, Any]) -> Generated:
        return self._output(completion, self._sleep([completion]))

    def decode_batched(self, completions: list[dict[str, Any]]) -> Iterator[Decoded]:
        seconds = self._sleep(completions) / len(completions)
        for i, c in enumerate(completions):
            yield Decoded(i, len(completions), self._output(c, seconds))

    def _sleep(self, completions: list[dict[str, Any]]) -> float:
        seconds = sum(c["params"]["max_new_tokens"] for c in completions) / self.RATES[self.key] * self.SCALE
        time.sleep(seconds)
        self.settings["busy_s"] += seconds
        self.settings["last_end"] = time.time()
        return seconds

    @staticmethod
    def _output(c: dict[str, Any], seconds: float) -> Generated:
        return Generated("", 0, c["params"]["max_new_tokens"], seconds, None, 0.0)


class StandInHost:
    """A model host (rayq.host.protocol.Host) put together as the real ones are: rayq's own row
    runner over an engine, here one that sleeps. The launcher, the host pool and the store see
    the real thing: streamed parts, rows, the models row."""

    def __init__(self, config: HostConfig) -> None:
        # Greedy rows sleep too: LOAD_S already holds what sharing saves (run_shape), as it does
        # the serial timing sample's slower rate.
        self.runner = HostRunner(replace(config, share_greedy=False), StandInEngine(config))

    def generate_stream(self, completions: list[dict[str, Any]], every: int) -> Iterator[list[dict[str, Any]]]:
        yield from self.runner.generate_stream(completions, every)

    def info(self) -> dict[str, Any]:
        return self.runner.info()

    def reference(self) -> bytes | None:
        return self.runner.reference()


def load_sweep(tiny: bool) -> Any:
    """The Roy 2023 sweep with one file per block (flush_every 100) on 80 GB GPUs; `tiny`: a cut of it
    (TINY: 2 models x 2 precisions, 2 prompts, 8 grid cells; 16 blocks of 4 completions)."""
    import yaml

    from rayq.planning import spec

    path = ROOT / "sweeps" / "roy2023.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["runtime"].update(gpu_memory="80GB", flush_every=100)
    if tiny:
        data["models"] = [m for m in data["models"] if m["name"] in TINY["models"]]
        data.update(name="roy2023-tiny", precisions=TINY["precisions"], prompts=data["prompts"][: TINY["prompts"]])
        data["grid"].update(TINY["grid"])
    return spec.parse(data, str(path), path.parent)


TINY: dict[str, Any] = {
    "models": ["stablelm-3b", "redpajama-3b"],
    "precisions": ["bnb-nf4", "bf16"],
    "prompts": 2,
    "grid": {"max_new_tokens": [50, 100], "temperature": [0.5, 1.0], "top_k": [1, 50]},
    "shapes": "1x2",
    "bound_s": 8.0,  # the lower bound, in seconds here: the predictions are scaled to it
}


def run_shape(nodes: int, gpus: int, seconds_per_hour: float | None, sweep: Any) -> dict[str, float]:
    """One shape's run; `seconds_per_hour` None scales the predictions so the lower bound lasts TINY's bound_s."""
    import polars as pl

    from rayq.execution.driver import run_sweep
    from rayq.execution.progress import fmt_duration
    from rayq.planning import placement, planner
    from tests.conftest import ray_cluster

    predicted = placement.plan_placement(sweep, placement.named_cluster(gpus, "80GB", nodes))
    if seconds_per_hour is None:
        seconds_per_hour = TINY["bound_s"] * 3600 / predicted.lower_bound_s
    scale = seconds_per_hour / 3600
    StandInEngine.RATES = {p.key: p.rate.tokens_per_s for p in predicted.scheduled if p.rate}
    StandInEngine.LOAD_S = {
        p.key: p.predicted_s - p.tokens / p.rate.tokens_per_s for p in predicted.scheduled if p.rate
    }
    StandInEngine.SCALE = scale
    bound = predicted.lower_bound_s * scale
    n_trials = len(planner.block_tokens(sweep))  # one trial per block
    mean_block = sum(p.predicted_s for p in predicted.scheduled) * scale / n_trials
    print(
        f"{nodes}x{gpus}: {len(predicted.scheduled)} hosts; predicted {fmt_duration(predicted.makespan_s)} "
        f"(lower bound {fmt_duration(predicted.lower_bound_s)}) -> {bound:.0f} s here at {seconds_per_hour:.4g} s/h; "
        f"mean block {mean_block:.2f} s",
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
    shutil.rmtree(out.parent, ignore_errors=True)  # kept only when the run fails, to look at
    return {"efficiency": efficiency, "makespan": makespan, "bound": bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", help="comma-separated NxG: N nodes of G logical 80GB GPUs (default 1x8,2x8)")
    ap.add_argument("--seconds-per-hour", type=float, help="seconds slept per predicted hour (default 31)")
    ap.add_argument(
        "--tiny",
        action="store_true",
        help=f"a cut of the sweep (4 hosts, 16 blocks) on {TINY['shapes']}, its lower bound scaled to "
        f"{TINY['bound_s']:g} s: the whole code path in well under a minute",
    )
    args = ap.parse_args()
    sweep = load_sweep(args.tiny)
    shapes = args.shapes or (TINY["shapes"] if args.tiny else "1x8,2x8")
    per_hour = args.seconds_per_hour if args.seconds_per_hour or args.tiny else 31.0
    results = []
    for shape in shapes.split(","):
        n, g = (int(x) for x in shape.split("x"))
        results.append(run_shape(n, g, per_hour, sweep))
    print(f"scheduler efficiency: {min(r['efficiency'] for r in results):.2f}")


if __name__ == "__main__":
    main()
