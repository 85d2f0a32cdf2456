"""The launcher: Tune's plug-ins on their own, the rule that stops a run failing the same way on
every block, and a run that leaves the caller's environment as it found it.

The first tests need no Ray running (the plug-ins import Tune, nothing starts); the last ones
run the real driver on a local Ray with stand-in hosts (a host class built from a HostConfig,
rayq.host.protocol), one that fails every block and one that answers at once.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pytest

from rayq.errors import EXIT_INCOMPLETE, RunStoppedError
from rayq.execution.cluster import TUNE_ENV, scoped_env
from rayq.execution.failures import (
    SAME_ERROR_BLOCKS,
    SAME_ERROR_FAILURES,
    RepeatedFailures,
    error_line,
    failure_signature,
)
from rayq.execution.launcher import Launch
from rayq.host.config import HostConfig
from rayq.planning import planner, spec
from rayq.store.dataset import Store
from tests.conftest import sweep_dict

REPO = Path(__file__).resolve().parent.parent

# What Ray itself sets in the caller's process (Ray 2.60), which a run leaves behind when it is
# the one that first imports Ray or starts a local Ray; rayq sets none of these:
RAY_INIT_SETS = {
    "RAY_AUTH_MODE",  # "token": ray.init's token authentication, for this process and its children
    "RAY_USAGE_STATS_ENABLED",  # "0": no usage stats from a ray.init (usage_lib.set_usage_stats_enabled_via_env_var)
    "PYTHONBREAKPOINT",  # "ray.util.rpdb._driver_set_trace", by ray.init: breakpoint() in a task reaches the driver
    "RAY_CLIENT_MODE",  # "0", when `ray` is first imported: this process is a driver, not a Ray Client
}

# Tune's error file for a trial whose host raised AttributeError, twice (tail of a real one).
ERROR_FILE = (
    "Failure # 1 (occurred at 2026-12-07_23-09-29)\n"
    "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=16235, ip=192.0.2.2, actor_id=63a79b80d1122f779ea7fa4d01000000)\n"
    '  File "/work/main/rayq/execution/launcher.py", line 96, in _stream_host\n'
    "    rows = ray.get(ref)\n"
    "ray.exceptions.RayTaskError(AttributeError): \x1b[36mray::FailingHost.generate_stream()\x1b[39m "
    "(pid=15682, ip=192.0.2.2, actor_id=11fb16c5f74f3943a571df2b01000000)\n"
    "    self.model.generate(completions)\n"
    "    ^^^^^^^^^^^^^^^^^^^\n"
    "AttributeError: 'NoneType' object has no attribute 'generate'\n"
    "Failure # 2 (occurred at 2026-12-07_23-09-31)\n"
    "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=16236, ip=192.0.2.2, actor_id=63a79b80d1122f779ea7fa4d01000000)\n"
    "ray.exceptions.RayTaskError(KeyError): \x1b[36mray::FailingHost.generate_stream()\x1b[39m (pid=15682)\n"
    "KeyError: 'c-3f2a9b81c0de'\n"
)
ATTRIBUTE = "AttributeError: 'NoneType' object has no attribute 'generate'"
ACTOR_DIED = "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."


# -- reading a trial's error ------------------------------------------------------------


def test_error_line_is_the_innermost_exception_of_the_last_failure() -> None:
    assert error_line(ERROR_FILE) == "KeyError: 'c-3f2a9b81c0de'"
    assert error_line(ERROR_FILE.split("Failure # 2")[0]) == ATTRIBUTE
    assert error_line("Traceback (most recent call last):\n  boom\n") == "boom"  # no exception line: the last
    assert error_line("") == "unknown error"


def test_the_same_error_is_its_kind_and_message_without_what_varies_by_block() -> None:
    a = failure_signature(
        "ValueError: block m/fp32|temperature=0.7 row 12 at 0x7f00a3 id 9f3c2a10b7", "m/fp32|temperature=0.7"
    )
    b = failure_signature(
        "ValueError: block m/fp32|temperature=1.0 row 40 at 0x7f11b4 id 0b7f3c2a19", "m/fp32|temperature=1.0"
    )
    assert a == b == ("ValueError", "block <block> row N at <address> id <id>")
    assert failure_signature(ATTRIBUTE, "m/fp32|a") == (
        "AttributeError",
        "'NoneType' object has no attribute 'generate'",
    )
    assert failure_signature("ray.exceptions.RayTaskError(ZeroDivisionError): x", "m/fp32|a") == (
        "ZeroDivisionError",
        "x",
    )
    assert failure_signature("rayq.execution.launcher.HostLookupError: no host", "m/fp32|a") is not None
    # Ray's own errors (a host or node lost) and lines that name no exception are never counted
    assert failure_signature(ACTOR_DIED, "m/fp32|a") is None
    assert failure_signature("ray.exceptions.RayTaskError(ActorDiedError): x", "m/fp32|a") is None
    assert failure_signature("The actor died unexpectedly", "m/fp32|a") is None


def test_the_same_error_on_more_than_one_block_stops_the_run() -> None:
    assert (SAME_ERROR_FAILURES, SAME_ERROR_BLOCKS) == (3, 2)
    rule = RepeatedFailures()
    for _ in range(5):  # one block failing alone (bad data), however often Tune retries it
        assert rule.failed("m/fp32", "m/fp32|a", ATTRIBUTE) is None
    why = rule.failed("m/fp32", "m/fp32|b", ATTRIBUTE)
    assert why is not None and "failed 6 times with the same error, on 2 blocks" in why and why.endswith(ATTRIBUTE)


def test_each_host_and_each_error_is_counted_on_its_own() -> None:
    rule = RepeatedFailures()
    assert rule.failed("m/fp32", "m/fp32|a", ATTRIBUTE) is None
    assert rule.failed("m/fp32", "m/fp32|b", ATTRIBUTE) is None  # two failures: both blocks in flight
    assert rule.failed("m/bf16", "m/bf16|c", ATTRIBUTE) is None  # another host's
    assert rule.failed("m/fp32", "m/fp32|c", "KeyError: 'x'") is None  # another error
    why = rule.failed("m/fp32", "m/fp32|a", ATTRIBUTE)  # a retry failing again
    assert why is not None and "trials of m/fp32 failed 3 times" in why and "on 2 blocks" in why


def test_a_block_of_the_host_succeeding_starts_the_count_again() -> None:
    rule = RepeatedFailures()
    rule.failed("m/fp32", "m/fp32|a", ATTRIBUTE)
    rule.failed("m/fp32", "m/fp32|b", ATTRIBUTE)
    rule.succeeded("m/fp32")
    assert rule.failed("m/fp32", "m/fp32|c", ATTRIBUTE) is None
    assert rule.failed("m/fp32", "m/fp32|c", ATTRIBUTE) is None
    assert rule.failed("m/fp32", "m/fp32|d", ATTRIBUTE) is not None


def test_errors_of_rays_own_never_stop_the_run() -> None:
    rule = RepeatedFailures()
    assert all(rule.failed("m/fp32", f"m/fp32|{i}", ACTOR_DIED) is None for i in range(10))


# -- the launch's books: failed blocks' rows ---------------------------------------------


class _Scheduler:
    all_admitted = False

    def block_ended(self, bid: str) -> None:
        return None


def _launch(tiny_model: Path, tmp_path: Path) -> tuple[Launch, list[str]]:
    sweep = spec.parse(sweep_dict(tiny_model), "t.yaml")
    store = Store(tmp_path / "out")
    fence = store.take_ownership()
    blocks = planner.groups(sweep)[0].block_ids
    progress = SimpleNamespace(add=lambda n: None)
    launch = Launch(sweep, store, fence, {}, _Scheduler(), None, progress, 60.0)  # type: ignore[arg-type]
    return launch, list(blocks)


def _statuses(tmp_path: Path) -> list[str]:
    files = list((tmp_path / "out").glob("completions/**/*.parquet"))
    return pl.read_parquet(files)["status"].to_list() if files else []


def test_a_failed_blocks_rows_are_written_once_another_block_of_its_host_succeeds(
    tiny_model: Path, tmp_path: Path
) -> None:
    launch, blocks = _launch(tiny_model, tmp_path)
    launch.trial_failed(blocks[0], "ValueError: bad prompt")
    launch.block_ended(blocks[0], "ValueError: bad prompt")
    assert _statuses(tmp_path) == [] and launch.stop_reason is None
    launch.block_ended(blocks[1], None)
    assert set(_statuses(tmp_path)) == {"error"} and len(_statuses(tmp_path)) == 6  # 3 prompts x 2 lengths


def test_the_host_failing_every_block_gets_no_error_rows_and_stops_the_run(tiny_model: Path, tmp_path: Path) -> None:
    launch, blocks = _launch(tiny_model, tmp_path)
    for bid in blocks[:3]:
        launch.trial_failed(bid, ATTRIBUTE, "/x/error.txt")
        launch.block_ended(bid, ATTRIBUTE)
    assert launch.stop_reason == launch.failing
    assert launch.failing is not None and ATTRIBUTE in launch.failing and "/x/error.txt" in launch.failing
    launch.finish()
    assert _statuses(tmp_path) == []  # run again once fixed: these blocks run, no --retry-failed needed


# -- Tune's plug-ins, each on its own ------------------------------------------------------


class _FakeLaunch:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.stop_reason: str | None = None
        self.all_admitted = False
        self.blocks = ["m/fp32|a"]

    def next_block(self) -> str | None:
        return self.blocks.pop(0) if self.blocks else None

    def __getattr__(self, name: str) -> Any:
        return lambda *a: self.calls.append((name, *a))


def test_the_searcher_hands_out_blocks_waits_and_finishes() -> None:
    from ray.tune.search import Searcher

    from rayq.execution.tune_plugins import BlockSearcher

    launch = _FakeLaunch()
    searcher = BlockSearcher(launch)  # type: ignore[arg-type]
    assert searcher.suggest("t1") == {"block": "m/fp32|a"}
    assert searcher.suggest("t2") is None  # nothing to hand out now: Tune asks again
    launch.all_admitted = True
    assert searcher.suggest("t3") == Searcher.FINISHED
    launch.blocks, launch.all_admitted, launch.stop_reason = ["m/fp32|b"], False, "stalled"
    assert searcher.suggest("t4") == Searcher.FINISHED


def test_the_callback_tells_the_launch_what_tune_saw(tmp_path: Path) -> None:
    from rayq.execution.tune_plugins import TrialEvents

    (tmp_path / "error.txt").write_text(ERROR_FILE.split("Failure # 2")[0])
    trial = SimpleNamespace(config={"block": "m/fp32|a"}, error_file=str(tmp_path / "error.txt"))
    launch = _FakeLaunch()
    events = TrialEvents(launch)  # type: ignore[arg-type]
    events.on_trial_start(0, [], trial)
    events.on_trial_result(0, [], trial, {"written": 4, "failed": 0})
    events.on_trial_recover(0, [], trial)
    events.on_trial_error(0, [], trial)
    events.on_trial_complete(0, [], trial)
    events.on_step_end(0, [])
    names = [c[0] for c in launch.calls]
    assert names == [
        "trial_started",
        "rows_reported",
        "trial_failed",
        "trial_failed",
        "block_ended",
        "block_ended",
        "poll",
    ]
    assert launch.calls[1] == ("rows_reported", 4)
    assert launch.calls[2] == ("trial_failed", "m/fp32|a", ATTRIBUTE, str(tmp_path / "error.txt"))
    assert launch.calls[4] == ("block_ended", "m/fp32|a", ATTRIBUTE)
    assert launch.calls[5] == ("block_ended", "m/fp32|a", None)


def test_the_stopper_stops_all_once_the_launch_has_a_reason() -> None:
    from rayq.execution.tune_plugins import Watchdog

    launch = _FakeLaunch()
    watchdog = Watchdog(launch)  # type: ignore[arg-type]
    assert not watchdog.stop_all() and not watchdog("t1", {})
    launch.stop_reason = "trials of m/fp32 failed 3 times with the same error, on 2 blocks"
    assert watchdog.stop_all()


def test_tune_pickles_none_of_the_launch() -> None:
    from rayq.execution.tune_plugins import BlockSearcher, TrialEvents, Watchdog

    for cls in (BlockSearcher, TrialEvents, Watchdog):
        plugin = cls(_FakeLaunch())  # type: ignore[arg-type]
        assert not hasattr(pickle.loads(pickle.dumps(plugin)), "launch"), cls


# -- the environment -------------------------------------------------------------------------


def test_scoped_env_sets_only_what_is_missing_and_removes_exactly_that(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYQ_T_MINE", "caller")
    monkeypatch.delenv("RAYQ_T_NEW", raising=False)
    monkeypatch.delenv("RAYQ_T_MOVED", raising=False)
    before = dict(os.environ)
    with pytest.raises(KeyError), scoped_env({"RAYQ_T_MINE": "rayq", "RAYQ_T_NEW": "1", "RAYQ_T_MOVED": "1"}):
        assert os.environ["RAYQ_T_MINE"] == "caller" and os.environ["RAYQ_T_NEW"] == "1"
        os.environ["RAYQ_T_MOVED"] = "someone else's"
        raise KeyError("the run failed")
    assert os.environ.pop("RAYQ_T_MOVED") == "someone else's"  # changed inside by another: theirs now
    assert dict(os.environ) == before


def test_rayq_run_says_a_stopped_run_in_one_line_with_exit_status_3(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from rayq import cli
    from rayq.execution import driver
    from tests.conftest import write_sweep

    def stopped(*args: Any, **kwargs: Any) -> None:
        raise RunStoppedError(f"run stopped: trials of tiny/fp32 failed 3 times with the same error: {ATTRIBUTE}")

    monkeypatch.setattr(driver, "run_sweep", stopped)
    assert cli.main(["run", str(write_sweep(tmp_path / "s.yaml", sweep_dict(tiny_model)))]) == 3
    assert (
        capsys.readouterr().err
        == f"rayq: run stopped: trials of tiny/fp32 failed 3 times with the same error: {ATTRIBUTE}\n"
    )


def _changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


# -- real runs on a local Ray, with stand-in hosts ----------------------------------------------


class FailingHost:
    """A host with a bug: every block raises the same AttributeError."""

    def __init__(self, config: HostConfig) -> None:
        self.config = config
        self.model: Any = None  # never loaded

    def generate_stream(self, completions: list[dict[str, Any]], every: int) -> Iterator[list[dict[str, Any]]]:
        yield self.model.generate(completions)

    def info(self) -> dict[str, Any]:
        return {"model": self.config.model, "precision": self.config.precision, "load_status": "ok"}

    def reference(self) -> bytes | None:
        return None


class QuickHost(FailingHost):
    """A host that answers every completion at once, with an empty text."""

    def generate_stream(self, completions: list[dict[str, Any]], every: int) -> Iterator[list[dict[str, Any]]]:
        from rayq.store.dataset import completion_row

        for i in range(0, len(completions), every):
            now = datetime.now(UTC)
            yield [
                completion_row(self.config.sweep, c, status="ok", text="", n_new_tokens=0, finished_at=now)
                for c in completions[i : i + every]
            ]


def _sweep(tiny_model: Path, **runtime: Any) -> spec.Sweep:
    rt = {"num_cpus": 0.5, "flush_every": 2, "layer_sqnr": False, **runtime}
    return spec.parse(sweep_dict(tiny_model, runtime=rt), "t.yaml")  # 4 blocks of 6 completions


@pytest.fixture(scope="module")
def no_ray_yet() -> Iterator[None]:
    """This module's runs start their own local Ray (the first one) and it is shut down after.

    The stand-in hosts travel to their actors by value: Ray's workers cannot import this
    module (pytest imports it as `test_launcher`, from a folder that is not on their path).
    """
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.shutdown()
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_run_leaves_the_environment_as_it_found_it(tiny_model: Path, tmp_path: Path, no_ray_yet: None) -> None:
    from rayq.execution.driver import run_sweep

    before = dict(os.environ)
    result = run_sweep(_sweep(tiny_model), tmp_path / "out", quiet=True, host_class=QuickHost)
    after = dict(os.environ)
    assert result.complete and result.written == result.planned == 24, result.errors
    assert _changed(before, after) <= RAY_INIT_SETS, {k: after.get(k) for k in _changed(before, after)}
    assert not (TUNE_ENV.keys() | {"TUNE_MAX_PENDING_TRIALS_PG"}) & (after.keys() - before.keys())


def test_a_trial_failing_the_same_way_on_every_block_stops_the_run_naming_it(
    tiny_model: Path, tmp_path: Path, no_ray_yet: None
) -> None:
    from rayq.execution.driver import run_sweep

    before = dict(os.environ)
    t0 = time.monotonic()
    with pytest.raises(RunStoppedError) as stopped:
        run_sweep(_sweep(tiny_model), tmp_path / "out", quiet=True, host_class=FailingHost)
    took = time.monotonic() - t0
    print(f"stopped after {took:.1f} s: {stopped.value}")
    assert took < 60
    message = str(stopped.value)
    assert "\n" not in message and "trials of tiny/fp32 failed 3 times" in message and ATTRIBUTE in message, message
    kept = re.search(r"its traceback: (\S+?)\)", message)  # where Tune keeps the traceback, in DIR/_tune
    assert kept is not None and Path(kept[1]).is_file() and kept[1].startswith(str(tmp_path / "out" / "_tune")), message
    assert stopped.value.exit_status == EXIT_INCOMPLETE
    result = stopped.value.result
    assert result is not None and not result.complete and result.failing is not None
    assert _statuses(tmp_path) == []  # no error rows: once fixed, the same command runs every block
    assert _changed(before, dict(os.environ)) <= RAY_INIT_SETS


def test_a_host_found_dead_while_its_trials_wait_gets_its_next_generation(
    tiny_model: Path, tmp_path: Path, no_ray_yet: None
) -> None:
    """A trial that started before Ray had marked its host dead asked for no new generation
    (Launch.trial_started); it then waits for a live host, and the driver's poll must start one.
    Without that the trial waited out HOST_LOOKUP_TIMEOUT_S: 300 s of a suite run, once."""
    import ray

    from rayq.execution.cluster import live_cluster, start_ray
    from rayq.execution.driver import host_config
    from rayq.execution.host_pool import DEAD, READY, HostPool, actor_phase, current_host
    from rayq.execution.progress import Progress
    from rayq.planning.placement import plan_placement
    from rayq.planning.scheduler import Job, Scheduler

    sweep = _sweep(tiny_model, max_trial_retries=0)  # max_restarts 0: a killed host is dead at once
    start_ray(None)
    try:
        store = Store(tmp_path / "out")
        fence = store.take_ownership()
        placed = plan_placement(sweep, live_cluster())
        blocks = {g.key: list(g.block_ids) for g in planner.groups(sweep)}
        jobs = [Job(p.key, p.request, blocks[p.key], 1.0) for p in placed.scheduled]
        pool = HostPool("rayq-race", lambda k, r: host_config(sweep, k, r, None), lambda k: QuickHost, 0.5, 0)
        launch = Launch(sweep, store, fence, {}, Scheduler(placed.cluster, jobs), pool, Progress(24, quiet=True), 60.0)
        key = planner.split_block_id(launch.next_block() or "")[0]  # its host started, one block in flight
        first = pool.hosts[key].handle
        assert ray.get(first.info.remote(), timeout=60)["model"] == "tiny"
        ray.kill(first, no_restart=True)
        deadline = time.monotonic() + 30
        while actor_phase(ray, first) != DEAD:
            assert time.monotonic() < deadline, "Ray never marked the killed host dead"
            time.sleep(0.1)
        launch.poll(force=True)
        assert pool.generation[key] == 2
        second = current_host(ray, key, "rayq-race")
        assert second is not None and ray.get(second.info.remote(), timeout=60)["model"] == "tiny"
        assert actor_phase(ray, second) == READY
        pool.kill_all()
    finally:
        ray.shutdown()


SUBPROCESS_RUN = """
import os, sys
from datetime import UTC, datetime
import ray
from rayq.execution.driver import run_sweep
from rayq.planning import spec
from rayq.store.dataset import completion_row

