"""Placement: what each model host asks Ray for, and where the hosts of a sweep go.

A host small enough shares a GPU (a fractional request sized by its memory estimate), one
that needs more than a GPU gets several whole GPUs of one node (one actor, sharded with
accelerate, kept together by a placement group), and one that fits no node is
*unplaceable*: `rayq plan` shows it and `rayq run` records its completions with that
status instead of waiting for resources that will never come. On a cluster without GPUs a
host asks for CPUs and host memory instead.

When and where each host runs is the scheduler's decision (rayq.planning.scheduler), made on
predicted durations (rayq.planning.throughput): `plan_placement` runs the scheduler's policy on them
to give each host a predicted start, end and place, and the sweep its GPU-hours and wall
time. `rayq run` makes the same decisions live, so where `plan` says a host goes first is
where Ray puts it while the cluster matches. Imports neither torch nor ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from rayq.catalog.precisions import get
from rayq.catalog.vllm_support import CPU_KV_CACHE_GIB
from rayq.planning.estimate import Estimate, estimate, fmt_gib, shape_of
from rayq.planning.resources import ClusterShape, NodeShape, Request, auto_batch_size, named_cluster  # noqa: F401 (the plan's vocabulary)
from rayq.planning.scheduler import Job, Ledger, simulate
from rayq.planning.throughput import Rate
from rayq.planning.tokens import longest_prompt_bound

FRACTION_STEP = 0.01  # fractional GPU requests are rounded up to this


@dataclass(frozen=True)
class Placement:
    """One host: its request, where and when the predicted schedule starts it, and its cost."""

    request: Request
    node: NodeShape | None
    gpu_ids: tuple[int, ...] = ()
    start_s: float | None = None  # predicted start, seconds after the run starts; None: not scheduled
    end_s: float | None = None
    tokens: int = 0  # the most tokens it will generate
    rate: Rate | None = None  # predicted tokens/s, with its source
    predicted_s: float = 0.0  # predicted seconds to load and decode

    @property
    def key(self) -> str:
        return self.request.key

    @property
    def unplaceable(self) -> bool:
        return self.request.unplaceable is not None

    @property
    def share(self) -> float:
        """GPUs held (a fraction of one when shared); CPUs for a host without a GPU."""
        r = self.request
        return r.num_gpus if r.num_gpus > 0 else r.num_cpus

    @property
    def gpu_seconds(self) -> float:
        return self.predicted_s * self.share


@dataclass
class PlacementPlan:
    cluster: ClusterShape
    gpu: str  # the GPU type the rates are for
    placements: list[Placement] = field(default_factory=list)

    @property
    def unplaceable(self) -> list[Placement]:
        return [p for p in self.placements if p.unplaceable]

    @property
    def scheduled(self) -> list[Placement]:
        return [p for p in self.placements if p.start_s is not None]

    @property
    def at_once(self) -> int:
        """Hosts that start as soon as the run does."""
        return sum(1 for p in self.scheduled if p.start_s == 0)

    @property
    def makespan_s(self) -> float:
        """The predicted wall time of the whole schedule."""
        return max((p.end_s or 0.0 for p in self.scheduled), default=0.0)

    @property
    def lower_bound_s(self) -> float:
        """No schedule is shorter: max(GPU-time / GPUs, the longest host); CPU-time / CPUs without GPUs."""
        return lower_bound(self.cluster, [(p.predicted_s, p.share) for p in self.scheduled])

    def by_key(self) -> dict[str, Placement]:
        return {p.key: p for p in self.placements}


def lower_bound(cluster: ClusterShape, hosts: list[tuple[float, float]]) -> float:
    """max(work / capacity, the longest host) for hosts given as (seconds, GPUs or CPUs held)."""
    capacity = cluster.gpus or sum(n.cpus for n in cluster.nodes)
    work = sum(s * share for s, share in hosts)
    return max(work / capacity if capacity else 0.0, max((s for s, _ in hosts), default=0.0))


def decode_size(sweep: Any, on_gpu: bool) -> tuple[int, int]:
    """(tokens, batch) the KV cache of one of `sweep`'s hosts must hold at most."""
    rt = sweep.spec.runtime
    if rt.protocol == "serial":
        batch = 1
    elif rt.batch_size == "auto":
        batch = auto_batch_size("cuda" if on_gpu else "cpu")
    else:
        batch = int(rt.batch_size)
    # The prompt's part is the context check's own bound (rayq.planning.tokens), UTF-8 bytes and all.
    return longest_prompt_bound(sweep.prompt_texts) + max(sweep.spec.grid.max_new_tokens), batch


