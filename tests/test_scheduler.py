"""The scheduler's admission and packing, as pure logic (no Ray): properties over random clusters.

A random cluster (nodes with GPUs, CPUs, memory) and random hosts (shares of a GPU, whole
GPUs, sharded over several, CPU hosts) run block by block on a simulated clock, with block
times that disagree with the predictions. Whatever the draw: no resource is ever booked
twice, every block is admitted exactly once, no trial waits for resources (blocks go only to
started hosts), a host is retired the moment its last block ends, and the run always ends.
The same admission runs live in rayq.execution.launcher (tests/test_scheduling_cluster.py drives it
on real Ray clusters).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from rayq.planning.placement import ClusterShape, NodeShape, Request, lower_bound
from rayq.planning.scheduler import EPS, Job, Ledger, Scheduler, simulate


def _request(key: str, gpus: float, cpus: float = 0.0, memory: int = 0) -> Request:
    return Request(key, None, gpus, cpus, memory)


@st.composite
def clusters_and_jobs(draw: st.DrawFn) -> tuple[ClusterShape, list[Job]]:
    n_nodes = draw(st.integers(1, 3))
    with_gpus = draw(st.booleans())
    nodes = tuple(
        NodeShape(
            f"node{i}",
            draw(st.integers(1, 8)) if with_gpus else 0,
            80 * 2**30,
            float(draw(st.integers(1, 16))),
            draw(st.integers(4, 64)) * 2**30,
        )
        for i in range(n_nodes)
    )
    cluster = ClusterShape(nodes, "named")
    empty = Ledger(cluster)
    jobs = []
    for i in range(draw(st.integers(1, 14))):
        if with_gpus:
            gpus = draw(st.sampled_from([0.1, 0.25, 0.33, 0.5, 0.72, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0]))
            req = _request(f"m{i}/p", gpus, float(draw(st.integers(0, 2))))
        else:
            req = _request(f"m{i}/p", 0.0, float(draw(st.integers(1, 4))), draw(st.integers(1, 32)) * 2**30)
        if empty.find(req) is None:
            continue  # fits no node: placement records it unplaceable before the scheduler sees it
        n_blocks = draw(st.integers(1, 6))
        predicted = draw(st.floats(1.0, 1000.0))
        jobs.append(Job(req.key, req, [f"{req.key}|{b}" for b in range(n_blocks)], predicted, i))
    return cluster, jobs


def _booked_ok(sched: Scheduler) -> None:
    """The ledger is the cluster less exactly what the started hosts hold, and never below zero."""
    expect = Ledger(sched.ledger.cluster)
    for h in sched.hosts.values():
        if h.state == "started":
            assert h.slot is not None
            expect.take(h.job.request, h.slot)
    for name, free in sched.ledger.gpus.items():
        assert all(f >= -EPS for f in free), free
        assert all(abs(a - b) < 1e-6 for a, b in zip(free, expect.gpus[name], strict=True))
        assert sched.ledger.cpus[name] >= -EPS
        assert abs(sched.ledger.cpus[name] - expect.cpus[name]) < 1e-6
        mem = sched.ledger.memory[name]
        assert mem is None or mem >= 0


@settings(max_examples=300, deadline=None)
@given(clusters_and_jobs(), st.integers(0, 2**32 - 1))
def test_admission_never_deadlocks_and_runs_every_block_once(case: tuple[ClusterShape, list[Job]], seed: int) -> None:
    cluster, jobs = case
    rng = random.Random(seed)
    sched = Scheduler(cluster, jobs)
    now = 0.0
    running: list[tuple[float, str]] = []  # (end time, block)
    admitted: list[str] = []
    steps = 0
    while not sched.done:
        steps += 1
        assert steps < 10_000, "the schedule does not end"
        sched.start_hosts(now)
        _booked_ok(sched)
        while (pick := sched.next_block()) is not None:
            h = sched.hosts[pick.key]
            assert h.state == "started"  # a block never waits for resources, only for its own host
            assert 0 < h.in_flight <= sched.depth
            admitted.append(pick.block)
            running.append((now + rng.uniform(0.1, 50.0), pick.block))
        # Something is always running until the end: the cluster is never left idle with work waiting.
        assert running, [h.state for h in sched.hosts.values()]
        running.sort()
        now, block = running.pop(0)
        key = sched.block_ended(block)
        h = sched.hosts[block.split("|")[0]]
        if key is not None:  # retired the moment its last block ended, and not before
            assert h.state == "retired" and not h.queued and h.in_flight == 0
        else:
            assert h.queued or h.in_flight
    every = [b for j in jobs for b in j.blocks]
    assert sorted(admitted) == sorted(every) and len(set(admitted)) == len(every)
    assert all(f == 1.0 for free in sched.ledger.gpus.values() for f in free)  # everything given back


@settings(max_examples=200, deadline=None)
@given(clusters_and_jobs())
def test_the_predicted_schedule_is_feasible_and_above_the_lower_bound(case: tuple[ClusterShape, list[Job]]) -> None:
    cluster, jobs = case
    timed = simulate(cluster, jobs)
    assert sorted(t.key for t in timed) == sorted(j.key for j in jobs)
    by_key = {j.key: j for j in jobs}
    # At every start, what runs then fits the cluster together.
    for t in timed:
        ledger = Ledger(cluster)
        for other in timed:
            if other.start_s <= t.start_s < other.end_s:
                ledger.take(by_key[other.key].request, other.slot)
        assert all(f >= -EPS for free in ledger.gpus.values() for f in free)
        assert all(c >= -EPS for c in ledger.cpus.values())
    makespan = max((t.end_s for t in timed), default=0.0)
    share = [(j.predicted_s, j.request.num_gpus or j.request.num_cpus) for j in jobs]
    assert makespan >= lower_bound(cluster, share) - 1e-6


def test_longest_first_fills_the_gpus_evenly() -> None:
    """Eight 1-GPU hosts of 1..8 hours on 4 GPUs: LPT pairs them to 9 hours each, the optimum."""
    cluster = ClusterShape((NodeShape("node0", 4, 80 * 2**30, 16.0),), "named")
    jobs = [Job(f"h{i}/p", _request(f"h{i}/p", 1.0), [], float(i), i) for i in range(1, 9)]
    timed = simulate(cluster, jobs)
    assert max(t.end_s for t in timed) == 9.0 == lower_bound(cluster, [(j.predicted_s, 1.0) for j in jobs])


def test_backfill_never_delays_the_host_first_in_line() -> None:
    """2 GPUs; A holds one until t=10; H (longest, first in line) needs both. At t=2 a host
    that would still run at t=10 must not take the free GPU; one that ends by then may."""
    cluster = ClusterShape((NodeShape("node0", 2, 80 * 2**30, 16.0),), "named")
    a = Job("a/p", _request("a/p", 1.0), ["a/p|0"], 10.0, 0)
    head = Job("h/p", _request("h/p", 2.0), ["h/p|0"], 50.0, 1)
    long_ = Job("l/p", _request("l/p", 1.0), ["l/p|0"], 30.0, 2)
    short = Job("s/p", _request("s/p", 1.0), ["s/p|0"], 3.0, 3)
    sched = Scheduler(cluster, [a, head, long_, short])
    slot = sched.ledger.find(a.request)
    assert slot is not None
    sched._start(a, slot, 0.0)  # A is running, predicted to end at t=10
    assert [k for k, _ in sched.start_hosts(2.0)] == ["s/p"]  # L (to t=32) waits; S (to t=5) fills the gap
    assert sched.waiting()[0] == "h/p waits for 2 GPUs on one node; 0 whole GPUs free on the best node"


def test_the_hang_of_issue_10_cannot_happen() -> None:
    """The trial order that hung: huge_fp32 (10 GPUs) and huge_bf16 (5) on a 12-GPU node, then huge_fp16 (5)."""
    cluster = ClusterShape((NodeShape("node0", 12, 80 * 2**30, 4.0),), "named")
    jobs = [
        Job("huge/bf16", _request("huge/bf16", 5.0, 1.0), [f"huge/bf16|{i}" for i in range(2)], 10.0, 0),
        Job("huge/fp16", _request("huge/fp16", 5.0, 1.0), [f"huge/fp16|{i}" for i in range(2)], 10.0, 1),
        Job("huge/fp32", _request("huge/fp32", 10.0, 1.0), [f"huge/fp32|{i}" for i in range(2)], 20.0, 2),
    ]
    sched = Scheduler(cluster, jobs)
    assert [k for k, _ in sched.start_hosts(0.0)] == ["huge/fp32"]  # 10 of 12 GPUs; 5 more do not fit
    picks = [sched.next_block(), sched.next_block(), sched.next_block()]
    assert [p.key if p else None for p in picks] == ["huge/fp32", "huge/fp32", None]  # nothing for the waiters
    assert sched.waiting() == [
        "huge/bf16 waits for 5 GPUs on one node; 2 whole GPUs free on the best node",
        "huge/fp16 waits for 5 GPUs on one node; 2 whole GPUs free on the best node",
    ]
    assert sched.block_ended("huge/fp32|0") is None
    assert sched.block_ended("huge/fp32|1") == "huge/fp32"  # retired: its GPUs go back at once
    assert sorted(k for k, _ in sched.start_hosts(30.0)) == ["huge/bf16", "huge/fp16"]