class QuickHost:  # as in tests/test_launcher.py, which this process does not import (its conftest sets a token)
    def __init__(self, config):
        self.config = config
    def generate_stream(self, completions, every):
        for i in range(0, len(completions), every):
            now = datetime.now(UTC)
            yield [completion_row(self.config.sweep, c, status="ok", text="", n_new_tokens=0, finished_at=now)
                   for c in completions[i : i + every]]
    def info(self):
        return {"model": self.config.model, "precision": self.config.precision, "load_status": "ok"}
    def reference(self):
        return None

model, out = sys.argv[1], sys.argv[2]
sweep = spec.parse({"name": "tiny", "models": [{"name": "tiny", "path": model}], "precisions": ["fp32"],
                    "prompts": ["Life in London", "Hello, my name is"], "grid": {"max_new_tokens": [4]},
                    "runtime": {"num_cpus": 0.5, "flush_every": 2, "layer_sqnr": False}}, "t.yaml")
before = dict(os.environ)
for i in range(2):  # the second starts a local Ray again, in the same process
    result = run_sweep(sweep, f"{out}/{i}", quiet=True, host_class=QuickHost)
    assert result.complete, result.errors
    ray.shutdown()
    changed = sorted(k for k in before.keys() | os.environ.keys() if before.get(k) != os.environ.get(k))
    print(i, *changed)
"""


def test_a_fresh_process_starts_local_ray_twice_with_no_token_left_behind(tiny_model: Path, tmp_path: Path) -> None:
    """A process with no token of its own: the token rayq gives its local Ray is in the
    environment only while Ray starts, the second start in the same process works, and Ray
    writes no token under the home directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_USAGE", "RAY_CLIENT"))}
    env |= {"HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONBREAKPOINT", None)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SUBPROCESS_RUN), str(tiny_model), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [x.split() for x in proc.stdout.splitlines() if x[:1] in "01"]
    assert [x[0] for x in lines] == ["0", "1"], proc.stdout
    for line in lines:  # RAY_AUTH_TOKEN is not among them; RAY_CLIENT_MODE came with `import ray`, before
        assert set(line[1:]) == RAY_INIT_SETS - {"RAY_CLIENT_MODE"}, line
    assert not (tmp_path / "home" / ".ray" / "auth_token").exists()
