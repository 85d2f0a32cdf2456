"""The one preflight: every check a sweep must pass before anything is written and before Ray starts.

`preflight` is the function every entry point calls, with the same arguments and so the same
refusals in the same words: `rayq plan` (rayq.cli.plan), `rayq.plan` (rayq.api), and `rayq
run` / `rayq.run` through rayq.execution.driver.run_sweep, which calls it before it touches
Ray, the lock or manifest.json. It checks, in this order: an output that is a file (or lies
below one); the sweep and this machine (rayq.planning.preflight.check_sweep: engines x
precisions x devices, packages, GPTQ group sizes, the context); then the results directory,
which must hold this sweep and no other (rayq.store.sweep_history.judge). Every refusal is a
RayqError of one line, exit status 2. It lives in the store layer because the last check
reads the results; the checks that need none are the planning layer's.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rayq.errors import ResultsDirError
from rayq.planning import planner
from rayq.planning.preflight import DeviceOf, SweepChecks, check_sweep
from rayq.store import manifest, sweep_history
from rayq.store.storage import is_uri, normalize

if TYPE_CHECKING:
    from rayq.planning.context import ContextOverflow
    from rayq.planning.spec import Sweep
    from rayq.store.sweep_history import Verdict


@dataclass(frozen=True)
class Preflight:
    """A sweep that passed: what was checked, for the callers that say it or use it."""

    sweep: Sweep
    output: str | None  # the results' location (normalized); None when none was given
    checks: SweepChecks
    verdict: Verdict | None  # how the sweep relates to the results there; None without an output

    @property
    def overflows(self) -> tuple[ContextOverflow, ...]:
        """Prompt/length pairs past a model's context, as allowed (`allow_past_context`)."""
        return self.checks.overflows

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the run may still meet, one line each (packages missing here, for hosts that run elsewhere)."""
        return self.checks.warnings


def preflight(
    sweep: Sweep,
    output: str | os.PathLike[str] | None = None,
    *,
    allow_past_context: bool = False,
    allow_sweep_change: bool = False,
    address: str | None = None,
    device_of: DeviceOf | None = None,
) -> Preflight:
    """Check `sweep` (already validated) against this machine and the results at `output`; raise a RayqError if refused.

    Writes nothing and starts nothing. `address`: the Ray cluster a run would join (default:
    the sweep's runtime.address; neither: a local Ray, so this machine's packages and
    kernels count). `device_of`: the hosts' devices where a placement knows them (rayq plan
    --gpus). `allow_past_context`, `allow_sweep_change`: as the flags of `rayq run`.
    """
    out = normalize(output) if output is not None else None
    if out is not None:
        check_output(out)
    checks = check_sweep(sweep, allow_past_context=allow_past_context, address=address, device_of=device_of)
    verdict = judge_directory(sweep, out, allow_sweep_change) if out is not None else None
    return Preflight(sweep, out, checks, verdict)


def check_output(out: str) -> None:
    """Refuse an output that is a file, or sits below one."""
    if is_uri(out):
        return
    p = Path(out)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise ResultsDirError(f"{out}: cannot hold results: {q} is a file, not a directory")
        if q.exists():
            break


def judge_directory(sweep: Sweep, out: str, allow_change: bool) -> Verdict:
    """How `sweep` relates to the results at `out` (rayq.store.sweep_history); raises SweepMismatchError
    when they hold another sweep, or rows it does not plan, unless `allow_change`."""
    from rayq.store.dataset import DamagedFileWarning, Store

    store = Store(out)
    if not store.exists():
        return sweep_history.Verdict("new")
    with warnings.catch_warnings():  # an unreadable file is said (and moved aside) by the run
        warnings.simplefilter("ignore", DamagedFileWarning)
        disk = store.read(["completion_id", "prompt_id", "sweep"])
    ids = disk["completion_id"].to_pylist()
    on_disk = dict(zip(ids, zip(disk["prompt_id"].to_pylist(), disk["sweep"].to_pylist(), strict=True), strict=True))
    prompt_of = planner.remaining_work(sweep, set()).prompt_of if on_disk else {}
    return sweep_history.judge(
        sweep.spec.name,
        sweep.text,
        manifest.load(store.storage),
        on_disk,
        prompt_of,
        store.display,
        allow_change,
    )
