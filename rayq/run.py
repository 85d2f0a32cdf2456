"""The driver: start or join Ray, drive the blocks with Ray Tune, stream rows to the store, resume.

Data flow: the plan's completion ids minus the ids already on disk give the remaining
work; its blocks become the values of one `tune.grid_search`, one trial per block. A trial
sends its block to the (model, precision) host in chunks of `runtime.flush_every` and
commits each chunk as one Parquet file. The dataset, never Tune's state, says what is done.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayq import manifest, plan
from rayq.host import ModelHost, torch_threads
from rayq.progress import Progress, fmt_duration
from rayq.spec import Sweep
from rayq.storage import normalize
from rayq.store import Fence, Store

# How long a trial waits for its host to appear, and to come back after its node or process
# was lost, before the trial fails (Tune then retries it). Read from the environment so a
# test can shorten them; Ray workers inherit the driver's environment.
HOST_LOOKUP_TIMEOUT_S = float(os.environ.get("RAYQ_HOST_LOOKUP_TIMEOUT_S", "300"))
HOST_RECOVERY_TIMEOUT_S = float(os.environ.get("RAYQ_HOST_RECOVERY_TIMEOUT_S", "180"))


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

    @property
    def complete(self) -> bool:
        return self.on_disk >= self.planned


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, shipped once through the object store."""

    sweep: Sweep
    store_root: str
    fence: Fence
    namespace: str
    remaining: dict[str, list[str] | None]  # block id -> remaining ids (None: all of the block)


def host_name(group_key: str) -> str:
    return "rayq-host:" + group_key


def _quiet_ray_env() -> None:
    # Tune's result loggers are off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS), so its analysis
    # warns that no result files exist; the dataset is the record, so silence it.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    # The warning that token authentication is on: it is on, with a token rayq keeps in
    # the environment rather than under the home directory.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")


def start_ray(address: str | None) -> None:
    """Join `address`, or start a private local Ray instance.

    A local instance gets a fresh session even if a killed earlier run left Ray processes
    behind (address="local"), and a token kept in the environment, so Ray writes no auth
    token under the home directory.
    """
    import ray

    if ray.is_initialized():
        return
    _quiet_ray_env()
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    if address:
        ray.init(address=address, **kwargs)
        return
    # ray.init sets RAY_AUTH_MODE=token in this process's environment; a later local start
    # (a resumed run in the same process) still needs a token, or the new GCS aborts.
    token_mode = os.environ.get("RAY_AUTH_MODE", "token") != "disabled"
    if token_mode and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    ray.init(address="local", **kwargs)


