"""The Host contract: what the execution layer may call on a model host, and nothing else.

A model host is a Ray actor holding one model in one precision (rayq.host.runner). The driver
side (rayq.execution: the host pool, the launcher's trials, the fidelity baseline) holds only
actor handles and calls three methods on them; everything else a host does happens inside its
actor. Stating those three here, as a `typing.Protocol`, lets every host be checked against
the same list: the transformers and vLLM engines' actors (the engine registry's
rayq.catalog.engines names them by path) and a benchmark's stand-in (bench/schedule.py), which
once lacked `generate_stream` and failed every trial without stopping.

A host's class takes exactly one argument, its `HostConfig` (rayq.host.config), built by keyword.
Ray's own calls (`__ray_ready__`) and the actor table's states (phase, alive: read by
rayq.execution.host_pool from Ray, not asked of the host) are not part of the contract.

Torch-free, like the config: the execution layer imports these two modules of the host layer,
never an engine (tests/test_architecture.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from rayq.host.config import HostConfig


@runtime_checkable
class Host(Protocol):
    """What rayq.execution calls on a model host's actor handle."""

    def generate_stream(self, completions: list[dict[str, Any]], every: int) -> Iterator[list[dict[str, Any]]]:
        """Rows for `completions` (planned completions as dicts), in parts of `every` as they end.

        Called by a Tune trial (rayq.execution.launcher) with Ray's streaming returns: the trial
        commits each part while the rest decode, so a lost host costs at most a part, and what
        it had not returned is sent again to the restarted host. Every completion gets exactly
        one row, a failed one included (status error or oom): the dataset, not an exception,
        says what went wrong.
        """
        ...

    def info(self) -> dict[str, Any]:
        """The host's row of the `models` table (and its `layers`): how it loaded, what it measured.

        Called by the host pool when it retires a host whose blocks are done, and by the
        baseline when a baseline host measured nothing (its load error says why).
        """
        ...

    def reference(self) -> bytes | None:
        """This host's distributions on the fidelity text; None when not measured.

        Called by the fidelity baseline (rayq.execution.baseline) on the short-lived host in the
        baseline precision: every other host of that model is measured against these bytes.
        """
        ...


class HostClass(Protocol):
    """A host's class: built from one `HostConfig`, inside its Ray actor."""

    __name__: str

    def __call__(self, config: HostConfig) -> Host: ...


METHODS = ("generate_stream", "info", "reference")


def problems(cls: type) -> list[str]:
    """Why `cls` is not a host class, one line per problem; [] when it is.

    Read from the signatures (isinstance on a Protocol checks only that the names exist): the
    constructor takes one `config`, and each method of `Host` exists and takes its arguments,
    by position (as the launcher passes them) and by name.
    """
    out = []
    try:
        _check_binds(inspect.signature(cls), ["config"])
    except (TypeError, ValueError) as e:
        out.append(f"{cls.__qualname__}(config: HostConfig) cannot be called: {e}")
    for name in METHODS:
        want = [p for p in inspect.signature(getattr(Host, name)).parameters if p != "self"]
        got = inspect.getattr_static(cls, name, None)
        if got is None or not callable(got):
            out.append(f"{cls.__qualname__} has no method {name}({', '.join(want)})")
            continue
        try:
            _check_binds(inspect.signature(getattr(cls, name)), ["self", *want])
        except (TypeError, ValueError) as e:
            out.append(f"{cls.__qualname__}.{name} does not take ({', '.join(want)}): {e}")
    return out


def _check_binds(sig: inspect.Signature, names: list[str]) -> None:
    """Raise TypeError unless `sig` binds `names` both by position and by keyword, and needs no more."""
    sig.bind(*names)
    sig.bind(**{n: n for n in names})


def require_host_class(cls: type) -> None:
    """Refuse a class that is not a host (a benchmark's stand-in) before any actor starts."""
    found = problems(cls)
    if found:
        raise TypeError("not a model host (rayq.host.protocol.Host): " + "; ".join(found))
