"""rayq's plug-ins to Ray Tune: the searcher, the callback, the stopper and the trial scheduler.

Each is a small class built from the state it works on (a `rayq.execution.launcher.Launch`,
or anything with the same methods), so a test builds one without Tune running:

- `BlockSearcher` (a Tune `Searcher`) hands out the next block the scheduler admits, nothing
  for now, or FINISHED once every block is admitted or the run is stopping;
- `TrialEvents` (a Tune `Callback`) tells the launch what Tune saw: a trial started, reported
  rows, failed (to be retried, or for good) or completed, and a step of Tune's loop ended;
- `Watchdog` (a Tune `Stopper`) stops the whole run once the launch says why it must stop:
  a stall, or the same error on block after block (rayq.execution.failures.RepeatedFailures);
- `NewestFirst` (a Tune trial scheduler) starts the newest pending trial first.

This module imports Ray Tune when it is imported (it subclasses Tune's bases); the launcher
imports it only when a run starts, so that importing the driver stays light.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher

if TYPE_CHECKING:
    from rayq.execution.launcher import Launch


class _NotPickled:
    """Tune pickles its searcher, callbacks and stopper into tuner.pkl, for a restore rayq never
    does (the dataset says what is done); the launch (actor handles, a filesystem, a stream)
    stays out of it."""

    def __getstate__(self) -> dict[str, Any]:
        return {}


class BlockSearcher(_NotPickled, Searcher):
    """Tune's source of trials: one trial per block the scheduler admits (docs/cluster.md).

    Tune keeps asking while it has room for a pending trial: `None` means "not now" (no host
    has a block to take yet), `FINISHED` ends the search. A `tune.grid_search` could not say
    "not now" (issue 10).
    """

    def __init__(self, launch: Launch) -> None:
        super().__init__()
        self.launch = launch

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.launch.stop_reason is not None:
            return Searcher.FINISHED
        block = self.launch.next_block()
        if block is not None:
            return {"block": block}
        return Searcher.FINISHED if self.launch.all_admitted else None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        pass  # TrialEvents books it, with the trial's error file at hand


class TrialEvents(_NotPickled, tune.Callback):
    """What Tune saw, told to the launch; runs in Tune's loop in the driver, so each call is short."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.launch.trial_started(trial.config["block"], time.monotonic())

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self.launch.rows_reported(int(result.get("written", 0)))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.launch.block_ended(trial.config["block"], None)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A trial failed and Tune will retry it: counted, so the same error on every block stops the run."""
        self.launch.trial_failed(trial.config["block"], trial_error(trial), kept_at(trial))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        """A trial failed with no retries left: counted, and its block ends as failed."""
        error = trial_error(trial)
        self.launch.trial_failed(trial.config["block"], error, kept_at(trial))
        self.launch.block_ended(trial.config["block"], error)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.launch.poll()


class Watchdog(_NotPickled, tune.Stopper):
    """Stops every trial once the launch has a reason to stop (Tune checks after each step)."""

    def __init__(self, launch: Launch) -> None:
        self.launch = launch

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.launch.stop_reason is not None


class NewestFirst(FIFOScheduler):
    """Start the newest pending trial first, so it takes the actor a finished trial left.

    Every trial has the same resources, so Tune reuses a finished trial's actor for a
    pending one (`reuse_actors`). First-in-first-out hands that actor to the oldest pending
    trial, which has already asked Ray for an actor of its own; Tune then kills that one
    as it starts. With blocks ending several times a second this never settles: measured
    here, 8 hosts x 2 blocks in flight started 629 actors for 1,200 trials (each a Python
    process, ~2 s of CPU; 625 killed unused) against 16 newest-first, and ran 2.9 trials/s
    against 11.3 (`bench/trial_overhead.py`).
    """

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        for trial in reversed(tune_controller.get_trials()):
            if trial.status == Trial.PENDING:
                return trial
        return super().choose_trial_to_run(tune_controller)  # a paused trial, if any


def trial_error(trial: Any) -> str:
    """The error a failed trial last raised, as one line (rayq.execution.failures.error_line)."""
    from rayq.execution.failures import error_line

    path = trial_error_file(trial)
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        text = ""
    return error_line(text)


def trial_error_file(trial: Any) -> str | None:
    """Where Tune writes a failed trial's tracebacks (one per failure, appended), in its local staging folder."""
    return getattr(trial, "error_file", None)


def kept_at(trial: Any) -> str | None:
    """Where that file stays once Tune has copied it to the run's storage (DIR/_tune: Store.tune_dir)."""
    local, stored = trial_error_file(trial), getattr(trial, "path", None)
    return f"{stored.rstrip('/')}/{Path(local).name}" if local and stored else local
