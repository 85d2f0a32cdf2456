"""Placement: what each model host asks Ray for, and where the hosts of a sweep go.

A host small enough shares a GPU (a fractional request sized by its memory estimate), one
that needs more than a GPU gets several whole GPUs of one node (one actor, sharded with
accelerate, kept together by a placement group), and one that fits no node is
*unplaceable*: `rayq plan` shows it and `rayq run` records its completions with that
status instead of waiting for resources that will never come. On a cluster without GPUs a
host asks for CPUs and host memory instead.

The packing is first-fit decreasing, in waves: wave 1 is what runs at once; a host of wave
2 starts on the resources a wave-1 host frees when its blocks are done. `rayq run` follows
the same placement (node affinity, a placement group for sharded hosts), so where `plan`
says a host goes is where Ray puts it while the cluster matches. Imports neither torch nor ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from rayq.estimate import Estimate, estimate, fmt_gib, parse_bytes, prompt_token_bound, shape_of

FRACTION_STEP = 0.01  # fractional GPU requests are rounded up to this


@dataclass(frozen=True)
class NodeShape:
    name: str
    gpus: int
    gpu_memory: int | None  # bytes of one GPU; None: unknown
    cpus: float
    memory: int | None = None  # host memory Ray may hand to actors (bytes)
    node_id: str | None = None  # the live node's Ray id, when the shape was read from a cluster


@dataclass(frozen=True)
class ClusterShape:
    nodes: tuple[NodeShape, ...]
    source: str  # "named" (from --gpus/--gpu-memory) or "live"

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    def describe(self) -> str:
        parts = []
        for n in self.nodes:
            gpu = f"{n.gpus} GPU x {fmt_gib(n.gpu_memory)}" if n.gpus and n.gpu_memory else f"{n.gpus} GPU"
            mem = f", {fmt_gib(n.memory)} RAM" if n.memory else ""
            parts.append(f"{n.name}: {gpu}, {n.cpus:g} CPU{mem}")
        return "; ".join(parts)


def named_cluster(gpus: int, gpu_memory: str | None, nodes: int = 1, cpus: float = 16.0) -> ClusterShape:
    """The shape `rayq plan --gpus N --gpu-memory 80GB [--nodes M]` names: M nodes of N GPUs each."""
    mem = parse_bytes(gpu_memory) if gpu_memory else None
    return ClusterShape(tuple(NodeShape(f"node{i}", gpus, mem, cpus) for i in range(nodes)), "named")


def live_cluster(gpu_memory: str | None = None) -> ClusterShape:
    """The shape of the Ray cluster this process is connected to.

    Ray reports how many GPUs a node has, not how much memory each holds: `gpu_memory`
    (the sweep's `runtime.gpu_memory`) gives it, else it is read once per node with
    nvidia-smi; logical GPUs (a test cluster) have none to read.
    """
    import ray

    mem = parse_bytes(gpu_memory) if gpu_memory else None
    nodes = []
    for i, n in enumerate(sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])):
        res = n.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        node_mem = mem if mem or not gpus else _probe_gpu_memory(n["NodeID"])
        nodes.append(
            NodeShape(
                f"node{i}",
                gpus,
                node_mem,
                float(res.get("CPU", 0)),
                int(res.get("memory", 0)) or None,
                n["NodeID"],
            )
        )
    return ClusterShape(tuple(nodes), "live")


def _probe_gpu_memory(node_id: str) -> int | None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def smallest_gpu() -> int | None:
        import subprocess

        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            return min(int(x) for x in out.split()) * 1024**2
        except Exception:  # noqa: BLE001 - no driver: logical GPUs with no memory to report
            return None

    ref = smallest_gpu.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    try:
        return ray.get(ref, timeout=60)
    except Exception:  # noqa: BLE001
        return None


@dataclass(frozen=True)
class Request:
    """What one host asks Ray for."""

    key: str  # model/precision
    estimate: Estimate | None
    num_gpus: float  # 0: a CPU host; < 1: a share of one GPU; >= 1: whole GPUs of one node
    num_cpus: float
    memory: int  # host memory to reserve (CPU hosts), bytes
    unplaceable: str | None = None  # why it fits nowhere
    note: str = ""

    @property
    def sharded(self) -> bool:
        return self.num_gpus > 1


@dataclass(frozen=True)
class Placement:
    request: Request
    wave: int | None  # None: unplaceable
    node: NodeShape | None
    gpu_ids: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        return self.request.key


@dataclass
class PlacementPlan:
    cluster: ClusterShape
    placements: list[Placement] = field(default_factory=list)

    @property
    def unplaceable(self) -> list[Placement]:
        return [p for p in self.placements if p.wave is None]

    @property
    def first_wave(self) -> int:
        return sum(1 for p in self.placements if p.wave == 1)

    def by_key(self) -> dict[str, Placement]:
        return {p.key: p for p in self.placements}


def decode_size(sweep: Any, on_gpu: bool) -> tuple[int, int]:
    """(tokens, batch) the KV cache of one of `sweep`'s hosts must hold at most."""
    rt = sweep.spec.runtime
    if rt.protocol == "serial":
        batch = 1
    elif rt.batch_size == "auto":
        from rayq.host import auto_batch_size

        batch = auto_batch_size("cuda" if on_gpu else "cpu")
    else:
        batch = int(rt.batch_size)
    return prompt_token_bound(sweep.prompt_texts) + max(sweep.spec.grid.max_new_tokens), batch


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
    from rayq.precisions import get

    return gpu_mem * get(precision).max_memory_fraction - est.per_gpu


def _fits(est: Estimate, precision: str, n_gpus: float, gpu_mem: int) -> bool:
    if n_gpus < 1:
        return est.total + est.per_gpu <= n_gpus * gpu_mem
    return est.total <= int(n_gpus) * _usable_per_gpu(est, precision, gpu_mem)


def plan_placement(sweep: Any, cluster: ClusterShape) -> PlacementPlan:
    """Requests for every host of `sweep`, packed onto `cluster` in waves."""
    from rayq import plan as plan_mod

    rt = sweep.spec.runtime
    on_gpu = any(n.gpus for n in cluster.nodes) and rt.num_gpus != 0
    tokens, batch = decode_size(sweep, bool(on_gpu))
    shapes = {m.name: shape_of(m) for m in sweep.spec.models}  # one config read per model, not per precision
    requests = []
    for g in plan_mod.groups(sweep):
        shape = shapes[g.model.name]
        est = estimate(shape, g.precision, tokens, batch) if shape is not None else None
        requests.append(request_for(g.key, est, g.precision, rt, cluster))
    return pack(requests, cluster)


def pack(requests: list[Request], cluster: ClusterShape) -> PlacementPlan:
    """First-fit decreasing into waves; the order within a wave follows the sweep's order."""
    out = PlacementPlan(cluster)
    order = {r.key: i for i, r in enumerate(requests)}
    todo = sorted(
        (r for r in requests if r.unplaceable is None),
        key=lambda r: (-r.num_gpus, -(r.memory or 0), order[r.key]),
    )
    placed: list[Placement] = []
    wave = 0
    while todo:
        wave += 1
        gpu_free = {n.name: [1.0] * n.gpus for n in cluster.nodes}
        cpu_free = {n.name: n.cpus for n in cluster.nodes}
        mem_free = {n.name: n.memory for n in cluster.nodes}
        left = []
        for r in todo:
            spot = _take(r, cluster, gpu_free, cpu_free, mem_free)
            if spot is None:
                left.append(r)
            else:
                placed.append(Placement(r, wave, spot[0], spot[1]))
        if len(left) == len(todo):  # nothing fits even an empty cluster: CPUs or memory short
            for r in left:
                why = "does not fit any node's free CPUs, GPUs and memory together"
                placed.append(Placement(replace(r, unplaceable=why), None, None))
            break
        todo = left
    placed.sort(key=lambda p: (p.wave or 10**9, order[p.key]))
    out.placements = placed + [Placement(r, None, None) for r in requests if r.unplaceable is not None]
    return out


def _take(
    r: Request,
    cluster: ClusterShape,
    gpu_free: dict[str, list[float]],
    cpu_free: dict[str, float],
    mem_free: dict[str, int | None],
) -> tuple[NodeShape, tuple[int, ...]] | None:
    eps = 1e-9
    for node in cluster.nodes:
        if cpu_free[node.name] + eps < r.num_cpus:
            continue
        free = gpu_free[node.name]
        ids: tuple[int, ...] = ()
        if r.num_gpus >= 1:
            whole = [i for i, f in enumerate(free) if f >= 1.0 - eps]
            if len(whole) < int(r.num_gpus):
                continue
            ids = tuple(whole[: int(r.num_gpus)])
            for i in ids:
                free[i] = 0.0
        elif r.num_gpus > 0:
            fit = [i for i, f in enumerate(free) if f + eps >= r.num_gpus]
            if not fit:
                continue
            ids = (fit[0],)
            free[fit[0]] -= r.num_gpus
        else:
            avail = mem_free[node.name]
            if avail is not None and r.memory > avail:
                continue
            if avail is not None:
                mem_free[node.name] = avail - r.memory
        cpu_free[node.name] -= r.num_cpus
        return node, ids
    return None


def describe(plan: PlacementPlan) -> list[str]:
    """The lines `rayq plan` prints for a placement."""
    lines = [f"placement on {plan.cluster.describe()}"]
    lines.append(f"  {'host':34s} {'estimate':>11s}  {'request':18s} {'wave':>4s}  where")
    for p in plan.placements:
        r = p.request
        est = fmt_gib(r.estimate.total) if r.estimate else "unknown"
        if r.num_gpus >= 1:
            req = f"{r.num_gpus:g} GPU" + ("s (sharded)" if r.num_gpus > 1 else "")
        elif r.num_gpus > 0:
            req = f"{r.num_gpus:.2f} GPU (shared)"
        else:
            req = f"{r.num_cpus:g} CPU" + (f", {fmt_gib(r.memory)}" if r.memory else "")
        if p.wave is None:
            where = f"UNPLACEABLE: {r.unplaceable}"
            wave = "-"
        else:
            ids = f" GPU {','.join(map(str, p.gpu_ids))}" if p.gpu_ids else ""
            where = f"{p.node.name if p.node else '?'}{ids}"
            wave = str(p.wave)
        lines.append(f"  {r.key:34s} {est:>11s}  {req:18s} {wave:>4s}  {where}" + (f"  ({r.note})" if r.note else ""))
    waves = max((p.wave or 0 for p in plan.placements), default=0)
    n_un = len(plan.unplaceable)
    lines.append(
        f"  {len(plan.placements) - n_un} hosts placed in {waves} wave(s), {plan.first_wave} at once; "
        f"{n_un} unplaceable" + (" (recorded as status=unplaceable by rayq run)" if n_un else "")
    )
    return lines
