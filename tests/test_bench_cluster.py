"""The tiny runs of the benches in test_bench.py's OWN_FILE: bench/cluster.py --tiny, the suite's
end-to-end test of node loss. Apart, so that another worker runs them beside the other benches."""

from __future__ import annotations

import pytest

from tests.test_bench import OWN_FILE, run_tiny


@pytest.mark.parametrize("name", OWN_FILE)
def test_bench_script_runs_tiny_in_a_file_of_its_own(name: str) -> None:
    run_tiny(name)
