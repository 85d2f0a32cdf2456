"""The scheduler: when each model host starts, where, and which block runs next.

Admission cannot deadlock because of three rules:

1. A host starts only when its request fits what rayq's hosts leave free *now* (the
   ledger: every node's GPUs, as fractions of each device, CPUs and memory).
2. A block is admitted only for a started host, at most `depth` at a time per host, so no
   trial ever waits for resources: it waits for its own host, which already holds them.
3. A host is retired the moment its last block ends, so no host sits on GPUs with nothing
   to do.

So every started host finishes its blocks and frees what it held, and once nothing is
running the whole cluster is free and the next host fits (hosts that fit no node were set
aside as unplaceable before). What can still stop a run is outside rayq's books (a lost
node, another tenant): the driver's watchdog bounds that (see rayq.execution.launcher).

Which host starts first is a makespan decision: longest predicted duration first (LPT),
and when the longest waiting host does not fit, smaller hosts fill the gap only if that
does not delay it (EASY backfilling: they end before it could start, or leave room for it
then). `simulate` runs the same policy on predicted durations for `rayq plan`. Imports
neither torch nor ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayq.planning.resources import ClusterShape, NodeShape, Request

EPS = 1e-9
DEPTH = 2  # blocks in flight per host: the next block's trial starts while the host works on this one


@dataclass(frozen=True)
class Slot:
    """Where a started host sits: a node and, for GPU hosts, the device indices it was given."""

    node: NodeShape
    gpu_ids: tuple[int, ...]


class Ledger:
    """What rayq's hosts leave free on each node, as the scheduler books it."""

    def __init__(self, cluster: ClusterShape) -> None:
        self.cluster = cluster
        self.gpus = {n.name: [1.0] * n.gpus for n in cluster.nodes}
        self.cpus = {n.name: n.cpus for n in cluster.nodes}
        self.memory: dict[str, int | None] = {n.name: n.memory for n in cluster.nodes}

    def copy(self) -> Ledger:
        other = Ledger.__new__(Ledger)
        other.cluster = self.cluster
        other.gpus = {k: list(v) for k, v in self.gpus.items()}
        other.cpus = dict(self.cpus)
        other.memory = dict(self.memory)
        return other

    def find(self, r: Request) -> Slot | None:
        """The first node (and devices) where `r` fits now; None if it fits nowhere now."""
        for node in self.cluster.nodes:
            if self.cpus[node.name] + EPS < r.num_cpus:
                continue
            free = self.gpus[node.name]
            if r.num_gpus >= 1:
                whole = [i for i, f in enumerate(free) if f >= 1.0 - EPS]
                if len(whole) >= int(r.num_gpus):
                    return Slot(node, tuple(whole[: int(r.num_gpus)]))
            elif r.num_gpus > 0:
                # Best fit: the fullest device that still has room, so whole devices stay whole.
                fit = [(f, i) for i, f in enumerate(free) if f + EPS >= r.num_gpus]
                if fit:
                    return Slot(node, (min(fit)[1],))
            else:
                avail = self.memory[node.name]
                if avail is None or r.memory <= avail:
                    return Slot(node, ())
        return None

    def take(self, r: Request, slot: Slot) -> None:
        self._add(r, slot, -1)

    def give(self, r: Request, slot: Slot) -> None:
        self._add(r, slot, +1)

    def _add(self, r: Request, slot: Slot, sign: int) -> None:
        name = slot.node.name
        share = 1.0 if r.num_gpus >= 1 else r.num_gpus
        for i in slot.gpu_ids:
            # Shares are hundredths (placement rounds them): rounding keeps sums from drifting.
            self.gpus[name][i] = min(1.0, round(self.gpus[name][i] + sign * share, 9))
        self.cpus[name] += sign * r.num_cpus
        if r.num_gpus == 0 and self.memory[name] is not None:
            self.memory[name] = (self.memory[name] or 0) + sign * r.memory

    def free_text(self, r: Request) -> str:
        """What is free of the kind `r` needs, said the way a user reads it: '1 free'."""
        if r.num_gpus >= 1:
            best = max((sum(1 for f in g if f >= 1.0 - EPS) for g in self.gpus.values()), default=0)
            return f"{best} whole GPU{'s' if best != 1 else ''} free on the best node"
        if r.num_gpus > 0:
            best = max((max(g, default=0.0) for g in self.gpus.values()), default=0.0)
            return f"{best:.2f} of a GPU free at most"
        cpus = max(self.cpus.values(), default=0.0)
        return f"{cpus:g} CPU{'' if cpus == 1 else 's'} free on the best node"


def need_text(r: Request) -> str:
    """What a host asks for, said the way a user reads it: '2 GPUs on one node'."""
    if r.num_gpus >= 1:
        n = int(r.num_gpus)
        return f"{n} GPU{'s' if n > 1 else ''}" + (" on one node" if n > 1 else "")
    if r.num_gpus > 0:
        return f"{r.num_gpus:.2f} of a GPU"
    cpus = f"{r.num_cpus:g} CPU{'' if r.num_cpus == 1 else 's'}"
    if not r.memory:
        return cpus
    mem = f"{r.memory / 2**30:.1f} GiB" if r.memory >= 2**30 else f"{r.memory / 2**20:.0f} MiB"
    return f"{cpus} and {mem} of memory"


@dataclass
class Job:
    """One host's remaining work."""

    key: str  # model/precision
    request: Request
    blocks: list[str]  # remaining block ids, in the plan's order
    predicted_s: float  # predicted seconds to load and decode all of `blocks`
    order: int = 0  # position in the sweep, to break ties the same way every time


