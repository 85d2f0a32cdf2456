"""The result store on object storage (a moto S3 server): commits, compaction, the fence, a resumed run."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq
import pytest

import rayq
from rayq.planning import spec
from rayq.store import manifest
from rayq.store.dataset import SCHEMA, DamagedFileWarning, StaleWriterError, Store
from rayq.store.query import query
from rayq.store.storage import Storage
from tests.conftest import BUCKET, S3, rayq_cmd, sweep_dict, write_sweep
from tests.test_store import row


def test_store_round_trip_compaction_and_fence_on_s3(s3: S3) -> None:
    uri = s3.uri("store")
    store = Store(uri)
    assert not store.storage.is_local and store.location == uri and store.root == uri
    assert not store.exists()
    fence = store.take_ownership()
    assert s3.keys("store") == ["run.lock"] and store.read_lock()["run_id"] == fence.run_id  # type: ignore[index]
    with pytest.raises(RuntimeError, match="another rayq run"):  # a live run on this host holds it
        Store(uri).take_ownership()

    f1 = store.write("m", "fp32", [row("a", text="first", t=0), row("b", status="error", t=0)], fence)
    f2 = store.write("m", "fp32", [row("a", text="second", t=5), row("b", text="fixed", t=1)], fence)
    store.write("m2", "bf16", [row("c")], fence)
    assert isinstance(f1, PurePosixPath) and f1.parent == PurePosixPath(
        BUCKET, "store/completions/model=m/precision=fp32"
    )
    assert store.files("m", "fp32") == sorted([f1, f2]) and store.partitions() == [("m", "fp32"), ("m2", "bf16")]
    assert not any("_tmp" in k for k in s3.keys("store"))  # written straight to the final key
    assert store.read().num_rows == 5 and store.read().schema.names == [*SCHEMA.names, "model", "precision"]
    assert store.finished_ids() == {"a", "b", "c"}
    assert store.status_counts()[("m", "fp32")] == {"ok": 2}

    assert store.compact("m", "fp32", fence) == 2
    (merged,) = store.files("m", "fp32")
    assert merged not in (f1, f2)
    got = {r["completion_id"]: (r["status"], r["text"]) for r in store.storage.read_table(merged).to_pylist()}
    assert got == {"a": ("ok", "second"), "b": ("ok", "fixed")}

    new = Store(uri).take_ownership(force=True)  # a new run after the old driver was killed
    with pytest.raises(StaleWriterError):
        store.write("m", "fp32", [row("stale")], fence)
    store.write("m", "fp32", [row("d")], new)
    assert store.finished_ids() == {"a", "b", "c", "d"}
    store.release(fence)  # not the owner: the lock stays
    assert store.read_lock()["run_id"] == new.run_id  # type: ignore[index]
    store.release(new)
    assert store.read_lock() is None and "run.lock" not in s3.keys("store")


def test_a_damaged_object_is_skipped_by_readers_and_moved_aside_on_s3(s3: S3) -> None:
    uri = s3.uri("damaged")
    store = Store(uri)
    store.write("m", "fp32", [row("a")])
    bad = store.write("m", "fp32", [row("b")])
    with store.storage.fs.open_output_stream(str(bad)) as out:  # what a bad copy leaves
        out.write(b"PAR1 not a whole file")
    rel = store.relative(bad)
    with pytest.warns(DamagedFileWarning, match=re.escape(rel)):
        assert Store(uri).finished_ids() == {"a"}
    with pytest.warns(DamagedFileWarning, match=re.escape(rel)):  # Polars' scan failed, then files were checked
        assert query(uri, "SELECT count(*) AS n FROM completions")["n"].item() == 1
    assert [d.path for d in store.verify()] == [rel]
    assert store.quarantine([rel], "run1") == [{"file": rel, "moved_to": f"_quarantine/run1/{rel}"}]
    assert rel not in s3.keys("damaged") and f"_quarantine/run1/{rel}" in s3.keys("damaged")
    assert Store(uri).finished_ids() == {"a"} and not Store(uri).verify()


def test_a_local_store_keeps_its_path_and_staging(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    assert store.root == tmp_path and store.location == str(tmp_path) and store.storage.is_local
    f = store.write("m", "fp32", [row("a")])
    assert isinstance(f, Path) and pq.read_table(f).num_rows == 1
    assert list(Path(store._tmp).iterdir()) == []


def test_done_is_counted_one_way_by_resume_rayq_plan_and_the_library_on_s3(
    s3: S3, tiny_model: Path, tmp_path: Path
) -> None:
    """Done = a planned id with a row, whatever its status (rayq.store.done): what a resumed run skips.

    A failed row is done (only --retry-failed runs it again); a row the sweep does not plan is not.
    """
    from rayq.planning import planner
    from rayq.store import done

    data = sweep_dict(tiny_model)  # 24 completions on one host
    sweep = spec.parse(data, "tiny.yaml")
    uri = s3.uri("done")
    planned = list(planner.iter_completions(sweep, sweep.spec.models[0], "fp32"))
    store = Store(uri)
    rows = [
        row(planned[0].completion_id, sweep="tiny", prompt_id=planned[0].prompt_id),
        row(planned[1].completion_id, status="error", sweep="tiny", prompt_id=planned[1].prompt_id),
        row("not-planned", sweep="tiny"),
    ]
    store.write("tiny", "fp32", rows)
    assert done.remaining_work(sweep, store).done_before == 2  # what `rayq run` skips
    assert done.remaining_work(sweep, store, retry_failed=True).done_before == 1
    assert done.done_per_host(sweep, store) == {"tiny/fp32": 2}
    plan = rayq.plan(sweep, uri, allow_sweep_change=True)
    assert (plan.done, plan.hosts[0].done, plan.remaining) == (2, 2, 22)
    assert plan.output is not None and plan.output.startswith(f"s3://{BUCKET}/done")
    f = write_sweep(tmp_path / "tiny.yaml", data)
    cli = subprocess.run(
        [*rayq_cmd(), "plan", str(f), "--output", uri, "--allow-sweep-change"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert re.search(r"tiny/fp32 .* 24 completions, 2 done", cli.stdout), cli.stdout


def test_sweep_to_s3_resumes_and_reads_back(s3: S3, tiny_model: Path) -> None:
    import ray

    from rayq.execution.driver import run_sweep

    if ray.is_initialized():  # workers must start after the AWS_* variables are set
        ray.shutdown()
    sweep = spec.parse(sweep_dict(tiny_model), "tiny.yaml")
    uri = s3.uri("sweeps/tiny")
    try:
        first = run_sweep(sweep, uri, quiet=True)
    finally:
        ray.shutdown()
    assert first.output == uri and first.complete and first.written == first.planned == 24
    second = run_sweep(sweep, uri, quiet=True)  # nothing left: Ray is not even started
    assert second.written == 0 and second.done_before == 24 and second.complete

    keys = s3.keys("sweeps/tiny")
    assert "run.lock" not in keys and not any(k.startswith(("_tmp/", "_tune/")) for k in keys)
    assert [k for k in keys if k.startswith("completions/")] == [
        k for k in keys if re.fullmatch(r"completions/model=tiny/precision=fp32/part-\w+\.parquet", k)
    ]
    assert len(Store(uri).files()) == 1  # compacted
    runs = manifest.load(Storage.at(uri))["runs"]
    assert len(runs) == 2 and runs[0]["written"] == 24 and runs[1]["written"] == 0

    tables = rayq.open(uri)  # the same URI, its options turned into Polars' own
    completions = tables.completions.collect()
    assert completions.height == 24 and completions["completion_id"].n_unique() == 24
    assert tables.models.collect().height == 1

    status = subprocess.run([*rayq_cmd(), "status", uri], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    assert re.search(r"tiny/fp32\s+24\s+24\s+24\s+0", status.stdout), status.stdout
    report = subprocess.run([*rayq_cmd(), "report", uri], capture_output=True, text=True, timeout=120)
    assert report.returncode == 2 and "--out" in report.stderr