def _chunks(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def block_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """One Tune trial: one block of completions, sent to its host in chunks, committed as it goes."""
    import ray
    from ray import tune

    bid = config["block"]
    group_key, model_name, precision = plan.split_block_id(bid)
    model = next(m for m in ctx.sweep.spec.models if m.name == model_name)
    wanted = ctx.remaining[bid]
    wanted_set = set(wanted) if wanted is not None else None
    todo = [
        c.to_dict()
        for c in plan.iter_completions(ctx.sweep, model, precision)
        if c.block_id == bid and (wanted_set is None or c.completion_id in wanted_set)
    ]
    host = _lookup_host(ray, group_key, ctx.namespace)
    store = Store(ctx.store_root)
    for chunk in _chunks(todo, ctx.sweep.spec.runtime.flush_every):
        rows = _call_host(ray, host, chunk, group_key, ctx.namespace)
        store.write(model_name, precision, rows, ctx.fence)
        tune.report({"written": len(rows), "failed": sum(r["status"] != "ok" for r in rows)})


def _call_host(ray: Any, host: Any, chunk: list[dict[str, Any]], key: str, namespace: str) -> list[dict[str, Any]]:
    """Send a chunk to its host, riding out the host's restart after its node or process was lost.

    A call to a host on a lost node fails within seconds as "temporarily unavailable", but
    the host is only declared dead (and restarted elsewhere) some 15 s later; retrying the
    whole trial in that window would spend Tune's retries on nothing. The chunk may or may
    not have run: completions are keyed, so a second copy is removed at compaction.
    """
    from ray.exceptions import ActorUnavailableError, RayActorError

    deadline = time.monotonic() + HOST_RECOVERY_TIMEOUT_S
    while True:
        try:
            return ray.get(host.generate.remote(chunk))
        except (ActorUnavailableError, RayActorError):
            if time.monotonic() > deadline or not _alive(ray, key, namespace):
                raise  # gone for good (out of restarts): fail the trial now, not at the deadline
            time.sleep(2.0)


def _alive(ray: Any, key: str, namespace: str) -> bool:
    """Whether a host may still answer (alive, or restarting) rather than dead for good.

    A dead named actor is still returned by `ray.get_actor`, so its state is read from the
    GCS; Ray's public state API needs the dashboard, which rayq leaves off.
    """
    try:
        handle = ray.get_actor(host_name(key), namespace=namespace)
    except ValueError:
        return False
    try:
        from ray._private import state

        return state.actors(actor_id=handle._actor_id.hex()).get("State") != "DEAD"
    except Exception:  # noqa: BLE001 - a Ray without that table: assume it may come back
        return True


def _lookup_host(ray: Any, group_key: str, namespace: str) -> Any:
    deadline = time.monotonic() + HOST_LOOKUP_TIMEOUT_S
    while True:
        try:
            return ray.get_actor(host_name(group_key), namespace=namespace)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _make_callbacks(
    sweep: Sweep,
    store: Store,
    fence: Fence,
    namespace: str,
    blocks_left: dict[str, int],
    progress: Progress,
    result: RunResult,
    where: dict[str, Any],
) -> list[Any]:
    import ray
    from ray import tune

    rt = sweep.spec.runtime
    threads = torch_threads(rt.num_cpus)
    host_cls = ray.remote(ModelHost)
    models = {m.name: m for m in sweep.spec.models}

    class HostPool(tune.Callback):
        """Creates a group's host when its first trial starts and retires it after its last.

        Hosts are created by the driver, so they live exactly as long as the run, and in
        trial order, so an early group's host is never starved by a later one's.
        """

        def __init__(self) -> None:
            self.hosts: dict[str, Any] = {}
            self.groups: dict[str, Any] = {}  # placement groups of sharded hosts

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            key, model_name, precision = plan.split_block_id(trial.config["block"])
            if key in self.hosts:
                if _alive(ray, key, namespace):
                    return
                # Out of restarts: a fresh host for the blocks still to come. Ray frees a dead
                # actor's name once no handle to it is left, so the old handle goes first.
                del self.hosts[key]
                gc.collect()
                self._remove_group(key)
            m = models[model_name]
            placed = where[key]
            options, pg = host_options(placed, rt.max_trial_retries)
            if pg is not None:
                self.groups[key] = pg
            req = placed.request
            self.hosts[key] = host_cls.options(
                name=host_name(key),
                namespace=namespace,
                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}},
                **options,
            ).remote(
                sweep.spec.name,
                {**m.model_dump(), "source": m.source},
                precision,
                rt.num_cpus,
                rt.protocol,
                rt.batch_size,
                sweep.spec.precision_options.get(precision),
                rt.layer_sqnr,
                {"num_gpus": req.num_gpus, "estimated_bytes": req.estimate.total if req.estimate else None},
            )

        def _block_ended(self, trial: Any) -> None:
            key, model_name, precision = plan.split_block_id(trial.config["block"])
            blocks_left[key] -= 1
            if blocks_left[key] > 0:
                return
            host = self.hosts.pop(key, None)
            if host is not None:
                try:
                    info = ray.get(host.info.remote(), timeout=60)
                    result.hosts.append({k: v for k, v in info.items() if k != "layers"})  # layers: own table
                    store.write_model_info(sweep.spec.name, info, fence)
                except Exception as e:  # noqa: BLE001 - a dead host has no info to give
                    result.errors.append(f"host {key}: {type(e).__name__}: {e}")
                ray.kill(host)
            self._remove_group(key)
            store.compact(model_name, precision, fence)

        def _remove_group(self, key: str) -> None:
            from ray.util import remove_placement_group

            pg = self.groups.pop(key, None)
            if pg is not None:
                remove_placement_group(pg)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self._block_ended(trial)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            bid = trial.config["block"]
            why = _trial_error(trial)
            result.errors.append(f"block {bid} failed after {rt.max_trial_retries} retries: {why}")
            self._record_failed_block(bid, why)
            self._block_ended(trial)

        def _record_failed_block(self, bid: str, why: str) -> None:
            _, model_name, precision = plan.split_block_id(bid)
            present = store.partition_ids(model_name, precision)
            write_never_run(
                sweep,
                store,
                fence,
                model_name,
                precision,
                lambda c: c.block_id == bid and c.completion_id not in present,
                "error",
                f"block failed after retries: {why}",
            )

        def kill_all(self) -> None:
            for host in self.hosts.values():
                ray.kill(host)
            self.hosts.clear()
            for key in list(self.groups):
                self._remove_group(key)

    class ProgressReport(tune.Callback):
        def on_trial_result(
            self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
        ) -> None:
            progress.add(int(result.get("written", 0)))

    return [HostPool(), ProgressReport()]


