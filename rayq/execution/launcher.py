"""The launcher: Ray Tune runs the blocks, rayq's scheduler decides which may start.

One Tune trial is one block. Tune asks `BlockSearcher.suggest` for its next trial; the
searcher lets the scheduler (rayq.planning.scheduler) start the hosts that fit now and hands out a
block of a started host, or nothing for now. A `tune.grid_search` cannot say "not now": it
once let trials hold every concurrency slot while they waited for a host that could not be
placed, beside an idle host holding the GPUs (issue 10). `TrialEvents` (a Tune callback)
books what ends, retires hosts, records failed blocks, shows progress and writes the live
status; `Watchdog` (a Tune stopper) ends a run in which nothing has progressed for
`runtime.stall_timeout_s`, or whose trials fail the same way block after block
(rayq.execution.failures: a bug, which retries cannot fix). The plug-ins are classes of their own
(rayq.execution.tune_plugins, imported with Tune when a run starts); they share one `Launch`,
the driver's side of the run, which holds all of its state.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rayq.catalog.hosts import HostKey
from rayq.errors import EXIT_INCOMPLETE, RayqError
from rayq.execution.failures import RepeatedFailures
from rayq.execution.host_pool import DEAD, LOADING, PLACING, READY, RESTARTING, HostPool, alive, current_host, host_name
from rayq.execution.progress import Progress, fmt_duration
from rayq.planning import planner
from rayq.planning.scheduler import Scheduler, need_text
from rayq.planning.spec import Sweep
from rayq.store import live_status
from rayq.store.dataset import Fence, Store

# How long a trial waits for its host to appear, and to come back after its node or process
# was lost, before the trial fails (Tune then retries it). Read from the environment so a
# test can shorten them; Ray workers inherit the driver's environment.
HOST_LOOKUP_TIMEOUT_S = float(os.environ.get("RAYQ_HOST_LOOKUP_TIMEOUT_S", "300"))
HOST_RECOVERY_TIMEOUT_S = float(os.environ.get("RAYQ_HOST_RECOVERY_TIMEOUT_S", "180"))
POLL_S = 1.0  # how often the driver reads the hosts' phases
STATUS_EVERY_S = 5.0  # how often it rewrites run_status.json


class HostLookupError(RayqError):
    """A trial found no host for its block: the driver started none, or it vanished. The trial
    fails (Tune retries it); on every block, RepeatedFailures stops the run naming it."""

    exit_status = EXIT_INCOMPLETE


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, shipped once through the object store."""

    sweep: Sweep
    store_root: str
    fence: Fence
    namespace: str
    remaining: dict[str, list[str] | None]  # block id -> remaining ids (None: all of the block)


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def block_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: one block of completions, sent to its host whole (so its rows fill the
    host's batch) and committed in parts of `runtime.flush_every` as they end."""
    import ray
    from ray import tune

    bid = config["block"]
    group_key, model_name, precision = planner.split_block_id(bid)
    model = next(m for m in ctx.sweep.spec.models if m.name == model_name)
    wanted = ctx.remaining[bid]
    wanted_set = set(wanted) if wanted is not None else None
    todo = [
        c.to_dict()
        for c in planner.iter_completions(ctx.sweep, model, precision, only_block=bid)
        if wanted_set is None or c.completion_id in wanted_set
    ]
    host = _lookup_host(ray, group_key, ctx.namespace)
    store = Store(ctx.store_root)
    for rows in _stream_host(ray, host, todo, ctx.sweep.spec.runtime.flush_every):
        store.write(model_name, precision, rows, ctx.fence)
        tune.report({"written": len(rows), "failed": sum(r["status"] != "ok" for r in rows)})


def _stream_host(ray: Any, host: Any, todo: list[dict[str, Any]], every: int) -> Iterator[list[dict[str, Any]]]:
    """The host's rows for `todo` in parts, riding out the host's restart after its node or
    process was lost: what it had not returned is sent again to the restarted host.

    A call to a host on a lost node fails within seconds as "temporarily unavailable", but
    the host is only declared dead (and restarted elsewhere) some 15 s later; retrying the
    whole trial in that window would spend Tune's retries on nothing. A part may or may not
    have been committed when the host was lost: completions are keyed, so a second copy is
    removed at compaction.
    """
    from ray.exceptions import ActorUnavailableError, RayActorError

    left = todo
    deadline: float | None = None  # set at the first failure since the host last answered
    while left:
        try:
            for ref in host.generate_stream.options(num_returns="streaming").remote(left, every):
                rows = ray.get(ref)
                deadline = None
                got = {r["completion_id"] for r in rows}
                left = [c for c in left if c["completion_id"] not in got]
                yield rows
            return
        except (ActorUnavailableError, RayActorError):
            deadline = deadline if deadline is not None else time.monotonic() + HOST_RECOVERY_TIMEOUT_S
            if time.monotonic() > deadline or not alive(ray, host):
                raise  # gone for good (out of restarts): fail the trial now; its retry finds the new host
            time.sleep(2.0)


def _lookup_host(ray: Any, group_key: str, namespace: str) -> Any:
    """The group's live host, waiting for it to appear.

    A host found dead (its node lost, out of restarts) is waited past, not returned: the
    retried trial that asks is what makes the pool start the next generation, and a trial
    handed the dead one would fail at once and spend another of Tune's retries on nothing.
    """
    deadline = time.monotonic() + HOST_LOOKUP_TIMEOUT_S
    while True:
        host = current_host(ray, group_key, namespace)
        if host is not None and alive(ray, host):
            return host
        if time.monotonic() > deadline:
            raise HostLookupError(
                f"no host {host_name(group_key)} in namespace {namespace} after {HOST_LOOKUP_TIMEOUT_S:g} s"
            )
        time.sleep(0.1)


@dataclass
class Launch:
    """The driver's side of one run: what the Tune plug-ins share instead of eight arguments."""

    sweep: Sweep
    store: Store
    fence: Fence
    remaining: dict[str, list[str] | None]
    scheduler: Scheduler
    pool: HostPool
    progress: Progress
    stall_timeout_s: float
    errors: list[str] = field(default_factory=list)
    host_infos: list[dict[str, Any]] = field(default_factory=list)
    stalled: str | None = None
    phases: dict[str, str] = field(default_factory=dict)
    phase_since: dict[str, float] = field(default_factory=dict)
    last_progress: float = field(default_factory=time.monotonic)
    last_poll: float = 0.0
    last_status: float = 0.0
    blocks_done: dict[str, int] = field(default_factory=dict)
    failures: RepeatedFailures = field(default_factory=RepeatedFailures)
    failing: str | None = None  # why the run stopped: the same error on block after block of a host
    failing_host: str | None = None
    # Blocks out of retries whose error rows are not written yet, per host: written once a
    # block of the host succeeds, the host retires or the run ends, but never for the host
    # whose every block fails (its blocks run again when the run is resumed, once fixed).
    unwritten: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def stop_reason(self) -> str | None:
        """Why the run must stop now (a stall, a failure on every block); None while it goes on."""
        return self.stalled or self.failing

    @property
    def all_admitted(self) -> bool:
        return self.scheduler.all_admitted

    # -- admission ------------------------------------------------------------------
    def next_block(self) -> str | None:
        now = time.monotonic()
        for key, slot in self.scheduler.start_hosts(now):
            h = self.scheduler.hosts[key]
            self.pool.start(key, h.job.request, slot, now)
            self.phases[key], self.phase_since[key] = PLACING, now
        pick = self.scheduler.next_block()
        return pick.block if pick else None

    def trial_started(self, bid: str, now: float) -> None:
        key = planner.split_block_id(bid)[0]
        if self.pool.ensure(key, now):  # a retried trial of a host out of restarts
            self.phases[key] = PLACING

    def rows_reported(self, n: int) -> None:
        self.progress.add(n)
        self.progressed()

    # -- what ends --------------------------------------------------------------------
    def trial_failed(self, bid: str, error: str, error_file: str | None = None) -> None:
        """A trial failed, to be retried or for good: the same error on block after block stops the run."""
        key = planner.split_block_id(bid)[0]
        reason = self.failures.failed(key, bid, error)
        if reason is not None and self.failing is None:
            where = f" (its traceback: {error_file})" if error_file else ""
            self.failing, self.failing_host = reason + where, key
            self.errors.append(f"stopped: {self.failing}")

    def block_ended(self, bid: str, failed: str | None) -> None:
        key = planner.split_block_id(bid)[0]
        self.blocks_done[key] = self.blocks_done.get(key, 0) + 1
        if failed is None:
            self.failures.succeeded(key)
            self.write_failed_blocks(key)  # the host works: its failed blocks were their own
        else:
            retries = self.sweep.spec.runtime.max_trial_retries
            self.errors.append(f"block {bid} failed after {retries} retries: {failed}")
            self.unwritten.setdefault(key, []).append((bid, failed))
        self.progressed()
        if self.scheduler.block_ended(bid) is not None:
            self.retire(key)

    def write_failed_blocks(self, key: str) -> None:
        """Rows of status error for the blocks of host `key` that ran out of retries (none for the failing host)."""
        failed = self.unwritten.pop(key, [])
        if not failed or key == self.failing_host:
            return
        host = HostKey.parse(key)
        present = self.store.partition_ids(host.model, host.precision)
        for bid, error in failed:
            write_never_run(
                self.sweep,
                self.store,
                self.fence,
                host.model,
                host.precision,
                lambda c, bid=bid: c.block_id == bid and c.completion_id not in present,
                "error",
                f"block failed after retries: {error}",
            )

    def finish(self) -> None:
        """The run's end (complete, stopped or interrupted): write the failed blocks' rows still owed."""
        for key in list(self.unwritten):
            self.write_failed_blocks(key)

    def retire(self, key: str) -> None:
        self.write_failed_blocks(key)
        host = HostKey.parse(key)
        info = self.pool.retire(key)
        if isinstance(info, dict):
            self.host_infos.append({k: v for k, v in info.items() if k != "layers"})  # layers: own table
            self.store.write_model_info(self.sweep.spec.name, info, self.fence)
        elif info is not None:
            self.errors.append(f"host {key}: {info}")
        self.phases[key] = "retired"
        self.store.compact(host.model, host.precision, self.fence)

    def progressed(self) -> None:
        self.last_progress = time.monotonic()

    # -- watching ---------------------------------------------------------------------
    def poll(self, force: bool = False) -> None:
        """Read the hosts' phases, check for a stall, show and write what waits."""
        now = time.monotonic()
        if not force and now - self.last_poll < POLL_S:
            return
        self.last_poll = now
        for key, phase in self.pool.phases().items():
            if phase == DEAD and self.scheduler.hosts[key].in_flight and self.pool.ensure(key, now):
                # Its trials wait for a live host (_lookup_host). A trial that started before Ray
                # had marked the host dead did not start the next generation (trial_started), and
                # without this its trials would wait out HOST_LOOKUP_TIMEOUT_S.
                phase = PLACING
            if self.phases.get(key) != phase:
                if phase in (LOADING, READY):
                    self.progressed()  # it got its resources, or finished loading
                self.phases[key], self.phase_since[key] = phase, now
        loading = any(p == LOADING for p in self.phases.values())
        idle_for = now - self.last_progress
        if self.stalled is None and not loading and idle_for > self.stall_timeout_s:
            stuck = self.stuck(now)
            self.stalled = (
                f"no progress for {fmt_duration(idle_for)} (runtime.stall_timeout_s = {self.stall_timeout_s:g}); "
                f"stuck: {'; '.join(stuck) or 'nothing in rayq is waiting: check the cluster'}"
            )
            self.errors.append(f"stopped: {self.stalled}")
        self.progress.note = self.note()
        self.progress.tick()
        if force or now - self.last_status >= STATUS_EVERY_S:
            self.last_status = now
            try:
                live_status.write(self.store.storage, self.status(now))
            except OSError as e:  # a view only: a failed write must not stop the run
                self.errors.append(f"run_status.json not written: {e}")

    def stuck(self, now: float) -> list[str]:
        """What holds the run up: hosts waiting for resources, hosts Ray has not placed, hosts silent."""
        lines = list(self.scheduler.waiting())
        for key, phase in self.phases.items():
            since = fmt_duration(now - self.phase_since.get(key, now))
            if phase == PLACING:
                req = self.scheduler.hosts[key].job.request
                lines.append(f"{key} asked Ray for {_need(req)} {since} ago and has not been placed")
            elif phase == RESTARTING:
                lines.append(f"{key} restarting for {since}")
            elif phase == READY and self.scheduler.hosts[key].in_flight:
                lines.append(f"{key} ready but no completion committed for {fmt_duration(now - self.last_progress)}")
            elif phase == DEAD:
                lines.append(f"{key} dead (out of restarts)")
        return lines

    def note(self) -> str:
        counts: dict[str, int] = {}
        for p in self.phases.values():
            counts[p] = counts.get(p, 0) + 1
        running = ", ".join(f"{n} {p}" for p, n in sorted(counts.items()) if p != "retired")
        waiting = self.scheduler.waiting()
        text = f"hosts: {running or 'none running'}"
        if waiting:
            text += f"; {waiting[0]}" + (f" (+{len(waiting) - 1} more waiting)" if len(waiting) > 1 else "")
        return text

    def status(self, now: float) -> dict[str, Any]:
        hosts = []
        for key, h in self.scheduler.hosts.items():
            phase = self.phases.get(key, h.state)
            note = ""
            if phase == PLACING:
                note = f"asked Ray for {_need(h.job.request)} {fmt_duration(now - self.phase_since.get(key, now))} ago"
            hosts.append(
                {
                    "key": key,
                    "phase": phase,
                    "blocks": len(h.job.blocks),
                    "blocks_done": self.blocks_done.get(key, 0),
                    "note": note,
                }
            )
        return {
            "run_id": self.fence.run_id,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "updated_unix": time.time(),
            "summary": self.progress.line(),  # with the note: hosts by phase, the first that waits
            "hosts": hosts,
            "waiting": self.scheduler.waiting(),
            "stalled": self.stalled,
        }


def _need(req: Any) -> str:

    return need_text(req)


def write_never_run(
    sweep: Sweep,
    store: Store,
    fence: Fence,
    model_name: str,
    precision: str,
    keep: Callable[[planner.Completion], bool],
    status: str,
    error: str,
) -> int:
    """Rows for the completions of one host that never ran (it fits nowhere, or their block
    kept failing), so every completion is accounted for and `--retry-failed` knows what to run."""
    from rayq.store.dataset import completion_row

    model = next(m for m in sweep.spec.models if m.name == model_name)
    now = datetime.now(UTC)
    rows = [
        completion_row(sweep.spec.name, c.to_dict(), status=status, error=error, finished_at=now)
        for c in planner.iter_completions(sweep, model, precision)
        if keep(c)
    ]
    for chunk in _chunks(rows, 10_000):
        store.write(model_name, precision, chunk, fence)
    return len(rows)


def newest_first() -> Any:
    """Tune's trial scheduler for rayq: FIFO, except that the newest pending trial starts first
    (rayq.execution.tune_plugins.NewestFirst says why)."""
    from rayq.execution.tune_plugins import NewestFirst

    return NewestFirst()


def run_tune(launch: Launch, storage_path: str, max_retries: int, ctx: TrialContext) -> None:
    """Run every admitted block as a Tune trial until the scheduler has nothing left, or the launch stops it."""
    from ray import tune

    from rayq.execution.cluster import scoped_env
    from rayq.execution.tune_plugins import BlockSearcher, NewestFirst, TrialEvents, Watchdog

    # A trial only waits on its host, so it holds no CPU; Tune needs a non-empty request.
    trainable = tune.with_resources(tune.with_parameters(block_trial, ctx=ctx), {"cpu": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=BlockSearcher(launch), scheduler=NewestFirst(), num_samples=-1, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name=f"run-{launch.fence.run_id[:12]}",
            storage_path=storage_path,
            verbose=0,
            stop=Watchdog(launch),
            failure_config=tune.FailureConfig(max_failures=max_retries),
            callbacks=[TrialEvents(launch)],
        ),
    )
    # Tune asks the searcher for another trial only while fewer than this many are pending;
    # its default for a custom searcher without a ConcurrencyLimiter is 1, which would start
    # trials one at a time. Read when the run starts, so set for the run only: a caller's own
    # value stays.
    pending = {"TUNE_MAX_PENDING_TRIALS_PG": str(max(8, 2 * len(launch.scheduler.hosts)))}
    try:
        with scoped_env(pending):
            tuner.fit()
    finally:
        launch.pool.kill_all()
        launch.finish()
        launch.poll(force=True)
