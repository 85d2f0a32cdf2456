"""One results directory holds one sweep: a run's sweep compared with what the directory holds.

Rows of two different sweeps in one directory cannot be told apart by a later reader (`rayq
status` would count both against one plan, a report would pool them), so a run whose sweep
differs from the directory's is refused before anything starts, unless the user says
otherwise (`--allow-sweep-change`, remembered for that sweep file, so its resume needs no
flag). What differs is judged by the data, not the file's text:

- another sweep name, in the rows on disk or the manifest;
- completions on disk that the new plan does not contain (a grid value, a model, a
  precision or a prompt taken out or changed): their rows would be orphaned beside it;
- completions whose prompt now has another position (`prompt_id` on disk would disagree
  with the plan: completion ids hash the prompt's text, not its position, so reordering
  keeps every id and would go unnoticed otherwise).

An extension (the same sweep planning more: another precision, more prompts at the end, a
new grid value) keeps every row on disk valid, so it is accepted, and recorded: the
manifest keeps every version of the sweep file it has seen (`sweep_versions`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from rayq.errors import ResultsDirError

ALLOW_FLAG = "--allow-sweep-change"


def now() -> str:
    """The timestamp every record in a manifest carries (UTC, to the second)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


class SweepMismatchError(ResultsDirError):
    """The results directory holds another sweep, or rows the given sweep does not plan."""


@dataclass(frozen=True)
class Verdict:
    """How the run's sweep relates to the directory's: new, same, extension (more work),
    revised (the same work, other settings or text) or changed (refused unless allowed)."""

    kind: str
    detail: str = ""


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def judge(
    sweep_name: str,
    sweep_text: str,
    manifest: dict[str, Any],
    disk: dict[str, tuple[int, str]],
    prompt_of: dict[str, int],
    where: str,
    allow_change: bool,
) -> Verdict:
    """Compare a run's sweep with the directory `where`; raise SweepMismatchError if it differs.

    `disk`: completion id -> (prompt_id, sweep) of the rows on disk; `prompt_of`: completion
    id -> prompt_id of the run's plan.
    """
    if not disk:
        return Verdict("new")
    old_text = _last_text(manifest) or None  # "": a sweep built in Python before its text was kept
    diff = _describe_diff(old_text, sweep_text) if old_text is not None else ""
    names = {name for _, name in disk.values() if name} | ({manifest["sweep"]} if "sweep" in manifest else set())
    others = sorted(n for n in names if n != sweep_name)
    problems = []
    if others:
        problems.append(f"holds sweep {', '.join(map(repr, others))}, not {sweep_name!r}")
    unplanned = [cid for cid in disk if cid not in prompt_of]
    if unplanned and not others:
        problems.append(
            f"holds {len(unplanned)} completions that sweep {sweep_name!r} as given does not plan"
            + (f" ({diff})" if diff else "")
        )
    moved = sum(1 for cid, (pid, _) in disk.items() if cid in prompt_of and prompt_of[cid] != pid)
    if moved:
        problems.append(f"{moved} completions on disk have another prompt_id now (prompts reordered or removed)")
    if problems:
        if allow_change or _accepted_before(manifest, sweep_text):
            return Verdict("changed", "; ".join(problems))
        raise SweepMismatchError(
            f"{where} {'; '.join(problems)}: use another --output"
            + (", restore the sweep file (new prompts go at the end)" if not others else "")
            + f", or pass {ALLOW_FLAG} to keep both in one directory"
        )
    if old_text is not None and fingerprint(old_text) == fingerprint(sweep_text):
        return Verdict("same")
    extra = len(prompt_of) - len(set(prompt_of) & set(disk))
    if extra == 0 and old_text is not None:  # the same work (a runtime setting, a comment): a revision
        return Verdict("revised", diff or "the file's text changed")
    return Verdict("extension", f"{extra} completions not on disk yet" + (f"; {diff}" if diff else ""))


def record(manifest: dict[str, Any], sweep_file: str, sweep_text: str, run_id: str, verdict: Verdict) -> bool:
    """Add the sweep file's text to the manifest's `sweep_versions` if it is new; True if it was."""
    versions = manifest.setdefault("sweep_versions", [])
    fp = fingerprint(sweep_text)
    if any(v.get("sha256_16") == fp for v in versions):
        return False
    versions.append(
        {
            "sha256_16": fp,
            "file": sweep_file,
            "yaml": sweep_text,
            "first_run_id": run_id,
            "seen_at": now(),
            "change": "first" if verdict.kind == "new" else verdict.kind,
            "detail": verdict.detail,
        }
    )
    return True


def _accepted_before(manifest: dict[str, Any], sweep_text: str) -> bool:
    """Whether this very sweep file was run here before with the change allowed: its resume needs no flag."""
    fp = fingerprint(sweep_text)
    return any(v.get("sha256_16") == fp and v.get("change") == "changed" for v in manifest.get("sweep_versions", []))


def _last_text(manifest: dict[str, Any]) -> str | None:
    versions = manifest.get("sweep_versions") or []
    if versions:
        return versions[-1].get("yaml")
    return manifest.get("sweep_yaml")  # a directory written before versions were kept


def _describe_diff(old_text: str, new_text: str, limit: int = 3) -> str:
    """What changed between two sweep files, as `path: old -> new` items (at most `limit`)."""
    try:
        old, new = yaml.safe_load(old_text), yaml.safe_load(new_text)
    except yaml.YAMLError:
        return ""
    items: list[str] = []
    _diff(old, new, "", items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"{sub} removed")
            elif key not in old:
                out.append(f"{sub} added")
            else:
                _diff(old[key], new[key], sub, out)
        return
    if old == new:
        return
    if isinstance(old, list) and isinstance(new, list):
        gone = [x for x in old if x not in new]
        added = [x for x in new if x not in old]
        parts = ([f"- {_short(gone)}"] if gone else []) + ([f"+ {_short(added)}"] if added else [])
        out.append(f"{path}: {' '.join(parts) or 'reordered'}")
        return
    out.append(f"{path}: {_short(old)} -> {_short(new)}")


def _short(value: Any, width: int = 60) -> str:
    text = repr(value[0] if isinstance(value, list) and len(value) == 1 else value)
    return text if len(text) <= width else text[: width - 3] + "..."
