"""bench/cluster.py --tiny, the suite's end-to-end test of node loss (TINY in tests/test_bench.py)."""

from __future__ import annotations

from tests.test_bench import OWN_FILE, run_tiny


def test_cluster_bench_runs_tiny() -> None:
    assert OWN_FILE == ("cluster.py",)
    run_tiny("cluster.py")
