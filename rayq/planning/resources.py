"""What a cluster offers and what one host asks of it: the vocabulary placement and the scheduler share.

Kept apart from both so that the scheduler (which decides with these) and placement (which
sizes them) import it instead of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayq.planning.estimate import Estimate, fmt_gib, parse_bytes


@dataclass(frozen=True)
class NodeShape:
    name: str
    gpus: int
    gpu_memory: int | None  # bytes of one GPU; None: unknown
    cpus: float
    memory: int | None = None  # host memory Ray may hand to actors (bytes)
    node_id: str | None = None  # the live node's Ray id, when the shape was read from a cluster
    gpu_type: str | None = None  # rayq.planning.throughput's name for its GPUs, when the driver reports one


@dataclass(frozen=True)
class ClusterShape:
    nodes: tuple[NodeShape, ...]
    source: str  # "named" (from --gpus/--gpu-memory) or "live"

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def gpu_type(self) -> str | None:
        """The GPU type of the first node that reports one (mixed types: see docs/cluster.md)."""
        return next((n.gpu_type for n in self.nodes if n.gpu_type), None)

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


def auto_batch_size(device: str) -> int:
    """The starting batch size for `batch_size: auto` (halved on out-of-memory)."""
    return 32 if device.startswith("cuda") else 8
