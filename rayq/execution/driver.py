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

from rayq.errors import EXIT_FAILED_ROWS, EXIT_INCOMPLETE, EXIT_OK
from rayq.execution import baseline
from rayq.execution.host_pool import HostPool, host_name
from rayq.execution.launcher import write_never_run
from rayq.execution.progress import Progress, fmt_duration
from rayq.host.transformers_host import ModelHost
from rayq.planning import gptq_groups, planner
from rayq.planning.spec import SpecError, Sweep
from rayq.store import manifest, sweep_history
from rayq.store.dataset import DamagedFileWarning, Fence, Store, split_ok
from rayq.store.rates import measured_rates
from rayq.store.storage import normalize

__all__ = ["RunResult", "host_name", "run_sweep", "start_ray", "summary_lines"]

from rayq.execution.cluster import _check_reachable, live_cluster, start_ray


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

    Refusals (a directory held by a live run, or holding another sweep; prompts plus
    max_new_tokens past a model's context, unless `allow_past_context` or the sweep's
    runtime.allow_past_context allows it) raise a rayq.errors.RayqError before anything is
    written. `host_class` and `time_scale` are for benchmarks: a stand-in for `ModelHost`
    (same constructor and methods), and the factor that turns predicted seconds into its seconds.
    """
    spec = sweep.spec
    _check_context(sweep, allow_past_context, quiet)
    gptq_groups.check_sweep(sweep)  # a group size the model's layers do not divide: refused before anything is written
    out = normalize(output or spec.output or f"results/{spec.name}")
    _check_output(out)
    if address or spec.runtime.address:
        _check_reachable(address or spec.runtime.address or "")  # before anything is written
    store = Store(out)
    fence = store.take_ownership(force=force)
    try:
        return _run_owned(
            sweep, store, fence, address, retry_failed, quiet, host_class, time_scale, allow_sweep_change
        )
    finally:
        store.release(fence)


def _check_context(sweep: Sweep, allow: bool, quiet: bool) -> None:
    """Refuse prompts + max_new_tokens past a model's context (rayq.planning.context.ContextError) unless allowed."""
    from rayq.planning import context

    overflows = context.require_fit(sweep, allow)
    if overflows and not quiet:
        print(f"rayq: warning: past the context, as allowed: {context.describe_overflows(overflows)}", flush=True)


def _check_output(out: str) -> None:
    """Refuse an output that is a file, or sits below one, before anything is written."""
    from pathlib import Path

    from rayq.errors import ResultsDirError
    from rayq.store.storage import is_uri

    if is_uri(out):
        return
    p = Path(out)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise ResultsDirError(f"{out}: cannot hold results: {q} is a file, not a directory")
        if q.exists():
            break


def _run_owned(
    sweep: Sweep,
    store: Store,
    fence: Fence,
    address: str | None,
    retry_failed: bool,
    quiet: bool,
    host_class: type | None,
    time_scale: float,
    allow_sweep_change: bool,
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
        disk = store.read(["completion_id", "status", "prompt_id", "sweep"])
    every, ok = split_ok(disk)
    work = planner.remaining_work(sweep, ok if retry_failed else every)
    ids = disk["completion_id"].to_pylist()
    verdict = sweep_history.judge(
        spec.name,
        sweep.text,
        manifest.load(store.storage),
        dict(zip(ids, zip(disk["prompt_id"].to_pylist(), disk["sweep"].to_pylist(), strict=True), strict=True)),
        work.prompt_of,
        store.display,
        allow_sweep_change,
    )
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
    from rayq.catalog import engines
    from rayq.planning import placement

    t0 = time.monotonic()
    rt = sweep.spec.runtime
    measured = measured_rates(store.location)
    placed = placement.plan_placement(
        sweep, live_cluster(rt.gpu_memory), measured=measured, tokens=work.tokens
    )
    result.place_s = time.monotonic() - t0
    refused = engines.refusals(sweep, engines.placed_devices(placed))
    if refused:  # before any host starts: the sweep names an engine that cannot run where it is placed
        raise SpecError("refused before launch, an engine cannot run these hosts where they are placed:\n  "
                        + "\n  ".join(refused))
    remaining = work.remaining
    for p in placed.unplaceable:
        model_name, precision = p.key.split("/", 1)
        write_never_run(
            sweep,
            store,
            fence,
            model_name,
            precision,
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
    host_class: type | None,
    time_scale: float,
) -> None:
    from rayq.catalog import engines
    from rayq.execution.launcher import Launch, TrialContext, run_tune
    from rayq.planning.scheduler import Job, Scheduler

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
    namespace = f"rayq-{fence.run_id[:12]}"

    def host_args(key: str, req: Any, fidelity: dict[str, Any] | None = None) -> tuple[Any, ...]:
        model_name, precision = key.split("/", 1)
        m = models[model_name]
        if fidelity is None and fidelity_cfg is not None:
            fidelity = {**fidelity_cfg, **references.get(model_name, {})}
        return (
            sweep.spec.name,
            {**m.model_dump(), "source": m.source},
            precision,
            rt.num_cpus,
            rt.protocol,
            rt.batch_size,
            sweep.spec.precision_options.get(precision),
            rt.layer_sqnr,
            {"num_gpus": req.num_gpus, "estimated_bytes": req.estimate.total if req.estimate else None},
            fidelity,
            rt.share_greedy,
        )

    fidelity_cfg = baseline.settings(sweep)
    references: dict[str, dict[str, Any]] = {}
    if fidelity_cfg is not None:
        launched = sorted({job.key.split("/", 1)[0] for job in jobs})
        quiet = progress.quiet
        references = baseline.references(
            sweep, fidelity_cfg, store, fence, launched, placed, host_args, host_class or ModelHost, quiet
        )

    def class_of(key: str) -> type:
        """The host class of a group: its model's engine's (rayq.catalog.engines), or a benchmark's stand-in."""
        return host_class or engines.host_class(sweep.spec.engine_of(models[key.split("/", 1)[0]]))

    launch = Launch(
        sweep,
        store,
        fence,
        work.remaining,
        Scheduler(placed.cluster, jobs),
        HostPool(namespace, host_args, class_of, rt.num_cpus, rt.max_trial_retries),
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
