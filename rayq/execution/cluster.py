"""Joining or starting Ray, and the shape of the live cluster (Ray's side of rayq.planning.resources)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

from rayq.errors import RayqError
from rayq.planning.estimate import parse_bytes
from rayq.planning.resources import ClusterShape, NodeShape


def live_cluster(gpu_memory: str | None = None) -> ClusterShape:
    """The shape of the Ray cluster this process is connected to.

    Ray reports how many GPUs a node has, not how much memory each holds: `gpu_memory`
    (the sweep's `runtime.gpu_memory`) gives it, else it is read once per node with
    nvidia-smi; logical GPUs (a test cluster) have none to read.
    """
    import ray

    from rayq.planning.throughput import gpu_type_of_device

    mem = parse_bytes(gpu_memory) if gpu_memory else None
    nodes = []
    for i, n in enumerate(sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])):
        res = n.get("Resources", {})
        gpus = int(res.get("GPU", 0))
        probed_mem, name = _probe_gpus(n["NodeID"]) if gpus else (None, None)
        nodes.append(
            NodeShape(
                f"node{i}",
                gpus,
                mem or probed_mem,
                float(res.get("CPU", 0)),
                int(res.get("memory", 0)) or None,
                n["NodeID"],
                gpu_type_of_device(name) if name else None,
            )
        )
    return ClusterShape(tuple(nodes), "live")


def _probe_gpus(node_id: str) -> tuple[int | None, str | None]:
    """(memory of the smallest GPU, its name) from nvidia-smi on that node; (None, None) for logical GPUs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def smallest_gpu() -> tuple[int | None, str | None]:
        import subprocess

        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.total,name", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            rows = [line.split(",", 1) for line in out.splitlines() if line.strip()]
            mib, name = min((int(m), n.strip()) for m, n in rows)
            return mib * 1024**2, name
        except Exception:  # noqa: BLE001 - no driver: logical GPUs with no memory to report
            return None, None

    ref = smallest_gpu.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    try:
        return ray.get(ref, timeout=60)
    except Exception:  # noqa: BLE001
        return None, None


# What Tune reads when a run starts, set for the run only (run_env): the caller's environment,
# a notebook's included, is left as it was. A value the caller set is kept.
TUNE_ENV = {
    # No result files per trial: the dataset is the record.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Tune's plain progress output (rayq shows its own; verbose=0).
    "RAY_AIR_NEW_OUTPUT": "0",
    # Tune's experiment state is never read back (the dataset says what is done), and
    # saving it serializes every trial so far: with thousands of trials, save rarely, and
    # without a warning that saving is slow.
    "TUNE_GLOBAL_CHECKPOINT_S": "600",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000",
}


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str]) -> Iterator[None]:
    """Set each of `values` that the environment lacks, for the block only, then remove exactly
    those; a key the caller had keeps its value throughout (theirs wins). A key someone else
    changed again inside the block is left as they made it."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k, v in added.items():
            if os.environ.get(k) == v:
                del os.environ[k]


@contextlib.contextmanager
def run_env() -> Iterator[None]:
    """Around a run (starting Ray, placing, Tune): Tune's settings (TUNE_ENV) and quiet loggers."""
    _quiet_ray_logs()
    with scoped_env(TUNE_ENV):
        yield


def _quiet_ray_logs() -> None:
    # Tune's result loggers are off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS), so its analysis
    # warns that no result files exist; the dataset is the record, so silence it.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    # The warning that token authentication is on: it is on, with a token rayq keeps in
    # the environment rather than under the home directory.
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


@functools.cache
def _process_token() -> str:
    """The auth token of every local Ray this process starts: one per process, because Ray's
    client reads a token once and keeps it for the life of the process (its C++
    AuthenticationTokenLoader); a second local start with another token is refused
    (InvalidAuthToken), measured on Ray 2.60."""
    return secrets.token_hex(32)


def start_ray(address: str | None) -> None:
    """Join `address`, or start a private local Ray instance.

    A local instance gets a fresh session even if a killed earlier run left Ray processes
    behind (address="local"), and a token of this process's own (`_process_token`) rather
    than one Ray would write under the home directory. The token is in the environment only
    while `ray.init` starts the GCS and the raylet, which take it from there (their workers
    inherit it); the driver's client has read it by then. A later local start in this process,
    after `ray.shutdown()`, gets the same token again. What `ray.init` itself sets in this
    process's environment stays (tests/test_launcher.py lists it), RAY_AUTH_MODE=token among
    it. A caller who starts a local Ray of their own later in the same process, after this
    one is shut down, must give it a token (RAY_AUTH_TOKEN) before the first rayq run: Ray's
    client keeps the first token of the process.
    """
    import ray

    _quiet_ray_logs()
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    if address:
        _check_reachable(address)
        ray.init(address=address, **kwargs)
        return
    token: dict[str, str] = {}
    token_mode = os.environ.get("RAY_AUTH_MODE", "token") != "disabled"
    if token_mode and not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        token["RAY_AUTH_TOKEN"] = _process_token()
    with scoped_env(token):
        ray.init(address="local", **kwargs)


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) that nothing listens on.

    `ray.init` retries such an address for minutes, printing warnings, where a user wants to
    hear at once that the address is wrong. `auto` and `local` are Ray's own to resolve.
    """
    import socket

    target = address.removeprefix("ray://")
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise RayqError(
            f"--address {address}: no Ray cluster answers there ({reason}); check the head's address and port "
            "(`ray status` on the head), or leave --address out to start a local Ray"
        ) from None