def request_for(key: str, est: Estimate | None, precision: str, rt: Any, cluster: ClusterShape) -> Request:
    """Size one host's request against the GPUs (or, with none, the host memory) of `cluster`."""

    gpu_nodes = [n for n in cluster.nodes if n.gpus > 0]
    want_gpus = bool(gpu_nodes) if rt.num_gpus == "auto" else rt.num_gpus > 0
    if not want_gpus:
        mem = est.total if est else 0
        biggest = max((n.memory or 0 for n in cluster.nodes), default=0)
        why = None
        if est and biggest and mem > biggest:
            why = f"needs {fmt_gib(mem)} of host memory; the largest node offers {fmt_gib(biggest)}"
        if not any(n.cpus >= rt.num_cpus for n in cluster.nodes):
            why = f"needs {rt.num_cpus:g} CPUs; no node has that many"
        return Request(key, est, 0.0, rt.num_cpus, mem, why)
    max_gpus = max((n.gpus for n in gpu_nodes), default=0)
    gpu_mem = min((n.gpu_memory for n in gpu_nodes if n.gpu_memory), default=None)
    if rt.num_gpus != "auto":  # the sweep's own number, checked against the estimate when it can be
        n = float(rt.num_gpus)
        why = f"asks for {n:g} GPUs on one node; the largest node has {max_gpus}" if n > max_gpus else None
        note = ""
        if est and gpu_mem and not _fits(est, precision, n, gpu_mem):
            note = f"estimated {fmt_gib(est.total)} may not fit {n:g} GPU(s) of {fmt_gib(gpu_mem)}: expect oom"
        return Request(key, est, n, rt.num_cpus, 0, why, note)
    if est is None or gpu_mem is None:
        missing = "the model's size (give models[].size)" if est is None else "the GPUs' memory (runtime.gpu_memory)"
        return Request(key, est, 1.0, rt.num_cpus, 0, None, f"one GPU: {missing} unknown")
    if _fits(est, precision, 1, gpu_mem):
        need = est.total + est.per_gpu
        share = min(1.0, math.ceil(need / gpu_mem / FRACTION_STEP - 1e-9) * FRACTION_STEP)
        n_gpus = round(share, 2) if rt.gpu_sharing else 1.0
        return Request(key, est, n_gpus, rt.num_cpus, 0)
    usable = _usable_per_gpu(est, precision, gpu_mem)
    k = math.ceil(est.total / usable) if usable > 0 else max_gpus + 1
    if k > max_gpus:
        why = (
            f"needs {fmt_gib(est.total)} ({k} GPUs of {fmt_gib(gpu_mem)} on one node); "
            f"the largest node has {max_gpus} GPU(s)"
        )
        return Request(key, est, float(k), rt.num_cpus, 0, why)
    return Request(key, est, float(k), rt.num_cpus, 0)


def _usable_per_gpu(est: Estimate, precision: str, gpu_mem: int) -> float:
    """What a host may fill of each whole GPU it holds: the loader's share, less a CUDA context."""

    return gpu_mem * get(precision).max_memory_fraction - est.per_gpu


def _fits(est: Estimate, precision: str, n_gpus: float, gpu_mem: int) -> bool:
    if n_gpus < 1:
        return est.total + est.per_gpu <= n_gpus * gpu_mem
    return est.total <= int(n_gpus) * _usable_per_gpu(est, precision, gpu_mem)


def plan_placement(
    sweep: Any,
    cluster: ClusterShape,
    gpu: str | None = None,
    measured: dict[Any, float] | None = None,
    tokens: dict[str, int] | None = None,
) -> PlacementPlan:
    """Requests for every host of `sweep`, their predicted cost, and their schedule on `cluster`.

    `gpu`: the GPU type the rates are for (default: the sweep's `runtime.gpu_type`, what the
    live cluster reports, or the paper's A100 80GB); `measured`: rates from earlier runs
    (rayq.store.rates.measured_rates); `tokens`: block id -> tokens still to generate, for a
    resumed run (default: every block of the sweep).
    """
    from rayq.planning import planner, throughput

    rt = sweep.spec.runtime
    on_gpu = bool(cluster.gpus) and rt.num_gpus != 0
    gpu = gpu or rt.gpu_type or cluster.gpu_type or (throughput.DEFAULT_GPU if on_gpu else "cpu")
    max_tokens, batch = decode_size(sweep, on_gpu)
    tokens = tokens if tokens is not None else planner.block_tokens(sweep)
    shapes = {m.name: shape_of(m) for m in sweep.spec.models}  # one config read per model, not per precision
    empty = Ledger(cluster)
    requests: list[Request] = []
    costs: dict[str, tuple[int, Rate, float]] = {}
    # Shares of the tokens decoded serially, batched, or not at all (greedy rows sharing an
    # output): the grid spreads each evenly over max_new_tokens, so token shares are row shares.
    split = planner.decode_work(sweep)
    for g in planner.groups(sweep):
        shape = shapes[g.model.name]
        est = estimate(shape, g.precision, max_tokens, batch) if shape is not None else None
        r = request_for(g.key, est, g.precision, rt, cluster)
        if r.num_gpus == 0 and sweep.spec.engine_of(g.model) == "vllm":  # its CPU KV cache is reserved up front
            r = replace(r, memory=r.memory + CPU_KV_CACHE_GIB * 2**30)
        if r.unplaceable is None and empty.find(r) is None:
            r = replace(r, unplaceable="does not fit any node's CPUs, GPUs and memory together")
        requests.append(r)
        n = sum(tokens.get(b, 0) for b in g.block_ids)
        rate = throughput.rate(g.model, shape, g.precision, rt.protocol, batch, gpu, measured)
        decode_s = n * split.batched / split.total / rate.tokens_per_s
        if split.serial:  # the serial rows (all but the shared ones under protocol serial) at batch 1's rate
            one = rate
            if rt.protocol != "serial":
                one = throughput.rate(g.model, shape, g.precision, "serial", 1, gpu, measured)
            decode_s += n * split.serial / split.total / one.tokens_per_s
        costs[g.key] = (n, rate, throughput.load_s(shape, g.precision) + decode_s if n else 0.0)
    jobs = [
        Job(r.key, r, [], costs[r.key][2], i) for i, r in enumerate(requests) if not r.unplaceable and costs[r.key][0]
    ]
    timed = {t.key: t for t in simulate(cluster, jobs)}
    out = PlacementPlan(cluster, gpu)
    for r in requests:
        n, rate, seconds = costs[r.key]
        t = timed.get(r.key)
        node, ids, start, end = (t.slot.node, t.slot.gpu_ids, t.start_s, t.end_s) if t else (None, (), None, None)
        out.placements.append(Placement(r, node, ids, start, end, n, rate, seconds))
    return out


def fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h"


def describe(plan: PlacementPlan) -> list[str]:
    """The lines `rayq plan` prints for a placement: per host and in total, memory, tokens,
    GPU-hours and the predicted schedule."""
    lines = [f"placement on {plan.cluster.describe()}; rates for GPU type {plan.gpu}"]
    lines.append(
        f"  {'host':30s} {'estimate':>10s}  {'request':18s} {'tokens':>11s} {'tok/s':>8s} {'source':8s} "
        f"{'hours':>7s} {'GPU-h':>8s} {'start':>7s} {'end':>7s}  where"
    )
    for p in plan.placements:
        r = p.request
        est = fmt_gib(r.estimate.total) if r.estimate else "unknown"
        if r.num_gpus >= 1:
            req = f"{r.num_gpus:g} GPU" + ("s (sharded)" if r.num_gpus > 1 else "")
        elif r.num_gpus > 0:
            req = f"{r.num_gpus:.2f} GPU (shared)"
        else:
            req = f"{r.num_cpus:g} CPU" + (f", {fmt_gib(r.memory)}" if r.memory else "")
        rate = f"{p.rate.tokens_per_s:8.1f} {p.rate.source:8s}" if p.rate else f"{'?':>8s} {'':8s}"
        if p.unplaceable:
            when, where = f"{'-':>7s} {'-':>7s}", f"UNPLACEABLE: {r.unplaceable}"
        elif p.start_s is None:
            when, where = f"{'-':>7s} {'-':>7s}", "nothing left to do"
        else:
            ids = f" GPU {','.join(map(str, p.gpu_ids))}" if p.gpu_ids else ""
            when = f"{p.start_s / 3600:6.1f}h {(p.end_s or 0) / 3600:6.1f}h"
            where = f"{p.node.name if p.node else '?'}{ids}"
        lines.append(
            f"  {r.key:30s} {est:>10s}  {req:18s} {p.tokens:11,d} {rate} {p.predicted_s / 3600:6.1f}h "
            f"{p.gpu_seconds / 3600:7.1f}h {when}  {where}" + (f"  ({r.note})" if r.note else "")
        )
    n_un = len(plan.unplaceable)
    scheduled = plan.scheduled
    gpu_h = sum(p.gpu_seconds for p in scheduled) / 3600
    unit = "GPU-hours" if plan.cluster.gpus else "CPU-hours"
    lines.append(
        f"  total: {sum(p.tokens for p in scheduled):,} tokens at most; {gpu_h:,.1f} {unit} on {plan.gpu}; "
        f"predicted wall time {fmt_hours(plan.makespan_s)} "
        f"(lower bound {fmt_hours(plan.lower_bound_s)}: max(GPU-time / GPUs, longest host))"
    )
    sources = sorted({p.rate.source for p in scheduled if p.rate})
    lines.append(
        f"  {len(scheduled)} hosts scheduled, {plan.at_once} at once; {n_un} unplaceable"
        + (" (recorded as status=unplaceable by rayq run)" if n_un else "")
        + f"; rates from: {', '.join(sources) or 'nothing'} (rayq.planning.throughput; tokens assume every completion "
        "runs to max_new_tokens)"
    )
    return lines