def host_options(placed: Any, max_restarts: int) -> tuple[dict[str, Any], Any]:
    """Ray options for a host actor from its placement, and the placement group it needs, if any.

    A sharded host reserves its GPUs as one bundle of a STRICT_PACK placement group, so they
    are on one node; other hosts ask for their share directly, with a soft preference for
    the node the plan chose (soft: after that node is lost, the restart goes elsewhere).
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    req = placed.request
    options: dict[str, Any] = {"num_cpus": req.num_cpus, "num_gpus": req.num_gpus, "max_restarts": max_restarts}
    if req.memory:
        options["memory"] = req.memory
    node_id = placed.node.node_id if placed.node is not None else None
    if req.sharded:
        from ray.util import placement_group

        bundle = {"GPU": req.num_gpus, **({"CPU": req.num_cpus} if req.num_cpus else {})}
        pg = placement_group([bundle], strategy="STRICT_PACK", _soft_target_node_id=node_id)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        return options, pg
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return options, None


def run_sweep(
    sweep: Sweep,
    output: str | os.PathLike[str] | None = None,
    address: str | None = None,
    retry_failed: bool = False,
    force: bool = False,
    quiet: bool = False,
) -> RunResult:
    """Run what the dataset at `output` lacks of `sweep`; the same call resumes a stopped run."""
    spec = sweep.spec
    out = normalize(output or spec.output or f"results/{spec.name}")
    store = Store(out)
    fence = store.take_ownership(force=force)
    try:
        return _run_owned(sweep, store, fence, address, retry_failed, quiet)
    finally:
        store.release(fence)


def _run_owned(
    sweep: Sweep, store: Store, fence: Fence, address: str | None, retry_failed: bool, quiet: bool
) -> RunResult:
    t0 = time.monotonic()
    spec = sweep.spec
    groups = plan.groups(sweep)
    work = plan.remaining_work(sweep, store.finished_ids(retry_failed=retry_failed))
    manifest.start_run(
        store.storage, sweep.path, sweep.text, spec.name, {g.key: g.n_completions for g in groups}, fence.run_id
    )
    result = RunResult(store.location, work.planned, work.done_before, 0, work.done_before, 0.0)
    progress = Progress(work.planned, work.done_before)
    if not quiet:
        print(
            f"rayq: sweep {spec.name!r}: {work.planned} completions planned, "
            f"{work.done_before} already in {store.display}",
            flush=True,
        )
    try:
        if work.remaining:
            start_ray(address or spec.runtime.address)
            placed = _place(sweep, store, fence, work.remaining, result, quiet)
            _run_tune(sweep, store, fence, work.remaining, groups, progress, result, placed)
        for model_name, precision in store.partitions():
            store.compact(model_name, precision, fence)
        result.on_disk = len(store.finished_ids() & work.planned_ids)
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
            wall_s=round(time.monotonic() - t0, 3),
            hosts=result.hosts,
            errors=result.errors,
        )
    return result


def _place(
    sweep: Sweep, store: Store, fence: Fence, remaining: dict[str, list[str] | None], result: RunResult, quiet: bool
) -> Any:
    """Place the hosts on the live cluster; record the completions of unplaceable ones as such."""
    from rayq import placement

    t0 = time.monotonic()
    placed = placement.plan_placement(sweep, placement.live_cluster(sweep.spec.runtime.gpu_memory))
    result.place_s = time.monotonic() - t0
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
        waves = max((p.wave or 0 for p in placed.placements), default=0)
        print(
            f"rayq: placed {len(placed.placements) - n_un} hosts in {waves} wave(s), {placed.first_wave} at once, "
            f"in {result.place_s * 1000:.0f} ms"
            + (f"; {n_un} unplaceable (recorded as status=unplaceable)" if n_un else ""),
            flush=True,
        )
    return placed


def _trial_error(trial: Any) -> str:
    """The last line of a failed trial's error (Tune keeps the traceback in a file)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [x for x in Path(path).read_text().splitlines() if x.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1][:500] if lines else "unknown error"