@dataclass
class HostState:
    job: Job
    state: str = "waiting"  # waiting -> started -> retired
    slot: Slot | None = None
    started_at: float | None = None
    queued: list[str] = field(default_factory=list)
    in_flight: int = 0
    ended: int = 0

    def predicted_end(self, now: float) -> float:
        """When this started host is expected to free its resources."""
        assert self.started_at is not None
        total = len(self.job.blocks)
        if self.ended and total:  # the pace so far beats the prediction once there is one
            pace = (now - self.started_at) / self.ended
            return now + pace * (total - self.ended)
        return max(now, self.started_at + self.job.predicted_s)


@dataclass(frozen=True)
class Pick:
    block: str
    key: str


class Scheduler:
    def __init__(self, cluster: ClusterShape, jobs: list[Job], depth: int = DEPTH) -> None:
        self.ledger = Ledger(cluster)
        self.depth = depth
        self.hosts = {j.key: HostState(j, queued=list(j.blocks)) for j in jobs}
        self.block_host = {b: j.key for j in jobs for b in j.blocks}
        self.queue = sorted(jobs, key=lambda j: (-j.predicted_s, j.order))

    # -- hosts ----------------------------------------------------------------------
    def start_hosts(self, now: float) -> list[tuple[str, Slot]]:
        """The waiting hosts to start now, each with the slot booked for it."""
        started: list[tuple[str, Slot]] = []
        head: Job | None = None
        at_head_start: Ledger | None = None  # the ledger when the head is predicted to fit
        head_start = math.inf
        for job in [j for j in self.queue if self.hosts[j.key].state == "waiting"]:
            slot = self.ledger.find(job.request)
            if head is None:
                if slot is not None:
                    self._start(job, slot, now)
                    started.append((job.key, slot))
                    continue
                head = job
                head_start, at_head_start = self._shadow(job, now)
                continue
            if slot is None:
                continue
            assert at_head_start is not None
            if now + job.predicted_s <= head_start + EPS:
                ok = True  # gone before the head could start anyway
            else:
                trial = at_head_start.copy()
                trial.take(job.request, _same_slot(trial, slot))
                ok = trial.find(head.request) is not None
                if ok:
                    at_head_start = trial
            if ok:
                self._start(job, slot, now)
                started.append((job.key, slot))
        return started

    def _start(self, job: Job, slot: Slot, now: float) -> None:
        self.ledger.take(job.request, slot)
        h = self.hosts[job.key]
        h.state, h.slot, h.started_at = "started", slot, now

    def _shadow(self, job: Job, now: float) -> tuple[float, Ledger]:
        """When `job` is predicted to fit (as started hosts end), and the ledger at that time."""
        ledger = self.ledger.copy()
        running = sorted((h for h in self.hosts.values() if h.state == "started"), key=lambda h: h.predicted_end(now))
        for h in running:
            assert h.slot is not None
            ledger.give(h.job.request, h.slot)
            if ledger.find(job.request) is not None:
                return h.predicted_end(now), ledger
        return math.inf, ledger

    def retire(self, key: str) -> None:
        h = self.hosts[key]
        if h.state == "started" and h.slot is not None:
            self.ledger.give(h.job.request, h.slot)
        h.state = "retired"

    # -- blocks ---------------------------------------------------------------------
    def next_block(self) -> Pick | None:
        """A block of a started host with room in its pipeline: the emptiest, then the longest."""
        best: HostState | None = None
        for h in self.hosts.values():
            if h.state != "started" or not h.queued or h.in_flight >= self.depth:
                continue
            if best is None or (h.in_flight, -len(h.queued)) < (best.in_flight, -len(best.queued)):
                best = h
        if best is None:
            return None
        best.in_flight += 1
        return Pick(best.queued.pop(0), best.job.key)

    def block_ended(self, block: str) -> str | None:
        """Book a block's end; the host's key when that was its last (retire it now)."""
        h = self.hosts[self.block_host[block]]
        h.in_flight -= 1
        h.ended += 1
        if not h.queued and h.in_flight == 0 and h.state == "started":
            self.retire(h.job.key)
            return h.job.key
        return None

    @property
    def all_admitted(self) -> bool:
        return all(not h.queued for h in self.hosts.values())

    @property
    def done(self) -> bool:
        return all(h.state == "retired" for h in self.hosts.values())

    def waiting(self) -> list[str]:
        """One line per host that waits for resources, first in line first."""
        lines = []
        for job in self.queue:
            if self.hosts[job.key].state == "waiting":
                lines.append(f"{job.key} waits for {need_text(job.request)}; {self.ledger.free_text(job.request)}")
        return lines


def _same_slot(ledger: Ledger, slot: Slot) -> Slot:
    return Slot(next(n for n in ledger.cluster.nodes if n.name == slot.node.name), slot.gpu_ids)


@dataclass(frozen=True)
class Timed:
    key: str
    start_s: float
    end_s: float
    slot: Slot


def simulate(cluster: ClusterShape, jobs: list[Job]) -> list[Timed]:
    """The schedule the policy gives when every host takes exactly its predicted time."""
    sched = Scheduler(cluster, jobs)
    now = 0.0
    running: dict[str, float] = {}
    out: list[Timed] = []
    while True:
        for key, slot in sched.start_hosts(now):
            h = sched.hosts[key]
            running[key] = now + h.job.predicted_s
            out.append(Timed(key, now, running[key], slot))
        if not running:
            break
        key = min(running, key=lambda k: (running[k], k))
        now = running.pop(key)
        sched.retire(key)
    return out
