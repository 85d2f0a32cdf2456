"""The driver: start or join Ray, place and schedule the hosts, run the blocks, resume.

Data flow: the plan's completion ids minus the ids already on disk give the remaining
work; placement sizes each host and predicts its duration; the scheduler (rayq.planning.scheduler)
decides which host starts when and which block runs next; Ray Tune runs each admitted block
as one trial (rayq.execution.launcher). A trial sends its block to its (model, precision) host whole
and commits the rows in parts of `runtime.flush_every` as the host returns them. The dataset,
never Tune's state, says what is done.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from rayq.catalog.hosts import HostKey
from rayq.errors import EXIT_FAILED_ROWS, EXIT_INCOMPLETE, EXIT_OK, RunStoppedError
from rayq.execution import baseline
from rayq.execution.host_pool import HostPool, host_name
from rayq.execution.launcher import write_never_run
from rayq.execution.progress import Progress, fmt_duration
from rayq.host.config import HostConfig
from rayq.host.protocol import HostClass, require_host_class
from rayq.planning import planner
from rayq.planning.spec import Sweep
from rayq.store import done, manifest
from rayq.store.dataset import DamagedFileWarning, Fence, Store, split_ok
from rayq.store.preflight import Preflight, preflight
from rayq.store.rates import measured_rates
from rayq.store.storage import normalize
from rayq.store.sweep_history import Verdict

__all__ = ["RunResult", "host_name", "run_sweep", "start_ray", "summary_lines"]

from rayq.catalog import engines
from rayq.execution.cluster import _check_reachable, live_cluster, run_env, start_ray
from rayq.planning.scheduler import Job, Scheduler


@dataclass
class RunResult:
    output: str  # the results' location: an absolute local path or a URI
    planned: int
    done_before: int
    written: int
    on_disk: int
    wall_s: float
    hosts: list[dict[str, Any]] = field(default_factory=list)
    place_s: float | None = None  # time to read the cluster and place the hosts
    errors: list[str] = field(default_factory=list)
    stalled: str | None = None  # why the watchdog stopped the run, if it did
    failing: str | None = None  # the error every block of a host failed with, if that stopped the run
    failed: int = 0  # planned completions on disk whose row is not ok (error, oom, unplaceable)
    quarantined: list[dict[str, str]] = field(default_factory=list)  # unreadable files moved aside
    sweep_change: str = "new"  # new, same, extension, revised or changed (see rayq.store.sweep_history)

    @property
    def complete(self) -> bool:
        return self.on_disk >= self.planned

    @property
    def exit_status(self) -> int:
        """0 complete and all ok, 1 complete with failed rows, 3 incomplete (docs/cli.md)."""
        if not self.complete:
            return EXIT_INCOMPLETE
        return EXIT_FAILED_ROWS if self.failed else EXIT_OK


def run_sweep(
    sweep: Sweep,
    output: str | os.PathLike[str] | None = None,
    address: str | None = None,
    retry_failed: bool = False,
    force: bool = False,
    quiet: bool = False,
    host_class: type | None = None,
    time_scale: float = 1.0,
    allow_sweep_change: bool = False,
    allow_past_context: bool = False,
) -> RunResult:
    """Run what the dataset at `output` lacks of `sweep`; the same call resumes a stopped run.

    Every refusal the preflight makes (rayq.store.preflight: an output that is a file, a
    directory holding another sweep, an engine that cannot run a precision where its hosts
    run, a package not installed, a GPTQ group size, prompts past a model's context unless
    `allow_past_context` or the sweep's runtime.allow_past_context allows it), and a directory
    held by a live run, raise a rayq.errors.RayqError before Ray starts and before anything is
    written. `host_class` and `time_scale` are for benchmarks: a stand-in host (a class built
    from a HostConfig that satisfies rayq.host.protocol.Host), and the factor that turns
    predicted seconds into its seconds.
    """
    spec = sweep.spec
    out = normalize(output or spec.output or f"results/{spec.name}")
    joined = address or spec.runtime.address or _connected_cluster()
    pre = preflight(
        sweep, out, allow_past_context=allow_past_context, allow_sweep_change=allow_sweep_change, address=joined
    )
    assert pre.verdict is not None  # an output was given: the directory was judged
    if not quiet:
        _say_warnings(pre)
    if address or spec.runtime.address:
        _check_reachable(address or spec.runtime.address or "")  # before anything is written
    store = Store(out)
    fence = store.take_ownership(force=force)
    try:
        return _run_owned(sweep, store, fence, address, retry_failed, quiet, host_class, time_scale, pre.verdict)
    finally:
        store.release(fence)


def _connected_cluster() -> str | None:
    """A name for the Ray this process is connected to already (a notebook's `ray.init`), when it
    spans more than this machine: its hosts may run elsewhere, so this machine's packages and
    GPUs decide nothing. None when there is none, or it is a Ray of this machine only."""
    import sys

    ray = sys.modules.get("ray")  # never imported here just to ask
    if ray is None or not ray.is_initialized():
        return None
    me = ray.get_runtime_context().get_node_id()
    if all(n["NodeID"] == me for n in ray.nodes() if n.get("Alive")):
        return None
    return "the Ray cluster this process is connected to"


def _say_warnings(pre: Preflight) -> None:
    """What the preflight allowed but a user should hear: prompts past the context, packages missing here."""
    from rayq.planning import context

    if pre.overflows:
        print(f"rayq: warning: past the context, as allowed: {context.describe_overflows(pre.overflows)}", flush=True)
    for w in pre.warnings:
        print(f"rayq: warning: {w} (the cluster's workers may have it)", flush=True)


def _run_owned(
    sweep: Sweep,
    store: Store,
    fence: Fence,
    address: str | None,
    retry_failed: bool,
    quiet: bool,
    host_class: type | None,
    time_scale: float,
    verdict: Verdict,
) -> RunResult:
    t0 = time.monotonic()
    spec = sweep.spec
    groups = planner.groups(sweep)
    # Unreadable files are skipped by every read below, then moved aside. The read of the
    # completions parses each of their footers already; the other tables' are parsed here.
    # The run says itself what it moves, so the readers' warning is not repeated.
    store.verify(tables=("models", "layers"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DamagedFileWarning)
        work = done.remaining_work(sweep, store, retry_failed)  # the one rule of what is done (rayq.store.done)
    # The preflight judged the directory against the sweep before the lock was taken (and
    # refused another sweep); the lock keeps any other run from writing since.
    manifest.start_run(
        store.storage,
        sweep.path,
        sweep.text,
        spec.name,
        {g.key: g.n_completions for g in groups},
        fence.run_id,
        verdict=verdict,
    )
    result = RunResult(store.location, work.planned, work.done_before, 0, work.done_before, 0.0)
    result.sweep_change = verdict.kind
    if not quiet:
        print(
            f"rayq: sweep {spec.name!r}: {work.planned} completions planned, "
            f"{work.done_before} already in {store.display}",
            flush=True,
        )
    _quarantine_damaged(store, fence, result, quiet)
    if not quiet:
        if verdict.kind in ("extension", "revised", "changed"):
            what = {"extension": "extending", "revised": "a revised", "changed": "changing (allowed)"}[verdict.kind]
            print(f"rayq: {what} sweep {spec.name!r} in {store.display}: {verdict.detail}", flush=True)
    progress = Progress(work.planned, work.done_before, quiet=quiet)
    try:
        if work.remaining:
            with run_env():  # Tune's settings for this run only: the caller's environment is left as it was
                start_ray(address or spec.runtime.address)
                placed = _place(sweep, store, fence, work, result, quiet)
                _launch(sweep, store, fence, work, groups, progress, result, placed, host_class, time_scale)
        for model_name, precision in store.partitions():
            store.compact(model_name, precision, fence)
        _quarantine_damaged(store, fence, result, quiet)  # files compaction could not read
        every, ok = split_ok(store.read(["completion_id", "status"]))
        on_disk = every & work.planned_ids
        result.on_disk, result.failed = len(on_disk), len(on_disk - ok)
        # The dataset is the truth: an interrupted Tune loop may not report its last chunks.
        result.written = result.on_disk - work.done_before
        result.wall_s = time.monotonic() - t0
    finally:
        progress.close()
        manifest.end_run(
            store.storage,
            fence.run_id,
            written=result.written,
            on_disk=result.on_disk,
            complete=result.complete,
            failed=result.failed,
            quarantined=len(result.quarantined),
            wall_s=round(time.monotonic() - t0, 3),
            hosts=result.hosts,
            errors=result.errors,
        )
    if result.failing is not None:  # a bug, not bad data: said as one line, exit status 3 (docs/cli.md)
        raise RunStoppedError(f"run stopped: {result.failing}; fix it, then run again to resume", result)
    return result


def _quarantine_damaged(store: Store, fence: Fence, result: RunResult, quiet: bool) -> None:
    """Move aside the files this run's reads found unreadable and has not moved yet, and record them.

    Called at the start (files the first reads met) and after compaction, which reads every
    column and so meets a corrupt page that the footer check could not see; the rows of a
    file moved then count as missing, so that run ends incomplete and the next one redoes them.
    """
    moved_before = {q["file"] for q in result.quarantined}
    pending = {store.relative(p): r for p, r in store.damaged.items() if store.relative(p) not in moved_before}
    if not pending:
        return
    moved = [{**q, "reason": pending[q["file"]]} for q in store.quarantine(sorted(pending), fence.run_id)]
    manifest.record_quarantine(store.storage, fence.run_id, moved)
    result.quarantined.extend(moved)
    if not quiet:
        for q in moved:
            print(
                f"rayq: moved unreadable {q['file']} to {q['moved_to']} ({q['reason']}); its completions run again",
                flush=True,
            )


def _place(sweep: Sweep, store: Store, fence: Fence, work: planner.Work, result: RunResult, quiet: bool) -> Any:
    """Place the hosts on the live cluster; record the completions of unplaceable ones as such."""
    from rayq.planning import placement
    from rayq.planning.preflight import refuse_engines

    t0 = time.monotonic()
    rt = sweep.spec.runtime
    measured = measured_rates(store.location)
    placed = placement.plan_placement(sweep, live_cluster(rt.gpu_memory), measured=measured, tokens=work.tokens)
    result.place_s = time.monotonic() - t0
    # The preflight's engine check again, now that the devices are known: on a joined cluster
    # with runtime.num_gpus auto they were not before. Before any host starts.
    refuse_engines(sweep, engines.placed_devices(placed), "as placed on the cluster", here=False)
    remaining = work.remaining
    for p in placed.unplaceable:
        host = HostKey.parse(p.key)
        write_never_run(
            sweep,
            store,
            fence,
            host.model,
            host.precision,
            lambda c: (
                c.block_id in remaining and (remaining[c.block_id] is None or c.completion_id in remaining[c.block_id])
            ),
            "unplaceable",
            f"unplaceable: {p.request.unplaceable}",
        )
        result.errors.append(f"host {p.key}: unplaceable: {p.request.unplaceable}")
    if not quiet:
        n_un = len(placed.unplaceable)
        print(
            f"rayq: placed {len(placed.scheduled)} hosts, {placed.at_once} at once, in "
            f"{result.place_s * 1000:.0f} ms; predicted {fmt_duration(placed.makespan_s)} on {placed.gpu}"
            + (f"; {n_un} unplaceable (recorded as status=unplaceable)" if n_un else ""),
            flush=True,
        )
    return placed


def _launch(
    sweep: Sweep,
    store: Store,
    fence: Fence,
    work: planner.Work,
    groups: list[planner.Group],
    progress: Progress,
    result: RunResult,
    placed: Any,
    host_class: HostClass | None,
    time_scale: float,
) -> None:
    from rayq.execution.launcher import Launch, TrialContext, run_tune

    rt = sweep.spec.runtime
    where = placed.by_key()
    models = {m.name: m for m in sweep.spec.models}
    jobs = []
    for i, g in enumerate(groups):
        p = where[g.key]
        blocks = [b for b in g.block_ids if b in work.remaining]
        if blocks and not p.unplaceable:
            jobs.append(Job(g.key, p.request, blocks, p.predicted_s * time_scale, i))
    if not jobs:
        return
    if host_class is not None:  # a benchmark's stand-in: refused now, not in every trial
        require_host_class(host_class)
    namespace = f"rayq-{fence.run_id[:12]}"

    def config_of(key: str, req: Any, fidelity: dict[str, Any] | None = None) -> HostConfig:
        """A host's config, with its model's baseline reference (`fidelity` given: the baseline's own host)."""
        if fidelity is None and fidelity_cfg is not None:
            fidelity = {**fidelity_cfg, **references.get(HostKey.parse(key).model, {})}
        return host_config(sweep, key, req, fidelity)

    fidelity_cfg = baseline.settings(sweep)
    references: dict[str, dict[str, Any]] = {}
    if fidelity_cfg is not None:
        launched = sorted({HostKey.parse(job.key).model for job in jobs})
        quiet = progress.quiet
        references = baseline.references(
            sweep, fidelity_cfg, store, fence, launched, placed, config_of, host_class, quiet
        )

    def class_of(key: str) -> HostClass:
        """The host class of a group: its model's engine's, or a benchmark's stand-in. Called by the
        host pool where it creates the actor: the engine's module is imported by its path
        (rayq.catalog.engines), never by this module, and imports no torch until the actor loads."""
        return host_class or engines.host_class(sweep.spec.engine_of(models[HostKey.parse(key).model]))

    launch = Launch(
        sweep,
        store,
        fence,
        work.remaining,
        Scheduler(placed.cluster, jobs),
        HostPool(namespace, config_of, class_of, rt.num_cpus, rt.max_trial_retries),
        progress,
        rt.stall_timeout_s,
    )
    ctx = TrialContext(sweep, store.location, fence, namespace, work.remaining)
    try:
        run_tune(launch, store.tune_dir, rt.max_trial_retries, ctx)
    finally:
        result.errors.extend(launch.errors)
        result.hosts.extend(launch.host_infos)
        result.stalled = launch.stalled
        result.failing = launch.failing


def host_config(sweep: Sweep, key: str, req: Any, fidelity: dict[str, Any] | None) -> HostConfig:
    """What the host of group `key` starts with, on the resources `req` asks for: one value, by keyword."""
    rt = sweep.spec.runtime
    host = HostKey.parse(key)
    m = next(m for m in sweep.spec.models if m.name == host.model)
    return HostConfig(
        sweep=sweep.spec.name,
        model=m.name,
        source=m.source,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        context=m.size.context if m.size else None,
        precision=host.precision,
        num_cpus=rt.num_cpus,
        num_gpus=req.num_gpus,
        estimated_bytes=req.estimate.total if req.estimate else None,
        protocol=rt.protocol,
        batch_size=rt.batch_size,
        precision_options=sweep.spec.precision_options.get(host.precision) or {},
        layer_sqnr=rt.layer_sqnr,
        fidelity=fidelity,
        share_greedy=rt.share_greedy,
    )


def summary_lines(result: RunResult) -> list[str]:
    """A short human summary of a finished run, read back from the dataset."""
    import polars as pl

    store = Store(result.output)
    lines = [
        f"rayq: {result.written} completions written in {fmt_duration(result.wall_s)} "
        f"({result.written / result.wall_s if result.wall_s else 0:.2f}/s); "
        f"{result.on_disk}/{result.planned} on disk{'' if result.complete else ' (incomplete: run again to resume)'}",
        f"rayq: results in {store.root / 'completions' if store.storage.is_local else store.display} "
        f"(hive-partitioned Parquet; rayq status {store.display})",
    ]
    table = store.read(["status", "tokens_per_s", "n_new_tokens", "duplicate_content_words", "content_words"])
    if table.num_rows:
        df = pl.from_arrow(table)
        assert isinstance(df, pl.DataFrame)
        agg = (
            df.group_by("model", "precision")
            .agg(
                pl.len().alias("rows"),
                (pl.col("status") != "ok").sum().alias("failed"),
                pl.col("tokens_per_s").mean().round(2).alias("mean_tok_s"),
                pl.col("n_new_tokens").mean().round(1).alias("mean_new_tokens"),
                pl.col("content_words").mean().round(1).alias("mean_content_words"),
                pl.col("duplicate_content_words").mean().round(2).alias("mean_duplicates"),
            )
            .sort("model", "precision")
        )
        with pl.Config(tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_width_chars=120):
            lines.append(str(agg))
    for e in result.errors:
        lines.append(f"rayq: error: {e}")
    if result.stalled:
        lines.append("rayq: the run stopped because nothing progressed; what is done is kept: run again to resume")
    return lines
