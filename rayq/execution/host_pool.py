"""The model host actors of a run: started on the slot the scheduler booked, watched, retired.

Hosts are created by the driver, never inside a Tune trial, so a host lives exactly as
long as it has blocks and no trial's placement group holds its GPUs. Each host is a named
actor in the run's namespace; trials find it by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayq.host.config import HostConfig, torch_threads
from rayq.host.protocol import HostClass
from rayq.planning.placement import Request
from rayq.planning.scheduler import Slot

# A host's phase, as the driver sees it (read from Ray's actor table):
PLACING = "placing"  # asked for, but Ray has not given it its resources yet
LOADING = "loading"  # it has its resources; its model is loading
READY = "ready"  # loaded: it takes blocks
RESTARTING = "restarting"  # its process or node was lost; Ray is starting it again
DEAD = "dead"  # out of restarts
UNKNOWN = "unknown"  # Ray's actor table could not be read


def host_name(group_key: str, generation: int = 1) -> str:
    """The actor name of a group's host; a host that replaces a dead one gets the next generation."""
    return f"rayq-host:{group_key}" + (f"#{generation}" if generation > 1 else "")


def current_host(ray: Any, group_key: str, namespace: str) -> Any | None:
    """The live (or starting) host of a group, whatever its generation; None if there is none yet.

    Ray lists named actors without the dead ones, so the newest listed generation is the one.
    """
    base = host_name(group_key)
    generations: dict[int, str] = {}  # read back as host_name wrote them
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if a["namespace"] != namespace:
            continue
        if name == base:
            generations[1] = name
        elif name.startswith(base + "#") and name[len(base) + 1 :].isdigit():
            generations[int(name[len(base) + 1 :])] = name
    if not generations:
        return None
    newest = generations[max(generations)]
    try:
        return ray.get_actor(newest, namespace=namespace)
    except ValueError:  # it died between the listing and the lookup
        return None


def actor_phase(ray: Any, handle: Any) -> str:
    """PENDING_CREATION with no process yet means waiting for resources; with one, loading.

    Read from the GCS actor table (`ray._private.state`, a private API): Ray's public state
    API needs the dashboard, which rayq leaves off.
    """
    try:
        from ray._private import state

        info = state.actors(actor_id=handle._actor_id.hex())
    except Exception:  # noqa: BLE001 - a Ray without that table
        return UNKNOWN
    s = info.get("State")
    if s == "ALIVE":
        return READY
    if s in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
        return LOADING if info.get("Pid") else PLACING
    if s == "RESTARTING":
        return RESTARTING
    if s == "DEAD":
        return DEAD
    return UNKNOWN


def alive(ray: Any, handle: Any) -> bool:
    """Whether a host may still answer (alive, loading or restarting) rather than dead for good.

    A dead named actor is still returned by `ray.get_actor`, so its state is read from the table.
    """
    return actor_phase(ray, handle) != DEAD


def host_options(req: Request, slot: Slot, max_restarts: int) -> tuple[dict[str, Any], Any]:
    """Ray options for a host on `slot`, and the placement group it needs, if any.

    A sharded host reserves its GPUs as one bundle of a STRICT_PACK placement group, so they
    are on one node; other hosts ask for their share directly. Both prefer the booked node
    softly: after that node is lost, a restart goes elsewhere.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    options: dict[str, Any] = {"num_cpus": req.num_cpus, "num_gpus": req.num_gpus, "max_restarts": max_restarts}
    if req.memory:
        options["memory"] = req.memory
    node_id = slot.node.node_id
    if req.sharded:
        from ray.util import placement_group

        bundle = {"GPU": req.num_gpus, **({"CPU": req.num_cpus} if req.num_cpus else {})}
        pg = placement_group([bundle], strategy="STRICT_PACK", _soft_target_node_id=node_id)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        return options, pg
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return options, None


@dataclass
class Started:
    handle: Any
    slot: Slot
    request: Request
    group: Any  # the placement group of a sharded host
    asked_at: float


class HostPool:
    """The live hosts of one run, by group key (model/precision)."""

    def __init__(
        self,
        namespace: str,
        make_config: Callable[[str, Request], HostConfig],
        host_cls: Callable[[str], HostClass],
        num_cpus: float,
        max_restarts: int,
    ) -> None:
        import ray

        self.ray = ray
        self.namespace = namespace
        self.make_config = make_config  # group key, request -> the host's HostConfig
        self.host_cls = host_cls  # group key -> host class (its engine's), resolved where its actor starts
        self.actor_cls: dict[Any, Any] = {}
        threads = torch_threads(num_cpus)
        self.env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.max_restarts = max_restarts
        self.hosts: dict[str, Started] = {}
        self.generation: dict[str, int] = {}  # how many hosts each group has had

    def start(self, key: str, request: Request, slot: Slot, now: float) -> None:
        options, pg = host_options(request, slot, self.max_restarts)
        self.generation[key] = self.generation.get(key, 0) + 1
        cls = self.host_cls(key)
        if cls not in self.actor_cls:
            self.actor_cls[cls] = self.ray.remote(cls)
        handle = (
            self.actor_cls[cls]
            .options(
                name=host_name(key, self.generation[key]),
                namespace=self.namespace,
                runtime_env={"env_vars": self.env},
                **options,
            )
            .remote(self.make_config(key, request))
        )
        self.hosts[key] = Started(handle, slot, request, pg, now)

    def ensure(self, key: str, now: float) -> bool:
        """Start a fresh host on the same slot if this one is out of restarts; True if it did."""
        h = self.hosts.get(key)
        if h is None or alive(self.ray, h.handle):
            return False
        # The replacement gets a name of its own generation (start): Ray frees a dead actor's
        # name only once no process holds a handle to it, and reused trial actors still do.
        del self.hosts[key]
        self._remove_group(h.group)
        self.start(key, h.request, h.slot, now)
        return True

    def phases(self) -> dict[str, str]:
        return {key: actor_phase(self.ray, h.handle) for key, h in self.hosts.items()}

    def retire(self, key: str) -> dict[str, Any] | str | None:
        """Stop a host whose blocks are done; its `info()` (the models row), or why there is none."""
        h = self.hosts.pop(key, None)
        if h is None:
            return None
        try:
            info: dict[str, Any] | str = self.ray.get(h.handle.info.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001 - a dead host has no info to give
            info = f"{type(e).__name__}: {e}"
        self.ray.kill(h.handle)
        self._remove_group(h.group)
        return info

    def _remove_group(self, pg: Any) -> None:
        if pg is not None:
            from ray.util import remove_placement_group

            remove_placement_group(pg)

    def kill_all(self) -> None:
        for h in self.hosts.values():
            self.ray.kill(h.handle)
            self._remove_group(h.group)
        self.hosts.clear()
