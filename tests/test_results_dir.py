"""The results directory under everyday mistakes: a damaged file, another sweep, a held lock, a typo.

Each case is tried as a user meets it (the `rayq` command in a subprocess, its exit status
and its stderr) on a real dataset written by a real run of the tiny model, and read back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml

from rayq.errors import RayqError
from rayq.execution.driver import run_sweep
from rayq.planning import spec
from rayq.store.dataset import SCHEMA, DamagedFileWarning, Store
from tests.conftest import rayq_cmd, sweep_dict, write_sweep

N = 48  # 3 prompts x 2 max_new_tokens x 2 temperatures x 2 top_k x 2 precisions


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*rayq_cmd(), *map(str, args)], capture_output=True, text=True, timeout=300)


def one_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line a refusal prints: no traceback, nothing else."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("rayq: "), lines
    return lines[0]


def ids(out: Path) -> pl.DataFrame:
    return pl.from_arrow(Store(out).read(["completion_id", "status", "prompt_id"]))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, local_ray: None) -> tuple[dict, Path]:
    """A finished two-precision sweep; tests work on copies of it."""
    data = sweep_dict(tiny_model, precisions=["fp32", "bf16"])
    out = tmp_path_factory.mktemp("done") / "results"
    result = run_sweep(spec.parse(data, "tiny.yaml"), out, quiet=True)
    assert result.complete and result.written == N and result.exit_status == 0 and result.failed == 0
    return data, out


@pytest.fixture
def copy(done: tuple[dict, Path], tmp_path: Path) -> tuple[dict, Path]:
    data, out = done
    dst = tmp_path / "results"
    shutil.copytree(out, dst)
    return data, dst


def test_a_truncated_file_is_skipped_by_readers_then_moved_aside_and_only_its_rows_rerun(
    copy: tuple[dict, Path], tmp_path: Path
) -> None:
    data, out = copy
    (bad,) = Store(out).files("tiny", "bf16")
    (fp32_file,) = Store(out).files("tiny", "fp32")
    bad_ids = set(pl.read_parquet(bad)["completion_id"])
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # what a full disk or an interrupted copy leaves
    rel = bad.relative_to(out).as_posix()

    status = cli("status", out)
    assert status.returncode == 0
    assert one_line(status).startswith(f"rayq: warning: skipped unreadable file {rel} (")
    assert "tiny/fp32" in status.stdout and " 24 " in status.stdout

    query = cli("query", out, "SELECT count(*) AS n FROM completions", "--format", "csv")
    assert query.returncode == 0 and query.stdout.split() == ["n", "24"], query.stderr
    assert rel in one_line(query)

    check = cli("check", out)
    assert check.returncode == 4, check.stdout + check.stderr
    assert f"unreadable: {rel}" in check.stdout and "missing: 24 planned ids not on disk (tiny/bf16 24)" in check.stdout

    result = run_sweep(spec.parse(data, "tiny.yaml"), out, quiet=True)
    assert result.written == 24 and result.complete and result.exit_status == 0
    assert [q["file"] for q in result.quarantined] == [rel]
    moved = out / result.quarantined[0]["moved_to"]
    assert moved.read_bytes() == raw[: len(raw) // 2] and moved.parts[-6] == "_quarantine"
    m = json.loads((out / "manifest.json").read_text())
    assert m["quarantine"][0]["file"] == rel and "magic bytes" in m["quarantine"][0]["reason"]
    assert m["runs"][-1]["quarantined"] == 1
    df = ids(out)
    assert df.height == N and df["completion_id"].n_unique() == N and (df["status"] == "ok").all()
    assert set(df.filter(pl.col("precision") == "bf16")["completion_id"]) == bad_ids
    assert Store(out).files("tiny", "fp32") == [fp32_file]  # the good partition was not rewritten

    again = cli("check", out)
    assert again.returncode == 0 and again.stdout.rstrip().endswith("every planned id once"), again.stdout
    assert "quarantined by earlier runs: 1 file(s)" in again.stdout


def test_a_corrupt_page_behind_an_intact_footer_is_moved_aside_when_compaction_meets_it(
    copy: tuple[dict, Path],
) -> None:
    import pyarrow.parquet as pq

    data, out = copy
    (bad,) = Store(out).files("tiny", "fp32")
    meta = pq.ParquetFile(bad).metadata.row_group(0)
    text = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "text")
    raw = bytearray(bad.read_bytes())
    start = text.data_page_offset + 16  # inside the text column's compressed page; ids and status intact
    raw[start : start + 64] = b"\xff" * 64
    bad.write_bytes(bytes(raw))
    rel = bad.relative_to(out).as_posix()

    with pytest.warns(DamagedFileWarning, match=re.escape(rel)):  # the footer check passes it; compaction does not
        first = run_sweep(spec.parse(data, "tiny.yaml"), out, quiet=True)
    assert [q["file"] for q in first.quarantined] == [rel]
    assert not first.complete and first.on_disk == 24 and first.exit_status == 3
    second = run_sweep(spec.parse(data, "tiny.yaml"), out, quiet=True)
    assert second.complete and second.written == 24 and second.exit_status == 0
    df = ids(out)
    assert df.height == N and df["completion_id"].n_unique() == N
    assert json.loads((out / "manifest.json").read_text())["runs"][-2]["quarantined"] == 1


def test_check_reads_every_byte_and_reports_duplicates_and_unplanned_ids(tmp_path: Path, tiny_model: Path) -> None:
    data = sweep_dict(tiny_model)
    sweep_file = write_sweep(tmp_path / "s.yaml", data)
    sweep = spec.parse(data, str(sweep_file))
    from rayq.planning import planner

    planned = list(planner.iter_completions(sweep, sweep.spec.models[0], "fp32"))
    store = Store(tmp_path / "out")
    rows = [dict.fromkeys(SCHEMA.names) | {"completion_id": c.completion_id, "status": "ok"} for c in planned]
    store.write("tiny", "fp32", rows[:5])
    store.write("tiny", "fp32", [*rows[4:], dict(rows[0], completion_id="not-planned")])  # row 4 twice
    proc = cli("check", tmp_path / "out", "--sweep", sweep_file)
    assert proc.returncode == 4
    assert f"duplicated: 1 ids on disk more than once (e.g. {planned[4].completion_id})" in proc.stdout
    assert "unplanned: 1 ids on disk that the sweep does not plan (e.g. not-planned)" in proc.stdout
    assert f"planned: {len(planned)}; on disk: {len(planned)}" in proc.stdout

    # a corrupt page inside a file whose footer is intact: only a full read finds it
    f = store.files()[0]
    raw = bytearray(f.read_bytes())
    raw[4:200] = b"\xff" * 196
    f.write_bytes(bytes(raw))
    proc = cli("check", tmp_path / "out", "--sweep", sweep_file)
    assert proc.returncode == 4 and f"unreadable: {f.relative_to(tmp_path / 'out').as_posix()}" in proc.stdout


def test_another_sweep_or_a_changed_one_is_refused_in_one_line(copy: tuple[dict, Path], tmp_path: Path) -> None:
    data, out = copy
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    manifest = (out / "manifest.json").read_bytes()

    other = cli("run", write_sweep(tmp_path / "other.yaml", {**data, "name": "other"}), "--output", out)
    assert other.returncode == 2
    line = one_line(other)
    assert "holds sweep 'tiny', not 'other'" in line and "--allow-sweep-change" in line and str(out) in line

    grid = {**data["grid"], "max_new_tokens": [4, 16]}
    changed = cli("run", write_sweep(tmp_path / "changed.yaml", {**data, "grid": grid}), "--output", out)
    assert changed.returncode == 2
    line = one_line(changed)
    assert "holds 24 completions that sweep 'tiny' as given does not plan" in line
    assert "grid.max_new_tokens: - 8 + 16" in line

    prompts = list(reversed(data["prompts"]))
    reordered = cli("run", write_sweep(tmp_path / "reordered.yaml", {**data, "prompts": prompts}), "--output", out)
    assert reordered.returncode == 2
    assert "32 completions on disk have another prompt_id now" in one_line(reordered)

    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # nothing written, nothing moved
    assert (out / "manifest.json").read_bytes() == manifest


def test_an_extension_is_accepted_and_every_version_of_the_sweep_is_kept(copy: tuple[dict, Path]) -> None:
    data, out = copy
    more = {**data, "prompts": [*data["prompts"], "The future of music"]}
    result = run_sweep(spec.parse(more, "tiny.yaml"), out, quiet=True)
    assert result.sweep_change == "extension" and result.written == 16 and result.complete
    m = json.loads((out / "manifest.json").read_text())
    assert [v["change"] for v in m["sweep_versions"]] == ["first", "extension"]
    assert "prompts: + 'The future of music'" in m["sweep_versions"][1]["detail"]
    assert yaml.safe_load(m["sweep_versions"][1]["yaml"]) == more

    # the same work with another setting: a revision, recorded, nothing to run
    revised = {**more, "runtime": {**more["runtime"], "flush_every": 8}}
    result = run_sweep(spec.parse(revised, "tiny.yaml"), out, quiet=True)
    assert result.sweep_change == "revised" and result.written == 0 and result.complete
    m = json.loads((out / "manifest.json").read_text())
    assert m["sweep_versions"][-1]["change"] == "revised"
    assert m["sweep_versions"][-1]["detail"] == "runtime.flush_every: 4 -> 8"

    # a deliberate change, allowed once: its resume needs no flag, and rows of both stay
    grid = {**data["grid"], "max_new_tokens": [16]}
    changed = {**data, "grid": grid}
    with pytest.raises(RayqError, match="does not plan"):
        run_sweep(spec.parse(changed, "tiny.yaml"), out, quiet=True)
    result = run_sweep(spec.parse(changed, "tiny.yaml"), out, quiet=True, allow_sweep_change=True)
    assert result.sweep_change == "changed" and result.written == 24
    again = run_sweep(spec.parse(changed, "tiny.yaml"), out, quiet=True)
    assert again.sweep_change == "changed" and again.written == 0
    assert ids(out).height == N + 16 + 24


def test_a_live_run_holding_the_directory_is_one_line(copy: tuple[dict, Path], tmp_path: Path) -> None:
    data, out = copy
    lock = {"run_id": "x", "host": socket.gethostname(), "pid": os.getpid()}  # this test process is alive
    (out / "run.lock").write_text(json.dumps(lock))
    proc = cli("run", write_sweep(tmp_path / "s.yaml", data), "--output", out)
    assert proc.returncode == 2
    assert one_line(proc) == (
        f"rayq: {out} is being written by another rayq run (pid {os.getpid()}); "
        "wait for it, or pass --force if it is gone"
    )


def test_a_complete_run_with_failed_rows_exits_1(tmp_path: Path, tiny_model: Path, local_ray: None) -> None:
    # one GPU each, on a local Ray without GPUs: every row is recorded as unplaceable
    data = sweep_dict(tiny_model, grid={"max_new_tokens": [4]}, runtime={"num_gpus": 1, "flush_every": 4})
    result = run_sweep(spec.parse(data, "s.yaml"), tmp_path / "out", quiet=True)
    assert result.complete and result.failed == result.planned == 3 and result.exit_status == 1
    assert set(ids(tmp_path / "out")["status"]) == {"unplaceable"}


@pytest.mark.parametrize(
    "args",
    [
        ("status", "{tmp}/nowhere"),
        ("check", "{tmp}/nowhere"),
        ("query", "{tmp}/nowhere", "SELECT 1"),
        ("report", "{tmp}/nowhere"),
        ("run", "{tmp}/missing.yaml"),
        ("run", "{sweep}", "--output", "{tmp}/a-file"),
        ("run", "{sweep}", "--output", "{tmp}/a-file/below"),
        ("plan", "{bad_model}"),
        ("run", "{sweep}", "--output", "{tmp}/out", "--address", "127.0.0.1:1"),
        ("plan", "{sweep}", "--address", "ray://127.0.0.1:1"),
    ],
    ids=[
        "status",
        "check",
        "query",
        "report",
        "no-sweep-file",
        "output-is-a-file",
        "output-below-a-file",
        "model",
        "run-address",
        "plan-address",
    ],
)
def test_everyday_mistakes_are_one_line_and_exit_2(args: tuple[str, ...], tmp_path: Path, tiny_model: Path) -> None:
    sweep = write_sweep(tmp_path / "s.yaml", sweep_dict(tiny_model))
    bad_model = write_sweep(tmp_path / "m.yaml", sweep_dict(tiny_model, models=[{"name": "x", "bundled": "gpt-5"}]))
    (tmp_path / "a-file").write_text("not a directory")
    proc = cli(*(a.format(tmp=tmp_path, sweep=sweep, bad_model=bad_model) for a in args))
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc)
    words = ("no such", "not a directory", "is a file", "cannot read", "unknown bundled", "no Ray cluster answers")
    assert any(word in line for word in words), line
    assert not (tmp_path / "out").exists()  # refused before anything was written
