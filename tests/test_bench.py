"""Every bench script runs in its tiny mode (issue 22): a bench that no test runs breaks silently.

Each script in bench/ is run as a user runs it, in a subprocess from the repository root, with
the arguments below: the real code path (real Ray, rayq's driver, the store on disk) at tiny
sizes, seconds each on 2 CPUs. A test checks its exit status and the lines that carry its
result (which its own asserts stand behind). The tests are parametrized over bench/'s listing,
so a new script without an entry in TINY fails until it gets a tiny mode.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

NUM = r"\d+(?:\.\d+)?"


@dataclass(frozen=True)
class Tiny:
    args: tuple[str, ...]  # after the script's path
    expect: tuple[str, ...]  # regexes, each matching a whole line of stdout
    timeout_s: float  # the subprocess's limit; the tiny run takes a fraction of it on 2 busy CPUs


TINY: dict[str, Tiny] = {
    "cluster.py": Tiny(
        ("--tiny",),
        (
            rf"place roy2023 \(42 hosts\) on 8 x 80GB: {NUM} ms; \d+ hosts at once",
            rf"time to place \(live cluster, 2 hosts\): {NUM} s",
            # nan if no file came from another node after the removal
            rf"node removed after \d+ fp32 files; recovery \(removal -> first commit on another node\): {NUM} s",
            # the suite's end-to-end node loss: every completion once, begun on the lost node, finished on another
            r"sweep wall time .* lost 0, duplicated 0; all ok: True; complete: True; "
            r"fp32 rows written on [2-9] nodes, the removed one among them: True",
        ),
        240,
    ),
    "gpu_check.sh": Tiny(
        ("--tiny",),
        # without CUDA (this machine, CI) the first; with CUDA, the second or (.venv-gpu built) the third
        (
            r"gpu-check: no CUDA device on this machine \(nvidia-smi finds none\); nothing to check, exiting 0"
            r"|gpu-check: CUDA found, but \.venv-gpu is not built .*; --tiny installs nothing, exiting 0"
            r"|gpu-check: done",
        ),
        240,
    ),
    "query.py": Tiny(
        ("--tiny",),
        (
            r"dataset: 37,800 rows, 42 files, .*",
            r"in-process query\(\), grouped \(378 groups\): .*",
            rf"query 37,800 rows: {NUM} s",
        ),
        180,
    ),
    "resume.py": Tiny(
        ("--tiny",),
        (
            r"dataset: 1260 completions in 126 files \(flush_every=10\)",
            r"  with 1,200 of 1,260 done: 60 left in \d+ blocks",
            rf"resume skip 1260 completions: {NUM} s",
        ),
        180,
    ),
    "schedule.py": Tiny(
        ("--tiny",),
        (
            rf"\d+x\d+: makespan {NUM} s; lower bound {NUM} s; run_sweep wall {NUM} s; "
            r"(\d+) rows, \1 unique, \d+ files after compaction",
            rf"scheduler efficiency: {NUM}",
        ),
        240,
    ),
    "schemes.py": Tiny(
        ("--tiny",),
        (
            rf"fp32 +{NUM} +{NUM} +{NUM} +1\.00, 1\.00, 1\.00",
            rf"sim-w4g32 +{NUM} +{NUM} +{NUM} +{NUM}, {NUM}, {NUM}",
            rf"sim-w8-kv4 +{NUM} +{NUM} +{NUM} +{NUM}, {NUM}, {NUM}",
        ),
        180,
    ),
    "throughput.py": Tiny(
        ("--tiny",),
        (
            *(rf"round 1 {m} +{NUM} s .*" for m in ("plain-loop", "rayq-batched", "rayq-serial", "rayq-fixed")),
            r"forward passes: rayq-batched \d+, rayq-fixed \d+",
            rf"speedup batched/plain-loop: {NUM}x",
        ),
        240,
    ),
    "trial_overhead.py": Tiny(
        ("--tiny",),
        (
            rf"fifo: 6 trials in {NUM} s \(ideal 0\.2 s\), {NUM} trials/s; trial actors started \d+, .*",
            rf"newest-first: 6 trials in {NUM} s \(ideal 0\.2 s\), {NUM} trials/s; trial actors started \d+, .*",
        ),
        240,
    ),
}


def bench_scripts() -> list[str]:
    return sorted(p.name for p in BENCH.iterdir() if p.is_file() and not p.name.startswith("."))


def test_every_bench_script_has_a_tiny_mode() -> None:
    missing = sorted(set(bench_scripts()) - set(TINY))
    assert not missing, f"bench scripts without a tiny mode in tests/test_bench.py's TINY: {missing}"
    gone = sorted(set(TINY) - set(bench_scripts()))
    assert not gone, f"TINY names scripts that bench/ no longer has: {gone}"


# Run from a file of their own (tests/test_bench_cluster.py), so that `make test`'s workers
# (whole files each) run them beside the other benches: the longest of the tiny runs.
OWN_FILE = ("cluster.py",)


@pytest.mark.parametrize("name", [n for n in bench_scripts() if n not in OWN_FILE])
def test_bench_script_runs_tiny(name: str) -> None:
    run_tiny(name)


def run_tiny(name: str) -> None:
    """Run bench/`name` with its TINY arguments; check its exit status and the lines it must print."""
    if name not in TINY:
        pytest.fail(f"bench/{name} has no tiny mode: add one and its arguments to TINY in tests/test_bench.py")
    tiny = TINY[name]
    script = BENCH / name
    cmd = ["bash", str(script)] if script.suffix == ".sh" else [sys.executable, str(script)]
    t = time.monotonic()
    try:
        proc = subprocess.run(
            [*cmd, *tiny.args], cwd=ROOT, capture_output=True, text=True, timeout=tiny.timeout_s, check=False
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or ""
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"bench/{name} {' '.join(tiny.args)} ran past {tiny.timeout_s:.0f} s\n{out[-3000:]}\n{err[-3000:]}")
    wall = time.monotonic() - t
    report = f"bench/{name} {' '.join(tiny.args)}: exit {proc.returncode} after {wall:.1f} s\n"
    report += f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    lines = proc.stdout.splitlines()
    for pattern in tiny.expect:
        assert any(re.fullmatch(pattern, line) for line in lines), f"no line matches {pattern!r}\n{report}"
