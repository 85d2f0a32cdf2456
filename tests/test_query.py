"""`rayq query` and `rayq.open`: SQL over the real Parquet layout, local and on S3 (moto)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import rayq
from rayq.store import query as rq
from rayq.store.dataset import MODELS_SCHEMA, SCHEMA, DamagedFileWarning, Store
from tests.conftest import BUCKET, S3, rayq_cmd

MODELS = ("llama-7b", "mistral-7b", "falcon-7b")
PRECISIONS = ("fp32", "bnb-nf4")
GROUPED = (
    "SELECT model, precision, temperature, avg(duplicate_content_words) AS dup, count(*) AS n "
    "FROM completions WHERE status = 'ok' GROUP BY model, precision, temperature "
    "ORDER BY model, precision, temperature"
)


def row(cid: str, i: int = 0, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = dict.fromkeys(SCHEMA.names)
    r.update(
        completion_id=cid,
        sweep="s",
        prompt_id=i % 3,
        prompt="Life in London",
        max_new_tokens=16 + 16 * (i % 2),
        temperature=(0.5, 1.0, 1.5)[i % 3],
        top_k=(1, 50)[i % 2],
        top_p=1.0,
        do_sample=True,
        repetition_penalty=1.0,
        seed=0,
        sampling_seed=i,
        text=f'row {i} says "hi", then\na new line',
        content_words=10 + i % 7,
        duplicate_content_words=i % 5,
        tokens_per_s=20.0 + i,
        status="error" if i % 11 == 0 else "ok",
        device="cpu",
        batch_size=4,
        finished_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
        protocol="batched",
    )
    r.update(kw)
    return r


def fill(root: Path, per_partition: int = 12, chunks: int = 2) -> Store:
    """Several models x precisions, each partition in several files, plus a `models` row each."""
    store = Store(root)
    n = 0
    for m in MODELS:
        for p in PRECISIONS:
            for _ in range(chunks):
                rows = [row(f"{m}-{p}-{n + j}", n + j) for j in range(per_partition // chunks)]
                n += len(rows)
                store.write(m, p, rows)
            store.write_model_info(
                "s", {"model": m, "precision": p, "load_s": 1.5 + len(m), "load_status": "ok", "batch_size": 4}
            )
    return store


def direct(store: Store) -> pl.DataFrame:
    """The grouped query, computed from Store.read (pyarrow), not through the scan under test."""
    df = pl.from_arrow(store.read())
    assert isinstance(df, pl.DataFrame)
    return (
        df.filter(pl.col("status") == "ok")
        .group_by("model", "precision", "temperature")
        .agg(pl.col("duplicate_content_words").mean().alias("dup"), pl.len().alias("n"))
        .sort("model", "precision", "temperature")
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*rayq_cmd(), "query", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def results(tmp_path: Path) -> Store:
    return fill(tmp_path / "results")


def test_grouped_sql_equals_a_direct_polars_computation(results: Store) -> None:
    got = rq.query(results.root, GROUPED)
    want = direct(results)
    assert got.height == len(MODELS) * len(PRECISIONS) * 3
    assert_frame_equal(got, want, check_dtypes=False)
    # the library entry point without SQL, and the CLI, agree with it
    lazy = rayq.open(results.root).completions.filter(pl.col("status") == "ok")
    assert lazy.select(pl.len()).collect().item() == want["n"].sum()
    proc = cli(str(results.root), GROUPED, "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    assert_frame_equal(pl.read_csv(io.StringIO(proc.stdout)), want, check_dtypes=False)


def test_a_filter_on_the_partition_columns_reads_only_those_files(results: Store) -> None:
    # A file that cannot be read at all, in a partition the filtered query does not need.
    (results.partition_dir("falcon-7b", "fp32") / "part-garbage.parquet").write_bytes(b"not parquet" * 50)
    with pytest.warns(DamagedFileWarning, match="part-garbage.parquet"):  # checked and left out at open
        n = rq.query(results.root, "SELECT count(*) AS n FROM completions WHERE model = 'llama-7b'")["n"].item()
        where_p = "SELECT count(*) AS n FROM completions WHERE precision = 'bnb-nf4' AND model <> 'llama-7b'"
        n_p = rq.query(results.root, where_p)["n"].item()
        tables = rayq.open(results.root)
    assert n == 12 * len(PRECISIONS)
    assert n_p == 12 * (len(MODELS) - 1)
    lazy = tables.completions.filter(pl.col("model") == "mistral-7b", pl.col("precision") == "fp32")
    assert lazy.collect().height == 12
    assert "falcon" not in lazy.explain()
    # ...while a query that does need it leaves it out, and says so in one warning line.
    with pytest.warns(DamagedFileWarning, match="part-garbage.parquet"):
        n_all = rq.query(results.root, "SELECT count(*) AS n FROM completions")["n"].item()
    assert n_all == 12 * len(PRECISIONS) * len(MODELS)
    proc = cli(str(results.root), "SELECT count(*) AS n FROM completions", "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.split() == ["n", str(n_all)]
    assert proc.stderr.startswith("rayq: warning: skipped unreadable file completions/model=falcon-7b/precision=fp32/")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_models_table_is_queryable_and_joins(results: Store) -> None:
    models = rq.query(
        results.root, "SELECT model, precision, load_s, load_status FROM models ORDER BY model, precision"
    )
    assert models.height == len(MODELS) * len(PRECISIONS)
    assert set(models["load_status"]) == {"ok"}
    assert dict(zip(models["model"], models["load_s"], strict=True))["falcon-7b"] == 1.5 + len("falcon-7b")
    joined = rq.query(
        results.root,
        "SELECT c.model, c.precision, count(*) AS n, max(m.load_s) AS load_s FROM completions c "
        "JOIN models m ON c.model = m.model AND c.precision = m.precision GROUP BY c.model, c.precision",
    )
    assert joined.height == len(MODELS) * len(PRECISIONS) and set(joined["n"]) == {12}
    assert rayq.open(results.root).models.collect_schema().names() == [*MODELS_SCHEMA.names, "model", "precision"]


def test_an_empty_directory_gives_empty_tables_with_the_full_schema(tmp_path: Path) -> None:
    tables = rayq.open(tmp_path)
    completions, models = tables.completions.collect(), tables.models.collect()
    assert completions.height == 0 and models.height == 0
    assert completions.schema == rq.polars_schema(SCHEMA)
    assert models.schema == rq.polars_schema(MODELS_SCHEMA)
    assert completions.schema["finished_at"] == pl.Datetime("us", "UTC")
    assert rq.query(tmp_path, "SELECT model, count(*) AS n FROM completions GROUP BY model").height == 0
    proc = cli(str(tmp_path), "SELECT model, precision, load_s FROM models")
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("0 rows"), proc.stderr
    # a run that has claimed the directory but not committed anything yet
    Store(tmp_path).take_ownership()
    assert rq.query(tmp_path, "SELECT count(*) AS n FROM completions")["n"].item() == 0


def test_a_missing_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such results directory"):
        rayq.open(tmp_path / "nope")
    proc = cli(str(tmp_path / "nope"), "SELECT 1")
    assert proc.returncode == 2
    assert proc.stderr == f"rayq: {tmp_path / 'nope'}: no such results directory\n"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELEC model FROM completions", "bad SQL: "),
        ("SELECT nope FROM completions", "unknown column 'nope'; columns: completion_id, sweep,"),
        ("SELECT model FROM completions WHERE colour = 'red'", "unknown column 'colour'"),
        ("SELECT * FROM runs", "unknown table 'runs'; tables: completions, models, layers"),
        ("SELECT model, count(*) FROM completions", "bad SQL: 'model' should participate in the GROUP BY"),
        ("SELECT sum(text) FROM completions", "bad SQL: "),
        ("SELECT 1; SELECT 2", "bad SQL: "),
    ],
)
def test_bad_queries_give_one_line_errors(results: Store, sql: str, message: str) -> None:
    with pytest.raises(rq.QueryError) as info:
        rq.query(results.root, sql)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)
    proc = cli(str(results.root), sql)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == f"rayq: {info.value}\n"


def test_output_formats_parse_back_to_the_same_rows(results: Store, tmp_path: Path) -> None:
    sql = (
        "SELECT model, precision, completion_id, temperature, do_sample, duplicate_content_words, text, finished_at "
        "FROM completions ORDER BY completion_id"
    )
    want = rq.query(results.root, sql)
    assert want.height == 12 * len(MODELS) * len(PRECISIONS)
    root = str(results.root)

    proc = cli(root, sql, "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    assert_frame_equal(pl.read_csv(io.StringIO(proc.stdout), schema=want.schema), want)
    proc = cli(root, sql, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert len(records) == want.height
    back = pl.DataFrame(records).with_columns(pl.col("finished_at").str.to_datetime(time_unit="us", time_zone="UTC"))
    back = back.cast(dict(want.schema))
    assert_frame_equal(back, want)

    for fmt, read in (("csv", pl.read_csv), ("json", pl.read_json), ("parquet", pl.read_parquet)):
        out = tmp_path / f"out.{fmt}"
        proc = cli(root, sql, "--format", fmt, "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and f"{want.height} rows written to {out}" in proc.stderr
        got = read(out, schema=want.schema) if fmt != "parquet" else read(out)
        assert_frame_equal(got, want, check_dtypes=fmt != "json")

    proc = cli(root, sql, "--format", "parquet")
    assert proc.returncode == 2 and proc.stderr == "rayq: --format parquet needs --out FILE\n"

    proc = cli(root, sql)  # the table: 50 rows at most, and how many there are in all
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(f"{want.height} rows (first 50 shown; --format csv or json for all)")
    assert "llama-7b" in proc.stdout


def _count_while(write: Callable[[], None], root: Path, sql: str, at_least: int = 0) -> list[int]:
    """Run `write` in a thread and count with `sql` until it is done (at least `at_least` times)."""
    done = threading.Event()

    def writer() -> None:
        try:
            write()
        finally:
            done.set()

    seen: list[int] = []
    t = threading.Thread(target=writer)
    t.start()
    try:
        while not done.is_set() or len(seen) < at_least:
            seen.append(rq.query(root, sql)["n"].item())
    finally:
        t.join()
    return seen


def test_reading_while_a_writer_commits_never_errors_or_loses_rows(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write("m", "fp32", [row("seed-0", 0)])
    n_writes, per_write = 30, 5

    def write() -> None:
        for w in range(n_writes):
            model = ("m", "n")[w % 2]
            store.write(model, "fp32", [row(f"w{w}-{j}", j) for j in range(per_write)])

    count = "SELECT count(*) AS n FROM completions"
    seen = _count_while(write, tmp_path, count, at_least=3)
    seen.append(rq.query(tmp_path, count)["n"].item())
    assert seen == sorted(seen), seen
    assert seen[-1] == 1 + n_writes * per_write
    assert list((tmp_path / "_tmp").iterdir()) == []


def test_reading_while_partitions_are_compacted_never_loses_a_completion(tmp_path: Path) -> None:
    """Compaction deletes files a reader may have just listed; `query` lists again."""
    store = Store(tmp_path)

    def write() -> None:
        for w in range(20):
            store.write("m", "fp32", [row(f"w{w}-{j}", j) for j in range(5)])
            if w % 4 == 3:
                store.compact("m", "fp32")

    seen = _count_while(write, tmp_path, "SELECT count(DISTINCT completion_id) AS n FROM completions")
    assert seen == sorted(seen), seen
    assert rq.query(tmp_path, "SELECT count(*) AS n FROM completions")["n"].item() == 100


def test_a_query_lists_again_when_a_listed_file_was_compacted_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path)
    for w in range(3):
        store.write("m", "fp32", [row(f"w{w}", w)])
    stale = rayq.open(tmp_path)
    stale.completions.collect_schema()  # lists the three files, and keeps that list
    store.compact("m", "fp32")  # ...which deletes them
    with pytest.raises(FileNotFoundError):
        stale.completions.collect()
    opened: list[rq.Tables] = []
    real_open = rq.open

    def open_stale_first(path: Any, storage_options: Any = None, verify: bool | None = None) -> rq.Tables:
        opened.append(stale if not opened else real_open(path, storage_options, verify))
        return opened[-1]

    monkeypatch.setattr(rq, "open", open_stale_first)
    assert rq.query(tmp_path, "SELECT count(*) AS n FROM completions")["n"].item() == 3
    assert len(opened) == 2


def test_tables_are_a_snapshot_as_of_first_use(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write("m", "fp32", [row("a")])
    tables = rayq.open(tmp_path)
    assert tables.completions.collect().height == 1
    store.write("m", "fp32", [row("b")])
    assert tables.completions.collect().height == 1  # documented: open again to see new files
    assert rayq.open(tmp_path).completions.collect().height == 2


def test_files_from_before_a_new_column_still_read(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write("m", "fp32", [row("new", 1)])
    old = pa.Table.from_pylist([row("old", 2)], schema=SCHEMA).drop_columns(["batch_size", "protocol"])
    # named to sort first, so nothing may take the schema from the first file found
    pq.write_table(old, store.partition_dir("m", "fp32") / "part-0000-old.parquet")
    only_old = store.partition_dir("old", "fp32")  # a partition with no file of the current schema at all
    only_old.mkdir(parents=True)
    pq.write_table(old, only_old / "part-old.parquet")
    sql = "SELECT model, completion_id, batch_size, protocol FROM completions ORDER BY model, completion_id"
    got = rq.query(tmp_path, sql)
    assert got.rows() == [("m", "new", 4, "batched"), ("m", "old", None, None), ("old", "old", None, None)]
    assert rq.query(tmp_path, "SELECT count(*) AS n FROM completions WHERE model = 'old'")["n"].item() == 1


def test_import_rayq_does_not_import_polars() -> None:
    code = (
        "import sys, rayq, rayq.cli, rayq.planning.spec; assert callable(rayq.open); "
        "assert 'polars' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- object storage ----------------------------------------------------------------


def test_s3_reads_the_same_rows_as_local(results: Store, s3: S3) -> None:
    endpoint = s3.endpoint
    keys = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    # a live run's leftovers ride along: neither may be read
    (results.root / "_tmp").mkdir(exist_ok=True)
    (results.root / "_tmp" / "part-torn.parquet").write_bytes(b"PAR1 torn")
    (results.root / "run.lock").write_text("{}")
    for f in sorted(results.root.rglob("*")):
        if f.is_file():
            s3.client.upload_file(str(f), BUCKET, f"sweeps/roy/{f.relative_to(results.root).as_posix()}")

    opts = {"aws_endpoint_url": endpoint, "aws_region": "us-east-1", "aws_allow_http": "true", **keys}
    uri = "s3://rayq-results/sweeps/roy"
    remote, local = rayq.open(uri, storage_options=opts), rayq.open(results.root)
    for name in ("completions", "models"):
        key = ["model", "precision", "completion_id"] if name == "completions" else ["model", "precision"]
        r = getattr(remote, name).collect().sort(key)
        assert r.height > 0
        assert_frame_equal(r, getattr(local, name).collect().sort(key))
    assert_frame_equal(rq.query(f"{uri}/", GROUPED, storage_options=opts), rq.query(results.root, GROUPED))
    one = remote.completions.filter(pl.col("model") == "llama-7b", pl.col("precision") == "fp32")
    assert one.collect().height == 12 and "mistral" not in one.explain()
    # the CLI takes its object-storage settings from the usual AWS_* variables
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        AWS_ALLOW_HTTP="true",
        AWS_EC2_METADATA_DISABLED="true",
    )
    proc = subprocess.run(
        [*rayq_cmd(), "query", uri, GROUPED, "--format", "csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert_frame_equal(pl.read_csv(io.StringIO(proc.stdout)), direct(results), check_dtypes=False)
    # nothing written there yet: empty, not an error
    empty = rayq.open("s3://rayq-results/not-yet", storage_options=opts)
    assert empty.completions.collect().height == 0 and empty.models.collect().height == 0
