"""How long `rayq query` takes to aggregate a finished sweep of 1,000,000 completions.

The dataset is shaped like a finished Roy 2023 run: 7 models x 6 precisions = 42 partitions,
each written by Store in a few large chunks and then compacted to one file, with the real
schema and realistic values (the paper's grid of max_new_tokens, temperature and top_k,
random duplicate counts, ~200-character texts). The rows are made up; what is measured is
the scan and the aggregation, not a model. The in-process time excludes interpreter start
and imports; the CLI time includes them (what a user waits for).

    .venv/bin/python bench/query.py [--rows 1000000]
    .venv/bin/python bench/query.py --tiny   # 37,800 rows: 900 per partition, every temperature in each

The last line is `query 1M rows: N.NNN s`, the in-process best of 3.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

from rayq.planning import spec
from rayq.store.dataset import SCHEMA, Store
from rayq.store.query import query

N_ROWS = 1_000_000
TINY_ROWS = 42 * 900  # 900 rows per partition reach every temperature (10 prompts x 10 max_new_tokens each)
# The Roy 2023 study's names and grid, read from its sweep file so they cannot drift apart.
_ROY = spec.load(Path(__file__).resolve().parent.parent / "sweeps" / "roy2023.yaml")
MODELS = tuple(m.name for m in _ROY.spec.models)
PRECISIONS = tuple(_ROY.spec.precisions)
CHUNKS = 3  # files per partition before compaction
PROMPTS = _ROY.prompt_texts
MAX_NEW_TOKENS = tuple(_ROY.spec.grid.max_new_tokens)
TEMPERATURES = tuple(_ROY.spec.grid.temperature)
TOP_K = tuple(_ROY.spec.grid.top_k)
GRID = len(PROMPTS) * len(MAX_NEW_TOKENS) * len(TEMPERATURES) * len(TOP_K)  # 6,300
WORDS = (
    "london city river bridge market music science computer energy climate ocean forest mountain garden school "
    "teacher student book library history future people family friend coffee dinner morning evening summer winter "
    "travel train ticket money bank stock broker price actor singer movie song dance sport football tennis health "
    "food water bread apple doctor hospital robot data cloud network internet phone game story poem king queen"
).split()
SQL = (
    "SELECT model, precision, temperature, avg(duplicate_content_words) AS mean_dup, "
    "avg(tokens_per_s) AS mean_tps, count(*) AS n FROM completions WHERE status = 'ok' "
    "GROUP BY model, precision, temperature ORDER BY model, precision, temperature"
)


def texts(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < 200:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words))
    return out


def rows(
    model: str, precision: str, start: int, stop: int, rng: random.Random, pool: list[str]
) -> list[dict[str, Any]]:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    out = []
    for i in range(start, stop):
        g = i % GRID
        prompt_id, g = g % len(PROMPTS), g // len(PROMPTS)
        mnt, g = MAX_NEW_TOKENS[g % len(MAX_NEW_TOKENS)], g // len(MAX_NEW_TOKENS)
        temp, g = TEMPERATURES[g % len(TEMPERATURES)], g // len(TEMPERATURES)
        top_k = TOP_K[g % len(TOP_K)]
        failed = rng.random() < 0.01
        n_new = None if failed else rng.randint(mnt // 2, mnt)
        content = None if n_new is None else int(n_new * 0.45)
        latency = None if n_new is None else n_new / rng.uniform(5.0, 40.0)
        r = dict.fromkeys(SCHEMA.names)
        r.update(
            completion_id=f"{rng.getrandbits(96):024x}",
            sweep="roy2023",
            prompt_id=prompt_id,
            prompt=PROMPTS[prompt_id],
            max_new_tokens=mnt,
            temperature=temp,
            top_k=top_k,
            top_p=1.0,
            do_sample=True,
            repetition_penalty=1.0,
            seed=i // GRID,
            sampling_seed=rng.getrandbits(48),
            text=None if failed else pool[i % len(pool)],
            n_prompt_tokens=None if failed else 4 + prompt_id % 5,
            n_new_tokens=n_new,
            max_returned_tokens=None if failed else mnt + 4 + prompt_id % 5,
            latency_s=latency,
            ttft_s=None if failed else rng.uniform(0.02, 0.3),
            tokens_per_s=None if latency is None else n_new / latency,
            content_words=content,
            # repetition falls as temperature rises, as in the paper
            duplicate_content_words=None if content is None else int(content * rng.betavariate(2, 2 + 4 * temp)),
            peak_memory_mb=None if failed else rng.uniform(2_000, 80_000),
            status="oom" if failed else "ok",
            error="CUDA out of memory" if failed else None,
            node="node-0",
            device="cuda:0 (NVIDIA A100 80GB)",
            batch_size=1,
            finished_at=t0 + timedelta(seconds=i),
            protocol="serial",
        )
        out.append(r)
    return out


def build(root: Path, n_rows: int = N_ROWS) -> None:
    rng = random.Random(2309_05210)
    pool = texts(rng, min(20_000, max(1, n_rows // 50)))
    store = Store(root)
    parts = [(m, p) for m in MODELS for p in PRECISIONS]
    for k, (m, p) in enumerate(parts):
        n = n_rows // len(parts) + (1 if k < n_rows % len(parts) else 0)
        bounds = [n * c // CHUNKS for c in range(CHUNKS + 1)]
        for a, b in pairwise(bounds):
            store.write(m, p, rows(m, p, a, b, rng, pool))
        store.compact(m, p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=N_ROWS, help="completions in the dataset")
    ap.add_argument("--tiny", action="store_true", help=f"--rows {TINY_ROWS} (seconds, for the tests)")
    args = ap.parse_args()
    n_rows = TINY_ROWS if args.tiny else args.rows
    parts = len(MODELS) * len(PRECISIONS)
    # temperatures each partition reaches: its rows walk prompts, then max_new_tokens, then temperature
    temps = min(len(TEMPERATURES), math.ceil((n_rows // parts) / (len(PROMPTS) * len(MAX_NEW_TOKENS))))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "roy2023")
        t = time.perf_counter()
        build(root, n_rows)
        files = list((root / "completions").rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        total = query(root, "SELECT count(*) AS n FROM completions")["n"].item()
        assert total == n_rows, total
        assert len(files) == parts, len(files)  # compacted: one file per partition
        print(
            f"dataset: {total:,} rows, {len(files)} files, {size / 2**20:.1f} MiB "
            f"(generated in {time.perf_counter() - t:.1f} s); {os.cpu_count()} CPUs"
        )

        times = []
        for _ in range(3):
            t = time.perf_counter()
            df = query(root, SQL)
            times.append(time.perf_counter() - t)
        assert df.height == parts * temps, df.height
        print(f"in-process query(), grouped ({df.height} groups): {', '.join(f'{x:.3f}' for x in times)} s")

        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "rayq", "query", str(root), SQL], capture_output=True, text=True, check=True
        )
        cli_s = time.perf_counter() - t
        assert f"{df.height} rows" in proc.stdout
        print(f"CLI rayq query (table output, process start included): {cli_s:.3f} s")
        print(f"query {'1M' if n_rows == 1_000_000 else f'{n_rows:,}'} rows: {min(times):.3f} s")


if __name__ == "__main__":
    main()
