"""How long a resume takes to skip finished work, for a 6,300-completion sweep.

One (model, precision) of the Roy 2023 grid: 10 prompts x 10 max_new_tokens x 9
temperatures x 7 top_k = 6,300 completions. The rows are made up (a fake generator), as
the cost measured is rayq's, not the model's: reading the ids on disk, diffing them against
the plan, and compacting. Each stage is timed in this one process, side by side.

    .venv/bin/python bench/resume.py
    .venv/bin/python bench/resume.py --tiny   # the first 2 prompts (1,260 completions), each stage once

The last line is `resume skip N completions: N.NNN s`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rayq.execution.driver import run_sweep
from rayq.planning import planner, spec
from rayq.store.dataset import SCHEMA, Store

REPO = Path(__file__).resolve().parent.parent


def roy_one_host(model_dir: Path, prompts: int | None = None) -> spec.Sweep:
    roy = spec.load(REPO / "sweeps" / "roy2023.yaml").spec.model_dump()
    roy.update(models=[{"name": "fake", "path": str(model_dir)}], precisions=["fp32"], output=None)
    roy["prompts"] = roy["prompts"][:prompts]
    roy["runtime"].update(num_gpus=0.0, num_cpus=1.0)
    return spec.parse(roy, "roy-one-host")


def fake_rows(sweep: spec.Sweep, comps: list[planner.Completion]) -> list[dict]:
    now = datetime.now(UTC)
    rows = []
    for c in comps:
        r = dict.fromkeys(SCHEMA.names)
        r.update(
            completion_id=c.completion_id,
            sweep=sweep.spec.name,  # another name is another sweep's rows: run_sweep would refuse the directory
            prompt_id=c.prompt_id,
            prompt=c.prompt,
            **dict(c.params),
            seed=c.seed,
            sampling_seed=c.sampling_seed,
            text="lorem ipsum " * 20,
            status="ok",
            finished_at=now,
        )
        rows.append(r)
    return rows


def timed(label: str, fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    print(f"{label}: {best:.3f} s (best of {repeat})")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="2 of the 10 prompts (1,260 completions), each stage once")
    args = ap.parse_args()
    prompts, repeat = (2, 1) if args.tiny else (None, 3)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp, "model")
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps({}))
        sweep = roy_one_host(model_dir, prompts)
        g = planner.groups(sweep)[0]
        comps = list(planner.iter_completions(sweep, g.model, g.precision))
        n = len(comps)
        assert n == 630 * len(sweep.prompt_texts), n  # 10 x 9 x 7 grid cells per prompt
        out = Path(tmp, "out")
        store = Store(out)
        flush = sweep.spec.runtime.flush_every
        for i in range(0, len(comps), flush):  # as a killed run leaves it: one file per flush
            store.write("fake", "fp32", fake_rows(sweep, comps[i : i + flush]))
        files = len(store.files())
        print(f"dataset: {n} completions in {files} files (flush_every={flush})")

        timed(
            f"plan: expand {n:,} completions with ids",
            lambda: list(planner.iter_completions(sweep, g.model, "fp32")),
            repeat,
        )
        timed(f"read ids on disk, {files} files", store.finished_ids, repeat)
        done = store.finished_ids()
        assert len(done) == n, len(done)
        timed(f"diff plan - disk ({n:,} done)", lambda: planner.remaining_work(sweep, done), repeat)
        k = n * 20 // 21  # 6,000 of 6,300
        partial = set(list(done)[:k])
        w = planner.remaining_work(sweep, partial)
        left = sum(len(v or []) for v in w.remaining.values())
        assert left == n - k, left
        print(f"  with {k:,} of {n:,} done: {left} left in {len(w.remaining)} blocks")

        t = time.perf_counter()
        r = run_sweep(sweep, out, quiet=True)
        first = time.perf_counter() - t
        assert r.written == 0 and r.complete, r
        print(f"rayq run on the finished sweep, {files} files (includes compaction to 1): {first:.3f} s")
        assert len(store.files()) == 1
        timed("rayq run on the finished sweep, compacted", lambda: run_sweep(sweep, out, quiet=True), repeat)

        roy = spec.load(REPO / "sweeps" / "roy2023.yaml")
        t = time.perf_counter()
        w = planner.remaining_work(roy, set())
        print(
            f"plan the whole roy2023 sweep ({w.planned:,} completions, {len(w.remaining):,} blocks): "
            f"{time.perf_counter() - t:.3f} s"
        )
        print(f"resume skip {n} completions: {first:.3f} s")


if __name__ == "__main__":
    main()
