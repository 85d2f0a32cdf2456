"""Out of memory during generation is a row with status=oom, and the host goes on.

A CPU has no CUDA allocator to exhaust, so the test gives the real tiny model the memory
limit of a GPU: a forward pre-hook raises torch's own OutOfMemoryError once the sequence
outgrows a set length, as falcon-40b bf16 did past 400 new tokens on one 80 GB A100. All
else (decoding, the host's recovery, the rows) is the real code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rayq.planning import planner, spec
from tests.conftest import sweep_dict

LIMIT = 16  # positions the "GPU" holds: every prompt plus 8 new tokens fits, plus 40 does not


def _host(tiny_model: Path, protocol: str) -> Any:
    import torch

    from rayq.host.config import HostConfig
    from rayq.host.transformers_host import ModelHost

    source = f"path:{tiny_model}"
    config = HostConfig(sweep="oom", model="tiny", source=source, precision="fp32", protocol=protocol, batch_size=4,
                        layer_sqnr=False)  # fmt: skip
    host = ModelHost(config)

    def too_long(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("past_key_values")
        seen = cache.get_seq_length() if cache is not None else 0
        ids = kwargs.get("input_ids")
        if seen + (ids.shape[-1] if ids is not None else 0) > LIMIT:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated limit)")

    host.engine.model.model.register_forward_pre_hook(too_long, with_kwargs=True)
    return host


def _completions(tiny_model: Path) -> list[dict[str, Any]]:
    data = sweep_dict(tiny_model, grid={"max_new_tokens": [8, 40], "temperature": [1.0], "top_k": [50]})
    sweep = spec.parse(data)
    todo = [c.to_dict() for c in planner.iter_completions(sweep, sweep.spec.models[0], "fp32")]
    return sorted(todo, key=lambda c: -c["params"]["max_new_tokens"])  # the long ones first


@pytest.mark.parametrize("protocol", ["serial", "batched"])
def test_oom_rows_then_the_host_recovers(tiny_model: Path, protocol: str) -> None:
    host = _host(tiny_model, protocol)
    rows = host.generate(_completions(tiny_model))
    by_len = {n: [r for r in rows if r["max_new_tokens"] == n] for n in (8, 40)}
    assert len(by_len[40]) == len(by_len[8]) == 3
    assert all(r["status"] == "oom" and "OutOfMemoryError" in r["error"] for r in by_len[40])
    assert all(r["text"] is None and r["n_new_tokens"] is None for r in by_len[40])
    # the short completions ran after the failures on the same host: it recovered
    assert all(r["status"] == "ok" and r["n_new_tokens"] > 0 for r in by_len[8])
    if protocol == "batched":
        assert host.info()["batch_size"] == 1  # halved on each out-of-memory until one row was left
