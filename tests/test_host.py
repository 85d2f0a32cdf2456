"""The model host on its own (no Ray): rows, determinism, failures as rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rayq.host.config import HostConfig
from rayq.host.transformers_host import ModelHost
from rayq.planning import planner, spec
from rayq.store.dataset import SCHEMA
from tests.conftest import sweep_dict


def _completions(model: Path, precision: str = "fp32", **kw) -> list[dict]:
    s = spec.parse(sweep_dict(model, precisions=[precision], **kw))
    return [c.to_dict() for c in planner.iter_completions(s, s.spec.models[0], precision)]


def _host(model: Path, precision: str = "fp32", name: str = "tiny", **kw: Any) -> ModelHost:
    return ModelHost(HostConfig(sweep="tiny", model=name, source=f"path:{model}", precision=precision, **kw))


def test_rows_carry_every_column(tiny_model: Path) -> None:
    comps = _completions(tiny_model)[:6]
    rows = _host(tiny_model).generate(comps)
    assert len(rows) == 6
    for r, c in zip(rows, comps, strict=True):
        assert set(r) == set(SCHEMA.names)
        assert r["status"] == "ok" and r["error"] is None
        assert r["completion_id"] == c["completion_id"]
        assert 1 <= r["n_new_tokens"] <= c["params"]["max_new_tokens"]
        assert r["max_returned_tokens"] == c["params"]["max_new_tokens"] + r["n_prompt_tokens"]
        assert r["text"].strip()
        assert r["latency_s"] > 0 and 0 < r["ttft_s"] <= r["latency_s"]
        assert r["tokens_per_s"] == pytest.approx(r["n_new_tokens"] / r["latency_s"])


def test_same_completion_same_text_in_a_fresh_host(tiny_model: Path) -> None:
    comps = [c for c in _completions(tiny_model) if c["params"]["top_k"] == 50]
    first = _host(tiny_model).generate(comps)
    # a different order in a new host: per-completion seeds make order irrelevant
    second = _host(tiny_model).generate(list(reversed(comps)))
    assert [r["text"] for r in first] == [r["text"] for r in reversed(second)]
    assert len({r["text"] for r in first}) > 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_generate(tiny_model: Path, precision: str) -> None:
    host = _host(tiny_model, precision)
    assert host.info()["settings"]["dtype"] in ("bfloat16", "float16")
    rows = host.generate(_completions(tiny_model, precision)[:2])
    assert all(r["status"] == "ok" and r["text"] for r in rows)


def test_load_failure_becomes_error_rows(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "config.json").write_text("{}")  # a directory that is not a model
    host = _host(tmp_path, name="broken")
    assert host.info()["load_status"] == "error"
    rows = host.generate(_completions(tiny_model)[:3])
    assert [r["status"] for r in rows] == ["error"] * 3
    assert all(r["error"].startswith("load failed:") and r["text"] is None for r in rows)


def test_temperature_zero_is_greedy(tiny_model: Path) -> None:
    comps = _completions(tiny_model, grid={"max_new_tokens": [6], "temperature": [0.0], "top_k": [50]}, seeds=2)
    rows = _host(tiny_model).generate(comps)
    by_prompt: dict[int, set[str]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["text"])
    assert all(len(texts) == 1 for texts in by_prompt.values())  # seeds differ, text does not


def test_a_batched_host_returns_rows_in_parts_as_they_end(tiny_model: Path) -> None:
    comps = [c for c in _completions(tiny_model) if c["params"]["top_k"] == 50]  # sampled: each decoded
    host = _host(tiny_model, protocol="batched", batch_size=3)
    parts = list(host.generate_stream(comps, 5))
    assert [len(p) for p in parts] == [5, 5, 2]
    rows = [r for p in parts for r in p]
    assert sorted(r["completion_id"] for r in rows) == sorted(c["completion_id"] for c in comps)
    # the 4-token rows decode first and end first; 3 rows decode at a time, others joining as rows end
    assert [r["max_new_tokens"] for r in rows] == [4] * 6 + [8] * 6
    assert {r["batch_size"] for r in rows} == {3} and all(r["status"] == "ok" for r in rows)
    info = host.info()
    assert info["generated_tokens"] == sum(r["n_new_tokens"] for r in rows) and info["generate_s"] > 0


def test_an_error_in_a_batch_fails_only_the_row_that_raised_it(tiny_model: Path) -> None:
    """A row that cannot run (here: a prompt past what the "model" takes, as a learned position
    embedding raises) fails alone; the rows that shared its batch are decoded again without it."""
    poison = "a very long prompt " * 6
    prompts = ["Life in London", "Hello, my name is", poison, "Global warming and AI"]
    grid = {"max_new_tokens": [4, 8], "temperature": [0.7], "top_k": [50]}
    comps = _completions(tiny_model, prompts=prompts, grid=grid)
    host = _host(tiny_model, protocol="batched", batch_size=3)
    limit = max(len(host.engine.tokenizer(p)["input_ids"]) for p in prompts if p != poison)

    def too_long(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape[-1] > limit:
            raise ValueError("index out of range in self (simulated: prompt past the position table)")

    host.engine.model.register_forward_pre_hook(too_long, with_kwargs=True)
    rows = host.generate(comps)
    assert sorted(r["completion_id"] for r in rows) == sorted(c["completion_id"] for c in comps)
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["prompt"] for r in failed] == [poison, poison]
    assert all(r["status"] == "error" and "ValueError" in r["error"] for r in failed)
    assert all(1 <= r["n_new_tokens"] <= r["max_new_tokens"] for r in rows if r["status"] == "ok")
    assert host.info()["batch_size"] == 3  # an error is not out of memory: the batch size stays
