"""What is done: one rule for resuming a run, `rayq plan --output` and `rayq.plan()`.

A completion is done when its *planned* id has a row in the results, whatever that row's
status: a run writes only final rows (ok, error, oom, unplaceable) and the next run resumes
past every one of them. With `retry_failed` (`rayq run --retry-failed`) only the ok rows
count, so the failed ones run again. A row the sweep does not plan (another sweep's, an older
revision's) is never counted. The ids are read through `Store.finished_ids`, so a directory
and an object-storage URI (s3://) count the same way.
"""

from __future__ import annotations

from rayq.planning import planner
from rayq.planning.spec import Sweep
from rayq.store.dataset import Store


def remaining_work(sweep: Sweep, store: Store, retry_failed: bool = False) -> planner.Work:
    """The planned ids minus the done ones: what a (resumed) run still has to do."""
    return planner.remaining_work(sweep, store.finished_ids(retry_failed))


def done_per_host(sweep: Sweep, store: Store, retry_failed: bool = False) -> dict[str, int]:
    """Done completions per host key ("model/precision", every host of the sweep, 0 where none)."""
    groups = planner.groups(sweep)
    left = planner.left_per_group(groups, remaining_work(sweep, store, retry_failed))
    return {g.key: g.n_completions - left[g.key] for g in groups}
