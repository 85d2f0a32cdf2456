"""What it takes to start a model host, as one validated value: the contract's other half.

The driver (rayq.execution) builds one `HostConfig` per host by keyword and sends it to the
host's Ray actor, whose class takes exactly `(config: HostConfig)` (rayq.host.protocol). One
value instead of eleven positional arguments: a field cannot be passed in the wrong place,
a bad value is refused where it is built (naming the field) rather than deep inside an actor,
and the driver, the engines and the benchmarks' stand-in hosts read the same names.

Torch-free and picklable (a frozen dataclass of plain values), so that the execution layer
can build and send it without importing an engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from rayq.catalog.hosts import HostKey

PROTOCOLS = ("serial", "batched")
# What every host of a sweep gets for its fidelity measurement (rayq.execution.baseline.settings),
# less the baseline's reference and why it is missing, which only some hosts have.
FIDELITY_KEYS = ("text", "label", "window", "stride", "max_tokens", "top_k", "baseline")


def torch_threads(num_cpus: float) -> int:
    """torch's thread count for a host holding `num_cpus` CPUs.

    More threads than cores made torch 10-40x slower on this 2-core machine, so a host
    uses exactly its CPU share (at least one thread).
    """
    return max(1, int(num_cpus))


def _help(text: str, default: Any = None, factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    """One host's settings: one model, in one precision, on the resources it was given."""

    sweep: str = field(metadata={"help": "the sweep's name: the `sweep` column of every row"})
    model: str = field(metadata={"help": "the model's name in the sweep file: the `model` column"})
    source: str = field(metadata={"help": "where the weights come from: bundled:NAME, path:DIR or hub:ID"})
    precision: str = field(metadata={"help": "the precision (or quantization scheme) the model runs in"})
    revision: str | None = _help("the hub revision of the weights (None: the default branch)")
    trust_remote_code: bool = _help("let transformers run the model's own code", False)
    context: int | None = _help("the sweep file's size.context: the context length when the config has none")
    num_cpus: float = _help("CPUs Ray gave the host; torch's threads follow it (torch_threads)", 1.0)
    num_gpus: float | None = _help("GPUs Ray gave the host (0: the CPU); None outside a run", None)
    estimated_bytes: int | None = _help("the planner's memory estimate of the host (the models table)")
    protocol: str = _help("serial: one completion at a time (the paper's); batched: rows decode together", "serial")
    batch_size: int | str = _help("rows decoding together under protocol batched; auto: by device", 1)
    precision_options: Mapping[str, Any] = _help("the sweep's options for this precision", factory=dict)
    layer_sqnr: bool = _help("measure each layer's weight SQNR against the unquantized weights", True)
    fidelity: Mapping[str, Any] | None = _help(
        "the fidelity text and settings, and the baseline's reference (rayq.execution.baseline); None: not measured"
    )
    share_greedy: bool = _help("decode a greedy output once; rows that cannot differ copy it", True)

    def __post_init__(self) -> None:
        problems = [p for p in (self._problem(f.name) for f in fields(self)) if p]
        if problems:
            raise ValueError("HostConfig: " + "; ".join(problems))
        object.__setattr__(self, "precision_options", dict(self.precision_options or {}))

    def _problem(self, name: str) -> str | None:
        """Why field `name` is refused, naming the field and what it takes; None when it is fine."""
        v = getattr(self, name)
        if name in ("sweep", "model", "source", "precision"):
            return None if isinstance(v, str) and v else f"{name} must be a non-empty string (got {v!r})"
        if name in ("trust_remote_code", "layer_sqnr", "share_greedy"):
            return None if isinstance(v, bool) else f"{name} must be true or false (got {v!r})"
        if name == "revision":
            return None if v is None or (isinstance(v, str) and v) else f"revision must be a string or None (got {v!r})"
        if name in ("context", "estimated_bytes"):
            ok = v is None or (_is_int(v) and v > 0)
            return None if ok else f"{name} must be a positive integer or None (got {v!r})"
        if name in ("num_cpus", "num_gpus"):
            ok = (v is None and name == "num_gpus") or (_is_number(v) and v >= 0)
            return None if ok else f"{name} must be a number >= 0 (got {v!r})"
        if name == "protocol":
            return None if v in PROTOCOLS else f"protocol must be one of {', '.join(PROTOCOLS)} (got {v!r})"
        if name == "batch_size":
            ok = v == "auto" or (_is_int(v) and v >= 1)
            return None if ok else f"batch_size must be an integer >= 1 or 'auto' (got {v!r})"
        if name == "precision_options":
            return None if v is None or isinstance(v, Mapping) else f"precision_options must be a mapping (got {v!r})"
        if name == "fidelity":
            return _fidelity_problem(v)
        return None

    @property
    def key(self) -> HostKey:
        """The host's (model, precision): its actor's name and its partition of the dataset."""
        return HostKey(self.model, self.precision)

    @property
    def threads(self) -> int:
        """torch's threads in this host (its CPU share, at least one)."""
        return torch_threads(self.num_cpus)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _fidelity_problem(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, Mapping):
        return f"fidelity must be a mapping or None (got {type(v).__name__})"
    missing = [k for k in FIDELITY_KEYS if k not in v]
    if missing:
        return f"fidelity lacks {', '.join(missing)} (rayq.execution.baseline.settings gives them)"
    return None
