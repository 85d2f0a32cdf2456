"""The Host contract (rayq.host.protocol), its configuration (rayq.host.config) and the row
runner every host shares (rayq.host.runner), checked without loading a model or importing torch."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import pickle
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rayq.catalog import engines
from rayq.host import protocol
from rayq.host.config import HostConfig
from rayq.host.engine import Decoded, Failure, Generated, Measured
from rayq.host.runner import HostRunner
from rayq.planning import planner, spec
from tests.conftest import sweep_dict

ROOT = Path(__file__).resolve().parent.parent


def _config(**kw: Any) -> HostConfig:
    return HostConfig(**{"sweep": "s", "model": "m", "source": "path:/nowhere", "precision": "fp32", **kw})


# -- HostConfig -----------------------------------------------------------------------


def test_a_host_config_is_built_by_keyword_frozen_and_picklable() -> None:
    with pytest.raises(TypeError):
        HostConfig("s", "m", "path:/nowhere", "fp32")  # type: ignore[misc]
    c = _config(precision_options=None, num_gpus=1, batch_size="auto", protocol="batched")
    assert c.precision_options == {} and str(c.key) == "m/fp32" and c.threads == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.protocol = "serial"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(c)) == c  # it travels to the host's actor
    assert all(f.metadata.get("help") for f in dataclasses.fields(HostConfig))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("protocol", "parallel", "protocol must be one of serial, batched (got 'parallel')"),
        ("batch_size", 0, "batch_size must be an integer >= 1 or 'auto' (got 0)"),
        ("batch_size", "32", "batch_size must be an integer >= 1 or 'auto' (got '32')"),
        ("num_cpus", -1, "num_cpus must be a number >= 0 (got -1)"),
        ("num_gpus", "2", "num_gpus must be a number >= 0 (got '2')"),
        ("layer_sqnr", 1, "layer_sqnr must be true or false (got 1)"),
        ("model", "", "model must be a non-empty string (got '')"),
        ("estimated_bytes", 1.5, "estimated_bytes must be a positive integer or None (got 1.5)"),
        ("precision_options", ["a"], "precision_options must be a mapping (got ['a'])"),
        ("fidelity", {"text": "t", "label": "l"}, "fidelity lacks window, stride, max_tokens, top_k, baseline"),
    ],
)
def test_a_host_config_refuses_a_bad_value_naming_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"HostConfig: {message}")):
        _config(**{field: value})


def test_a_host_config_says_every_problem_at_once() -> None:
    with pytest.raises(ValueError, match=r"protocol must be .*; batch_size must be"):
        _config(protocol="parallel", batch_size=0)


# -- the Host protocol ------------------------------------------------------------------


def _stand_in() -> type:
    """bench/schedule.py's stand-in host, imported as a module (bench/ is not a package)."""
    spec_ = importlib.util.spec_from_file_location("bench_schedule", ROOT / "bench" / "schedule.py")
    assert spec_ is not None and spec_.loader is not None
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.StandInHost


HOSTS = {**{name: lambda name=name: engines.host_class(name) for name in engines.REGISTRY}, "stand-in": _stand_in}


def _params(fn: object) -> list[str]:
    """A signature's parameter names, less the `_ray_trace_ctx` keyword Ray adds to a class it has
    made an actor of (in this process, after any earlier test's run)."""
    return [p for p in inspect.signature(fn).parameters if p != "_ray_trace_ctx"]


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_every_host_class_satisfies_the_host_protocol_by_signature(name: str) -> None:
    cls = HOSTS[name]()
    assert _params(cls) == ["config"], "a host class takes exactly its HostConfig"
    methods = [m for m, _ in inspect.getmembers(protocol.Host, inspect.isfunction) if not m.startswith("_")]
    assert sorted(methods) == sorted(protocol.METHODS)
    for m in methods:
        want = inspect.signature(getattr(protocol.Host, m))
        got = inspect.signature(getattr(cls, m))
        assert _params(getattr(cls, m)) == list(want.parameters), f"{name}: {m}{got} is not {m}{want}"
    # Ray's streaming returns (the launcher's num_returns="streaming") need a generator.
    assert inspect.isgeneratorfunction(cls.generate_stream)
    assert protocol.problems(cls) == []


def test_a_class_that_is_not_a_host_is_refused_with_what_it_lacks() -> None:
    class OldStandIn:  # the shape bench/schedule.py's stand-in had: every trial failed on generate_stream
        def __init__(self, *args: Any) -> None: ...

        def generate(self, completions: list[dict[str, Any]]) -> list[dict[str, Any]]: ...

        def info(self) -> dict[str, Any]: ...

        def reference(self, extra: int) -> bytes | None: ...

    found = protocol.problems(OldStandIn)
    assert any("has no method generate_stream(completions, every)" in p for p in found), found
    assert any("OldStandIn.reference does not take ()" in p for p in found), found
    with pytest.raises(TypeError, match="not a model host"):
        protocol.require_host_class(OldStandIn)


def test_the_execution_layer_calls_on_a_host_only_what_the_protocol_states() -> None:
    called = set()
    for path in (ROOT / "rayq" / "execution").glob("*.py"):
        called |= set(re.findall(r"\.(\w+)\.(?:remote|options)\(", path.read_text(encoding="utf-8")))
    assert called - {"ray"} <= set(protocol.METHODS), called