def write_never_run(
    sweep: Sweep,
    store: Store,
    fence: Fence,
    model_name: str,
    precision: str,
    keep: Callable[[plan.Completion], bool],
    status: str,
    error: str,
) -> int:
    """Rows for the completions of one host that never ran (it fits nowhere, or their block
    kept failing), so every completion is accounted for and `--retry-failed` knows what to run."""
    from datetime import UTC, datetime

    from rayq.store import completion_row

    model = next(m for m in sweep.spec.models if m.name == model_name)
    now = datetime.now(UTC)
    rows = [
        completion_row(sweep.spec.name, c.to_dict(), status=status, error=error, finished_at=now)
        for c in plan.iter_completions(sweep, model, precision)
        if keep(c)
    ]
    for chunk in _chunks(rows, 10_000):
        store.write(model_name, precision, chunk, fence)
    return len(rows)


def _run_tune(
    sweep: Sweep,
    store: Store,
    fence: Fence,
    remaining: dict[str, list[str] | None],
    groups: list[plan.Group],
    progress: Progress,
    result: RunResult,
    placed: Any,
) -> None:
    from ray import tune

    rt = sweep.spec.runtime
    where = placed.by_key()
    todo_groups = [plan.Group(g.model, g.precision, tuple(b for b in g.block_ids if b in remaining), 0) for g in groups]
    todo_groups = [g for g in todo_groups if g.block_ids and where[g.key].wave is not None]
    if not todo_groups:
        return
    rank = {p.key: i for i, p in enumerate(placed.placements)}
    todo_groups.sort(key=lambda g: rank[g.key])  # wave 1 first, so trials start hosts in the plan's order
    wave = max(1, min(placed.first_wave, len(todo_groups)))
    order = plan.interleave_blocks(todo_groups, wave)
    blocks_left = {g.key: len(g.block_ids) for g in todo_groups}
    namespace = f"rayq-{fence.run_id[:12]}"
    ctx = TrialContext(sweep, store.location, fence, namespace, remaining)
    callbacks = _make_callbacks(sweep, store, fence, namespace, blocks_left, progress, result, where)
    # A trial only waits on its host, so it holds no CPU; Tune needs a non-empty request.
    trainable = tune.with_resources(tune.with_parameters(block_trial, ctx=ctx), {"cpu": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"block": tune.grid_search(order)},
        tune_config=tune.TuneConfig(max_concurrent_trials=wave, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"run-{fence.run_id[:12]}",
            storage_path=store.tune_dir,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=rt.max_trial_retries),
            callbacks=callbacks,
        ),
    )
    try:
        tuner.fit()
    finally:
        callbacks[0].kill_all()


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
    return lines
