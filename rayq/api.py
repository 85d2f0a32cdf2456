"""rayq as a library: `rayq.sweep`, `rayq.plan` and `rayq.run`, for programs and notebooks.

Each takes what the command line takes, a sweep file or the same fields in a dict, and hands
back a value instead of printing: a `Sweep`, a `Plan`, a `RunResult`. A refusal is raised as
`rayq.RayqError` (a bad sweep as its subclass `SpecError`, naming the field as it does for a
file) instead of being printed and exited on, so a notebook cell fails with the reason and
the kernel lives on. Importing this module costs what `rayq plan` costs (pydantic, pyarrow,
no torch); `run` imports Ray when called. See docs/library.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import yaml

from rayq.planning import planner, spec
from rayq.planning.spec import SpecError, Sweep

if TYPE_CHECKING:
    from rayq.execution.driver import RunResult

__all__ = ["HostPlan", "Plan", "SweepLike", "plan", "run", "sweep"]

# A sweep, the dict of its fields, or a sweep file's path: what `plan` and `run` take.
SweepLike: TypeAlias = Sweep | Mapping[str, Any] | str | os.PathLike[str]

# What `Sweep.path` says for a sweep built in Python: it names no file, and it starts every
# SpecError message where a file's name would.
PYTHON_SWEEP = "<rayq.sweep>"


def sweep(fields: Mapping[str, Any] | None = None, /, **more: Any) -> Sweep:
    """A sweep built in Python, checked as a sweep file is: `rayq.sweep(name=..., models=[...])`
    or `rayq.sweep({...})`, keywords winning over the mapping's keys.

    Relative paths (a model's `path`, `prompts: {file: ...}`) are taken from the current
    directory, as a file's are from its folder. A `Path` is taken as its string and a tuple
    as a list, what YAML would have given. The fields are kept as YAML text, as a file's text
    is, so the manifest records the sweep and a resumed run is recognised as the same one;
    sorted keys make that text the same however the dict was put together.
    """
    data = _plain({**(fields or {}), **more}, "")
    return spec.parse(data, file=PYTHON_SWEEP, base_dir=Path.cwd(), text=yaml.safe_dump(data))


def _plain(value: Any, where: str) -> Any:
    """`value` as the types YAML reads (dict, list, str, int, float, bool, None), or a
    SpecError naming the field of a value a sweep file could not hold."""
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):  # a StrEnum as its value
        return str(value)
    if isinstance(value, int):  # an IntEnum as its number
        return int(value)
    if isinstance(value, float):  # numpy's float64 as a float
        return float(value)
    raise SpecError(
        f"{PYTHON_SWEEP}: {where or '(top level)'}: a value of type {type(value).__name__} has no place in a "
        "sweep file; give a str, int, float, bool, list or dict (numpy values: .tolist())"
    )


def _as_sweep(sweep_or_path: SweepLike) -> Sweep:
    if isinstance(sweep_or_path, Sweep):
        return sweep_or_path
    if isinstance(sweep_or_path, Mapping):
        return sweep(sweep_or_path)
    if isinstance(sweep_or_path, str | os.PathLike):
        return spec.load(Path(sweep_or_path))
    raise TypeError(f"a sweep is a Sweep, a dict of its fields or a sweep file's path, not {type(sweep_or_path)}")


@dataclass(frozen=True)
class HostPlan:
    """One model host of a plan: one model in one precision."""

    key: str  # "model/precision", as in block ids and `rayq status`
    model: str
    precision: str
    source: str  # where the weights come from: bundled:NAME, path:DIR or hub:ID
    completions: int
    blocks: int
    done: int

    @property
    def remaining(self) -> int:
        return self.completions - self.done


@dataclass(frozen=True)
class Plan:
    """What `rayq plan` prints, as values: the sweep's size and, given its results, what is left."""

    sweep: str
    completions: int
    blocks: int
    hosts: tuple[HostPlan, ...]
    output: str | None  # where `done` was counted; None when no results were given or there are none yet
    done: int

    @property
    def remaining(self) -> int:
        return self.completions - self.done

    def describe(self) -> str:
        n = len(self.hosts)
        lines = [
            f"sweep {self.sweep!r}: {self.completions} completions in {self.blocks} blocks "
            f"on {n} model host{'' if n == 1 else 's'}"
        ]
        width = max((len(h.key) for h in self.hosts), default=0)
        for h in self.hosts:
            done = f", {h.done} done" if self.output else ""
            lines.append(f"  {h.key:{width}s}  {h.source}  {h.completions} completions in {h.blocks} blocks{done}")
        if self.output:
            lines.append(f"{self.done} done in {self.output}, {self.remaining} remaining")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def plan(
    sweep_or_path: SweepLike,
    output: str | os.PathLike[str] | None = None,
    *,
    allow_past_context: bool = False,
    allow_sweep_change: bool = False,
    address: str | None = None,
) -> Plan:
    """The plan of a sweep, and what of it the results at `output` (or the sweep's own
    `output:`) already hold. Starts nothing: no Ray, no model.

    Unlike `run`, a missing `output` does not mean `results/NAME`: counting what is done
    reads every id on disk, so it is asked for by name, as `rayq plan --output` does. It
    refuses what `run` would refuse, in the same words, by the same check
    (rayq.store.preflight): a prompt past a model's context (rayq.planning.context.ContextError,
    unless `allow_past_context` or the sweep's runtime.allow_past_context allows it), an engine
    that cannot run a precision where its hosts run, a package not installed, a GPTQ group size,
    an output that is a file or holds another sweep (unless `allow_sweep_change`). `address`:
    the Ray cluster the run would join; then this machine's packages and GPUs decide nothing.
    """
    from rayq.store.preflight import preflight

    s = _as_sweep(sweep_or_path)
    out = output if output is not None else s.spec.output
    preflight(s, out, allow_past_context=allow_past_context, allow_sweep_change=allow_sweep_change, address=address)
    groups = planner.groups(s)
    done: dict[str, int] | None = None  # per host; None: nothing on disk to count against
    if out is not None:
        from rayq.store.dataset import Store
        from rayq.store.done import done_per_host

        store = Store(out)
        if store.exists():
            out = store.display
            done = done_per_host(s, store)  # the rule resume uses (rayq.store.done)
    hosts = tuple(
        HostPlan(
            g.key,
            g.model.name,
            g.precision,
            g.model.source,
            g.n_completions,
            len(g.block_ids),
            done[g.key] if done is not None else 0,
        )
        for g in groups
    )
    return Plan(
        s.spec.name,
        sum(h.completions for h in hosts),
        sum(h.blocks for h in hosts),
        hosts,
        str(out) if done is not None else None,
        sum(h.done for h in hosts),
    )


def run(
    sweep_or_path: SweepLike,
    output: str | os.PathLike[str] | None = None,
    *,
    address: str | None = None,
    retry_failed: bool = False,
    force: bool = False,
    quiet: bool = False,
    **options: Any,
) -> RunResult:
    """Run what the results at `output` lack of the sweep, as `rayq run` does; the same call
    resumes a stopped run. `output` defaults to the sweep's `output:`, else results/NAME.

    A process that already has Ray initialised (`ray.init(...)` in the notebook) runs the
    sweep on that Ray; otherwise `address` is joined, or a private local Ray is started.
    `options` go to `rayq.execution.driver.run_sweep` as they are (see its keywords).
    """
    from rayq.execution.driver import run_sweep

    return run_sweep(
        _as_sweep(sweep_or_path), output, address, retry_failed=retry_failed, force=force, quiet=quiet, **options
    )