def test_the_hosts_modules_import_no_torch() -> None:
    """The driver imports a host class by its path where it starts the actor: that must not load torch."""
    code = (
        "import sys\n"
        "import rayq.host.protocol, rayq.host.runner, rayq.host.transformers_host, rayq.host.vllm_host\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# -- the row runner, over a fake engine ---------------------------------------------------------


class FakeEngine:
    """Decodes by counting; fails where told. What the runner asks of an engine, and no more."""

    name = "fake"

    def __init__(self, fail_load: bool = False, fail_prompts: tuple[str, ...] = ()) -> None:
        self.settings: dict[str, Any] = {"kv_cache": "fake"}
        self.context_length: int | None = 10
        self.batch_size = 0
        self.fail_load, self.fail_prompts = fail_load, fail_prompts
        self.serial: list[str] = []
        self.batches: list[list[str]] = []

    def load(self) -> None:
        if self.fail_load:
            raise OSError("no weights here")

    def measure(self) -> Measured:
        return Measured(columns={"held_bytes": 1}, reference=b"ref")

    def device(self) -> str:
        return "cpu"

    def sizes(self) -> dict[str, Any]:
        return {"n_params": 2, "footprint_bytes": 3}

    def weight_columns(self) -> dict[str, Any]:
        return {"weight_format": "fake"}

    def _out(self, c: dict[str, Any]) -> Generated:
        n = c["params"]["max_new_tokens"]
        return Generated(f"text of {c['prompt']}", 3, n, 0.5, 0.1, 7.0)

    def decode_serial(self, completion: dict[str, Any]) -> Generated:
        self.serial.append(completion["completion_id"])
        if completion["prompt"] in self.fail_prompts:
            raise ValueError("bad prompt")
        return self._out(completion)

    def decode_batched(self, completions: list[dict[str, Any]]) -> Iterator[Decoded]:
        self.batches.append([c["completion_id"] for c in completions])
        for i, c in enumerate(completions):
            bad = c["prompt"] in self.fail_prompts
            yield Decoded(i, 2, Failure("oom", "OutOfMemoryError: x") if bad else self._out(c))


def _completions(tmp_path: Path, **runtime: Any) -> list[dict[str, Any]]:
    (tmp_path / "config.json").write_text("{}")  # a model directory, never loaded
    s = spec.parse(sweep_dict(tmp_path, runtime={"num_cpus": 1, **runtime}))
    return [c.to_dict() for c in planner.iter_completions(s, s.spec.models[0], "fp32")]


def test_the_runner_times_the_serial_sample_alone_shares_greedy_rows_and_streams_parts(tmp_path: Path) -> None:
    comps = _completions(tmp_path, protocol="batched", serial_sample=1)
    engine = FakeEngine()
    runner = HostRunner(_config(protocol="batched", batch_size="auto", model="tiny"), engine)
    parts = list(runner.generate_stream(comps, 5))
    rows = [r for p in parts for r in p]
    assert [len(p) for p in parts[:-1]] == [5] * (len(parts) - 1) and 0 < len(parts[-1]) <= 5
    assert sorted(r["completion_id"] for r in rows) == sorted(c["completion_id"] for c in comps)
    serial = {c["completion_id"] for c in comps if c.get("protocol") == "serial"}
    assert serial and set(engine.serial) == serial  # each alone, before the batched rest
    assert {r["protocol"] for r in rows if r["completion_id"] in serial} == {"serial"}
    shared = [r for r in rows if r["shares_output_of"] is not None]
    assert shared and not {r["completion_id"] for r in shared} & {i for b in engine.batches for i in b}
    assert all(r["status"] == "ok" and r["engine"] == "fake" and r["kv_cache"] == "fake" for r in rows)
    assert all(r["past_context"] is (3 + r["max_new_tokens"] > 10) for r in rows)
    info = runner.info()
    assert info["batch_size"] == engine.batch_size == 8  # auto on a CPU
    assert info["held_bytes"] == 1 and info["weight_format"] == "fake" and info["peak_memory_mb"] == 7.0
    assert info["generated_tokens"] == sum(r["n_new_tokens"] for r in rows if r["shares_output_of"] is None)
    assert runner.reference() == b"ref"


def test_the_runner_turns_failures_into_rows(tmp_path: Path) -> None:
    comps = _completions(tmp_path, protocol="batched", serial_sample=1)
    bad = ("Life in London", "Hello, my name is")  # the first is the serial sample's prompt
    runner = HostRunner(_config(protocol="batched"), FakeEngine(fail_prompts=bad))
    rows = runner.generate(comps)
    failed = [r for r in rows if r["status"] != "ok"]
    assert sorted(r["completion_id"] for r in failed) == sorted(c["completion_id"] for c in comps if c["prompt"] in bad)
    assert {r["status"] for r in failed if r["protocol"] == "serial"} == {"error"}  # raised: described
    assert all("ValueError: bad prompt" in r["error"] for r in failed if r["protocol"] == "serial")
    assert {r["status"] for r in failed if r["protocol"] == "batched"} == {"oom"}  # a Failure from the engine

    broken = HostRunner(_config(), FakeEngine(fail_load=True))
    rows = broken.generate(comps[:3])
    assert [r["status"] for r in rows] == ["error"] * 3 and rows[0]["error"] == "load failed: OSError: no weights here"
    info = broken.info()
    assert info["load_status"] == "error" and "held_bytes" not in info and broken.reference() is None
