"""The preflight's sweep half: what the sweep and this machine decide before anything is written.

The one preflight every entry point runs is `rayq.store.preflight.preflight` (`rayq plan`,
`rayq.plan`, `rayq run` and `rayq.run`, through `rayq.execution.driver.run_sweep`): it checks
the output, calls `check_sweep` here, then judges the results directory against the sweep.
This half needs no results: each model's context (rayq.planning.context), GPTQ's group sizes
(rayq.planning.gptq_groups), each engine against each precision on the device its hosts will
have (rayq.catalog.engines, which asks this machine's vLLM build what it lacks), and the
packages each precision and engine needs. Every refusal is a RayqError of one line (exit
status 2). Imports neither torch, Ray nor vLLM: a device is decided from the sweep's
runtime.num_gpus and, for a local run, the NVIDIA device files.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayq.catalog import engines, precisions
from rayq.errors import RayqError
from rayq.planning import context, gptq_groups
from rayq.planning.spec import SpecError

if TYPE_CHECKING:
    from rayq.planning.context import ContextOverflow, ModelCheck
    from rayq.planning.spec import Sweep

DeviceOf = Callable[[str], "str | None"]  # host key "model/precision" -> "cpu", "cuda" or None (not known)


class EngineRefusedError(SpecError):
    """An engine that cannot run a precision on the device its host will have (or on this machine)."""


class MissingPackageError(RayqError):
    """A precision or engine whose packages are not installed on the machine its hosts run on."""


@dataclass(frozen=True)
class SweepChecks:
    """What `check_sweep` found, for the callers that say it: the context per model, the overflows
    allowed, where the hosts run, and warnings (packages missing here, for hosts that run elsewhere)."""

    checks: tuple[ModelCheck, ...]
    overflows: tuple[ContextOverflow, ...]
    here: bool  # the hosts run on this machine (a local Ray), so its packages and kernels count
    devices: str  # how the hosts' devices were decided, e.g. "runtime.num_gpus 0: CPU hosts"
    warnings: tuple[str, ...] = ()


def check_sweep(
    sweep: Sweep,
    *,
    allow_past_context: bool = False,
    address: str | None = None,
    device_of: DeviceOf | None = None,
) -> SweepChecks:
    """Every check of `sweep` that needs no results directory; raises a one-line RayqError.

    `address`: the Ray cluster the run joins (default: the sweep's runtime.address; neither: a
    local Ray on this machine). `device_of`: the hosts' devices where a placement knows them
    (`rayq plan --gpus`); otherwise they follow runtime.num_gpus and this machine's GPUs.
    """
    here = not (address or sweep.spec.runtime.address) and device_of is None
    if device_of is None:
        device_of, devices = planned_devices(sweep, here)
    else:
        devices = "as placed"
    refuse_engines(sweep, device_of, devices, here)
    missing = missing_packages(sweep)
    if missing and here:
        it = "it" if len(missing) == 1 else "them"
        raise MissingPackageError(
            f"{sweep.path}: {'; '.join(missing)} (the hosts run on this machine): install {it}, "
            f"or take {it} out of the sweep"
        )
    gptq_groups.check_sweep(sweep)
    checks = tuple(context.check_models(sweep))
    overflows = tuple(context.require_fit(sweep, allow_past_context, checks))
    return SweepChecks(checks, overflows, here, devices, tuple(missing))


def planned_devices(sweep: Sweep, here: bool) -> tuple[DeviceOf, str]:
    """The device every host of `sweep` will have before placement, and why, from runtime.num_gpus.

    0: a CPU; a number: CUDA; "auto": CUDA if this machine has an NVIDIA GPU, where the hosts
    run here, and unknown (None) on a cluster until it is placed (rayq.execution.driver._place).
    """
    n = sweep.spec.runtime.num_gpus
    if n == 0:
        device, why = "cpu", "runtime.num_gpus 0: CPU hosts"
    elif n != "auto":
        device, why = "cuda", f"runtime.num_gpus {n:g}: GPU hosts"
    elif not here:
        device, why = None, "runtime.num_gpus auto: placed on the cluster"
    elif local_gpus():
        device, why = "cuda", "runtime.num_gpus auto and an NVIDIA GPU here: GPU hosts"
    else:
        device, why = "cpu", "runtime.num_gpus auto and no NVIDIA GPU here: CPU hosts"
    return (lambda _key: device), why


def local_gpus() -> int:
    """NVIDIA GPUs a local Ray would see: the device files, cut to CUDA_VISIBLE_DEVICES as Ray cuts them."""
    found = len(glob.glob("/dev/nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    return min(found, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))


def refuse_engines(sweep: Sweep, device_of: DeviceOf, devices: str, here: bool) -> None:
    """Refuse hosts whose engine cannot run their precision on their device (and, `here`, on this machine's build).

    The one engine x precision x device decision: the preflight asks it before anything is
    written, and the driver asks it again once a joined cluster has placed the hosts.
    """
    refused = engines.refusals(sweep, device_of, here)
    if refused:
        raise EngineRefusedError(f"{sweep.path}: refused before launch ({devices}): {'; '.join(refused)}")


def missing_packages(sweep: Sweep) -> list[str]:
    """One item per precision or engine of `sweep` whose packages are not installed on this machine."""
    out = []
    for name in sweep.spec.precisions:
        if missing := precisions.missing_packages(precisions.get(name)):
            out.append(f"precision {name} needs {', '.join(missing)}, {_not_installed(missing)}")
    for engine in sorted({sweep.spec.engine_of(m) for m in sweep.spec.models}):
        if missing := engines.missing_packages(engine):
            install = engines.get(engine).install
            how = f" ({install})" if install else ""
            out.append(f"engine {engine} needs {', '.join(missing)}, {_not_installed(missing)}{how}")
    return out


def _not_installed(packages: list[str]) -> str:
    return f"which {'is' if len(packages) == 1 else 'are'} not installed here"
