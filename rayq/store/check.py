"""`rayq check DIR`: read every byte of a results directory and say what is wrong with it.

Readers and `rayq run` only look at each file's footer (cheap, and enough for a truncated
file); a corrupt page inside an intact file shows only when it is read, so this reads all
of every file. It then compares the ids on disk with the sweep's plan (the sweep file given,
or the one recorded in the manifest): ids missing, ids on disk twice, ids the plan does not
know. It changes nothing; `rayq run` is what repairs (moves unreadable files aside, re-runs
their completions, compacts duplicates away).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rayq.errors import ResultsDirError
from rayq.store import manifest as manifest_mod
from rayq.store.dataset import Damaged, Store, split_ok

EXAMPLES = 3  # ids named per problem; the counts say how many in all


@dataclass
class CheckReport:
    location: str
    files: int = 0
    damaged: list[Damaged] = field(default_factory=list)
    quarantined: int = 0  # files moved aside by earlier runs (listed in the manifest)
    rows: int = 0
    ids: int = 0
    duplicated: dict[str, int] = field(default_factory=dict)  # id -> rows holding it
    failed: int = 0  # ids whose best row is not ok
    planned: int | None = None  # None: the plan could not be made
    plan_note: str = ""
    missing: int = 0  # planned ids not on disk
    unplanned: list[str] = field(default_factory=list)
    missing_by_host: Counter[str] = field(default_factory=Counter)

    @property
    def clean(self) -> bool:
        return not (self.damaged or self.duplicated or self.missing or self.unplanned)

    def lines(self) -> list[str]:
        out = [f"checked {self.location}: {self.files} files read in full, {self.rows} rows, {self.ids} ids"]
        for d in self.damaged:
            out.append(f"  unreadable: {d.path} ({d.reason})")
        if self.quarantined:
            out.append(f"  quarantined by earlier runs: {self.quarantined} file(s) in _quarantine/ (see manifest.json)")
        if self.duplicated:
            ex = ", ".join(list(self.duplicated)[:EXAMPLES])
            out.append(
                f"  duplicated: {len(self.duplicated)} ids on disk more than once (e.g. {ex}); "
                "the next `rayq run` compacts them to one row each"
            )
        if self.planned is None:
            out.append(f"  planned ids: not checked ({self.plan_note})")
        else:
            out.append(f"  planned: {self.planned}; on disk: {self.planned - self.missing}; {self.plan_note}")
            if self.missing:
                hosts = ", ".join(f"{k} {n}" for k, n in sorted(self.missing_by_host.items()))
                out.append(f"  missing: {self.missing} planned ids not on disk ({hosts}); `rayq run` runs them")
            if self.unplanned:
                ex = ", ".join(self.unplanned[:EXAMPLES])
                out.append(f"  unplanned: {len(self.unplanned)} ids on disk that the sweep does not plan (e.g. {ex})")
        if self.failed:
            out.append(f"  failed rows: {self.failed} (status not ok; `rayq run --retry-failed` runs them again)")
        n_problems = len(self.damaged) + bool(self.duplicated) + bool(self.missing) + bool(self.unplanned)
        out.append("ok: every file readable, every planned id once" if self.clean else f"problems: {n_problems}")
        return out


def check_dataset(location: str, sweep_file: str | None = None) -> CheckReport:
    store = Store(location)
    if not store.exists():
        raise ResultsDirError(f"{location}: no such results directory")
    report = CheckReport(store.display)
    report.files = len(store.data_files())
    report.damaged = store.verify(full=True)
    m = manifest_mod.load(store.storage)
    report.quarantined = len(m.get("quarantine", []))
    t = store.read(["completion_id", "status"])  # skips the damaged files found above
    counts = Counter(t["completion_id"].to_pylist())
    every, ok = split_ok(t)
    report.rows, report.ids = t.num_rows, len(every)
    report.duplicated = {cid: n for cid, n in counts.items() if n > 1}
    report.failed = len(every - ok)
    _check_plan(report, m, sweep_file, every)
    return report


def _check_plan(report: CheckReport, m: dict, sweep_file: str | None, on_disk: set[str]) -> None:
    from rayq.planning import planner, spec

    try:
        if sweep_file is not None:
            sweep = spec.load(sweep_file)
            report.plan_note = f"plan of {sweep_file}"
        elif m.get("sweep_yaml"):
            recorded = m.get("sweep_file") or "sweep.yaml"
            sweep = spec.parse(
                yaml.safe_load(m["sweep_yaml"]),
                f"{recorded} (as recorded in the manifest)",
                Path(recorded).parent,
                m["sweep_yaml"],
            )
            report.plan_note = f"plan of the sweep in manifest.json ({recorded})"
        else:
            report.plan_note = "no sweep in manifest.json; pass --sweep FILE"
            return
    except spec.SpecError as e:
        report.plan_note = f"{str(e).splitlines()[0]}; pass --sweep FILE"
        return
    work = planner.remaining_work(sweep, on_disk)
    left = planner.left_per_group(planner.groups(sweep), work)
    report.planned = work.planned
    report.missing = sum(left.values())
    report.missing_by_host = Counter({key: n for key, n in left.items() if n})
    report.unplanned = sorted(on_disk - work.planned_ids)
