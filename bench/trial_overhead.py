"""Tune's cost per trial when trials are short: first-in-first-out against rayq's newest-first.

    .venv/bin/python bench/trial_overhead.py [--hosts 8] [--depth 2] [--blocks 150] [--block-s 0.5]
    .venv/bin/python bench/trial_overhead.py --tiny   # 2 hosts x 3 blocks of 0.05 s, for the tests

A searcher like rayq's hands out blocks for `--hosts` stand-in hosts (actors that sleep
`--block-s` per block), at most `--depth` in flight per host; every trial asks for the same
resources, so Tune reuses actors. It runs twice on a fresh local Ray: with Tune's default
FIFO trial scheduler and with rayq's `NewestFirst` (rayq/execution/launcher.py), and prints per run
the wall time against the ideal (blocks x block time, hosts in parallel), trials per second,
the actors Tune started for trials, and how many of those it killed unused.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(hosts: int, depth: int, blocks: int, block_s: float, newest_first: bool) -> str:
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "600"
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(8, 2 * hosts))
    import ray
    from ray import tune
    from ray.tune.search import Searcher

    from rayq.execution import launcher

    counts: collections.Counter[str] = collections.Counter()

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("Scheduled new ACTOR"):
                counts["started"] += 1
            elif msg.startswith("Removing ORIGINAL ACTOR"):
                counts["killed unused"] += 1

    tc_log = logging.getLogger("ray.tune.execution.tune_controller")
    tc_log.setLevel(logging.DEBUG)
    tc_log.addHandler(Count())
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class StandIn:
        def work(self, seconds: float) -> None:
            time.sleep(seconds)

    handles = [StandIn.options(name=f"standin-{h}").remote() for h in range(hosts)]
    ray.get([h.__ray_ready__.remote() for h in handles])

    def trial(config: dict[str, float]) -> None:
        host = ray.get_actor(f"standin-{int(config['host'])}")
        ray.get(host.work.remote(config["seconds"]))
        tune.report({"done": 1})

    queued = dict.fromkeys(range(hosts), blocks)
    in_flight: collections.Counter[int] = collections.Counter()
    owner: dict[str, int] = {}

    class Blocks(Searcher):
        def suggest(self, trial_id: str) -> dict[str, float] | str | None:
            free = [h for h in range(hosts) if queued[h] and in_flight[h] < depth]
            if not free:
                return Searcher.FINISHED if not any(queued.values()) else None
            h = min(free, key=lambda x: in_flight[x])
            queued[h] -= 1
            in_flight[h] += 1
            owner[trial_id] = h
            return {"host": h, "seconds": block_s}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            in_flight[owner.pop(trial_id)] -= 1

    storage = tempfile.mkdtemp(prefix="rayq-bench-trials-")
    t0 = time.time()
    grid = tune.Tuner(
        tune.with_resources(trial, {"cpu": 0, "memory": 1}),
        tune_config=tune.TuneConfig(
            search_alg=Blocks(),
            scheduler=launcher.newest_first() if newest_first else None,
            num_samples=-1,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=storage, verbose=0),
    ).fit()
    wall = time.time() - t0
    ray.shutdown()
    shutil.rmtree(storage, ignore_errors=True)
    n = hosts * blocks
    assert len(grid) == n and not grid.errors, (len(grid), grid.errors[:1])  # every block ran, none failed
    return (
        f"{'newest-first' if newest_first else 'fifo'}: {n} trials in {wall:.1f} s (ideal {blocks * block_s:.1f} s), "
        f"{n / wall:.1f} trials/s; trial actors started {counts['started']}, killed unused {counts['killed unused']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=150, help="blocks per host")
    ap.add_argument("--block-s", type=float, default=0.5, help="seconds a stand-in host takes per block")
    ap.add_argument("--one", choices=["fifo", "newest-first"], help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="2 hosts, 3 blocks each of 0.05 s: seconds, for the tests")
    args = ap.parse_args()
    if args.tiny:  # passed on to both runs with the rest of the command line
        args.hosts, args.depth, args.blocks, args.block_s = 2, 2, 3, 0.05
    if args.one:
        print(one_run(args.hosts, args.depth, args.blocks, args.block_s, args.one == "newest-first"), flush=True)
        return
    for mode in ("fifo", "newest-first"):  # each in a fresh process: a fresh Ray, nothing shared
        cmd = [sys.executable, __file__, "--one", mode, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
