"""The Parquet store: atomic commits, compaction, the ownership fence, and readers agreeing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from rayq.store.dataset import SCHEMA, StaleWriterError, Store


def row(cid: str, status: str = "ok", text: str = "hello", t: int = 0, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {name: None for name in SCHEMA.names}
    r.update(
        completion_id=cid,
        sweep="s",
        prompt_id=0,
        prompt="p",
        max_new_tokens=4,
        temperature=1.0,
        top_k=5,
        top_p=1.0,
        do_sample=True,
        repetition_penalty=1.0,
        seed=0,
        sampling_seed=1,
        text=text,
        status=status,
        finished_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=t),
    )
    r.update(kw)
    return r


def test_write_lands_in_hive_partition(tmp_path: Path) -> None:
    store = Store(tmp_path)
    f = store.write("m1", "fp32", [row("a"), row("b")])
    assert f.parent == tmp_path / "completions" / "model=m1" / "precision=fp32"
    assert pq.read_table(f).schema.equals(SCHEMA)
    assert store.finished_ids() == {"a", "b"}
    assert list(store._tmp.iterdir()) == []


def test_compaction_dedupes_preferring_ok_then_latest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write("m", "fp32", [row("a", text="first", t=0), row("b", status="error", t=0)])
    store.write("m", "fp32", [row("a", text="second", t=5), row("b", status="ok", text="fixed", t=1)])
    store.write("m", "fp32", [row("b", status="error", t=9), row("c")])
    assert len(store.files("m", "fp32")) == 3
    assert store.compact("m", "fp32") == 3
    files = store.files("m", "fp32")
    assert len(files) == 1
    got = {r["completion_id"]: (r["status"], r["text"]) for r in pq.read_table(files[0]).to_pylist()}
    assert got == {"a": ("ok", "second"), "b": ("ok", "fixed"), "c": ("ok", "hello")}
    # compacting a clean partition rewrites nothing
    assert store.compact("m", "fp32") == 3 and store.files("m", "fp32") == files


def test_retry_failed_counts_only_ok_rows_as_done(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write("m", "fp32", [row("a"), row("b", status="oom"), row("c", status="error")])
    assert store.finished_ids() == {"a", "b", "c"}
    assert store.finished_ids(retry_failed=True) == {"a"}
    assert store.status_counts()[("m", "fp32")] == {"ok": 1, "oom": 1, "error": 1}


def test_fence_refuses_a_stale_writer(tmp_path: Path) -> None:
    store = Store(tmp_path)
    old = store.take_ownership()
    store.write("m", "fp32", [row("a")], old)
    new = store.take_ownership(force=True)  # a new run after the old driver was killed
    with pytest.raises(StaleWriterError):
        store.write("m", "fp32", [row("b")], old)
    store.write("m", "fp32", [row("c")], new)
    assert store.finished_ids() == {"a", "c"}
    assert list(store._tmp.iterdir()) == []


def test_live_owner_on_this_host_blocks_a_second_run(tmp_path: Path) -> None:
    store = Store(tmp_path)
    fence = store.take_ownership()  # held by this (live) process
    with pytest.raises(RuntimeError, match="another rayq run"):
        Store(tmp_path).take_ownership()
    store.release(fence)
    Store(tmp_path).take_ownership()


def test_torn_temporary_file_is_invisible_to_readers(tmp_path: Path) -> None:
    store = Store(tmp_path)
    good = store.write("m", "bf16", [row("a"), row("b")])
    store._tmp.mkdir(exist_ok=True)
    (store._tmp / "part-torn.parquet").write_bytes(good.read_bytes()[:100])  # a write cut short
    assert (
        pl.scan_parquet(str(tmp_path / "completions" / "**" / "*.parquet"), hive_partitioning=True).collect().height
        == 2
    )
    assert store.finished_ids() == {"a", "b"}


def test_polars_duckdb_pandas_read_the_same_rows(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write("m1", "fp32", [row("a"), row("b")])
    store.write("m1", "bf16", [row("c")])
    store.write("m2", "fp32", [row("d", text="x")])
    root = tmp_path / "completions"
    pol = pl.scan_parquet(str(root / "**" / "*.parquet"), hive_partitioning=True).collect()
    duck = duckdb.sql(f"select * from read_parquet('{root}/*/*/*.parquet', hive_partitioning=true)").pl()
    pdf = pd.read_parquet(root)
    key = ["completion_id", "model", "precision", "text"]
    a = pol.select(key).sort("completion_id")
    assert a.equals(duck.select(key).sort("completion_id"))
    assert a.to_dicts() == pl.from_pandas(pdf[key].astype(str)).sort("completion_id").to_dicts()
    assert a["model"].to_list() == ["m1", "m1", "m1", "m2"]


def test_files_from_before_a_new_column_still_read_and_compact(tmp_path: Path) -> None:
    import pyarrow as pa

    store = Store(tmp_path)
    store.write("m", "fp32", [row("new")])
    old = pa.Table.from_pylist([row("old")], schema=SCHEMA).drop_columns(["batch_size", "peak_memory_mb"])
    part = store.partition_dir("m", "fp32")
    pq.write_table(old, part / "part-old.parquet")
    assert store.finished_ids() == {"old", "new"}
    assert store.compact("m", "fp32") == 2
    t = pq.read_table(store.files("m", "fp32")[0])
    assert t.schema.equals(SCHEMA)
    assert {r["completion_id"]: r["batch_size"] for r in t.to_pylist()}["old"] is None
