"""SQL and lazy frames over a results directory, local or on object storage.

`open` hands back Polars LazyFrames rather than data so that filters on `model` and
`precision` reach the scan: Polars then lists the files but opens only the partitions the
query can match, which is what keeps a question about one model cheap on a 42-partition
sweep. The full schema is given to the scan instead of being inferred, for three reasons:
a directory a sweep has not written to yet is an empty table rather than an error; files
written before a column was added read with that column null; and no file has to be opened
just to learn the schema (on object storage that is a request per file).

A frame lists its files when it is first used (collected, or asked for its schema) and keeps
that list, frames derived from it included: Polars caches the resolved scan. So `Tables` is a
snapshot of the directory as of its first use; `open` again to see what a running sweep has
committed since. Files appear whole (renamed into place locally, one PUT on object storage),
and `_tmp/` and `run.lock` lie outside the globbed folders, so no reader sees a torn file. Compaction does delete files,
though, so a snapshot can name a file that is gone by the time it is read; `query` lists
afresh for every statement, and again when that happens.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import polars as pl
import pyarrow as pa

from rayq.errors import RayqError, ResultsDirError
from rayq.store.dataset import LAYERS_SCHEMA, MODELS_SCHEMA, PARTITIONS, SCHEMA, TABLES
from rayq.store.storage import HIDDEN_PREFIXES, Storage, is_remote

# Partition values are labels: read them as strings, or a model named `70` becomes an integer.
HIVE_SCHEMA: dict[str, pl.DataType] = {p: pl.String() for p in PARTITIONS}
# A compaction racing a query deletes a file already listed; the next listing will not have it.
_RETRIES = 5
_RETRY_SLEEP_S = 0.05


class QueryError(RayqError, ValueError):
    """The query itself is wrong (syntax, a column or table that does not exist, a type error).

    Kept apart from read failures (a missing directory, an unreadable file) so a caller can
    tell "fix your SQL" from "fix your data"; the message is one line, fit for a terminal.
    A ValueError too, as it was before it was a RayqError.
    """


class NoResultsError(ResultsDirError, FileNotFoundError):
    """No results directory at a local path (a FileNotFoundError too, as it was)."""


@dataclass(frozen=True)
class Tables:
    """The tables of a results directory, as lazy scans (see docs/query.md and docs/schema.md)."""

    completions: pl.LazyFrame
    models: pl.LazyFrame
    layers: pl.LazyFrame


def polars_schema(schema: pa.Schema, partitions: bool = True) -> pl.Schema:
    """A store schema as Polars sees it; partition columns last, where the hive scan puts them."""
    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return pl.Schema({**dict(frame.schema), **(HIVE_SCHEMA if partitions else {})})


def open(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None, verify: bool | None = None
) -> Tables:
    """Lazy `completions`, `models` and `layers` tables of the results directory `path`.

    `path` is a local directory or an object-storage URI (`s3://bucket/dir`, `gs://…`,
    `az://…`); `storage_options` go to Polars as they are (endpoint, keys, region). An s3://
    URI may carry pyarrow's options in its query string, as `rayq run --output` takes it
    (`?endpoint_override=…&scheme=http&region=…`); they become Polars' options, and
    `storage_options` win over them. A local directory that does not exist is an error, as
    it is most likely a typo; one with no files yet gives empty tables.

    With `verify` each file's footer is checked first (rayq.store.dataset.unreadable: one small
    read each), so a truncated file is left out with a DamagedFileWarning instead of failing every query. The default
    verifies local directories only: on object storage that is a request per file, so
    `query` verifies a URI only after a read failed.
    """
    root, remote = _root(path)
    if not remote and not Path(root).is_dir():
        raise NoResultsError(f"{root}: no such results directory")
    opts = None
    location = root
    if remote:
        root, from_uri = _split_options(root)
        opts = {**from_uri, **(storage_options or {})} or None
    schemas = {"completions": SCHEMA, "models": MODELS_SCHEMA, "layers": LAYERS_SCHEMA}
    readable = _readable_files(location, root) if (not remote if verify is None else verify) else None
    frames = {
        name: _scan(root, name, schema, opts, None if readable is None else readable[name])
        for name, schema in schemas.items()
    }
    return Tables(**frames)


def _readable_files(location: str, scan_root: str) -> dict[str, list[str] | None]:
    """Per table, the files to scan (named under `scan_root`, as Polars reads them) when some
    are unreadable; None (the glob) when all are fine."""
    from rayq.store.dataset import unreadable, warn_damaged

    storage = Storage.at(location)
    out: dict[str, list[str] | None] = {}
    for table in TABLES:
        files = storage.list_parquet(storage.path(table))
        good = []
        for f in files:
            rel = f.relative_to(storage.root).as_posix()
            reason = unreadable(storage, f)
            if reason is None:
                good.append(str(f) if storage.is_local else f"{scan_root}/{rel}")
            else:
                warn_damaged(rel, reason)
        out[table] = good if len(good) < len(files) else None
    return out


def query(path: str | os.PathLike[str], sql: str, storage_options: Mapping[str, Any] | None = None) -> pl.DataFrame:
    """Run one SQL statement over the `completions`, `models` and `layers` tables of `path`.

    Raises QueryError when the SQL is at fault; read failures (OSError, Polars' ComputeError)
    pass through unchanged, after a failed read of a URI was tried once more with every
    file's tail checked (damaged files left out, with a warning).
    """
    verify: bool | None = None
    for attempt in range(_RETRIES):
        tables = open(path, storage_options, verify)  # a fresh listing each time (see the module docstring)
        ctx = pl.SQLContext(frames={name: getattr(tables, name) for name in TABLES})
        try:
            return ctx.execute(sql, eager=False).collect()
        except FileNotFoundError:  # listed, then compacted away before it was read
            if attempt == _RETRIES - 1:
                raise
            time.sleep(_RETRY_SLEEP_S * (attempt + 1))
        except (OSError, pl.exceptions.PolarsError) as e:
            err = _as_query_error(e) if isinstance(e, pl.exceptions.PolarsError) else None
            if err is not None:
                raise err from None
            if verify or not is_remote(os.fspath(path)):
                raise
            verify = True  # a URI whose files were not checked: check them and try again
    raise AssertionError("unreachable")


def _root(path: str | os.PathLike[str]) -> tuple[str, bool]:
    s = os.fspath(path)
    if is_remote(s):
        return s.rstrip("/"), True
    return str(Path(s.removeprefix("file://")).expanduser()), False


def _split_options(uri: str) -> tuple[str, dict[str, str]]:
    """An s3:// URI without pyarrow's options (`?region=…&endpoint_override=…&scheme=…`, keys
    before `@`), and those options in Polars' (object_store's) terms."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not (parts.query or "@" in parts.netloc):
        return uri, {}
    q = dict(parse_qsl(parts.query))
    opts = {"aws_region": q["region"]} if "region" in q else {}
    if "@" in parts.netloc:  # s3://KEY:SECRET@bucket/dir
        keys, _, bucket = parts.netloc.rpartition("@")
        key, _, secret = keys.partition(":")
        opts.update(aws_access_key_id=unquote(key), aws_secret_access_key=unquote(secret))
    else:
        bucket = parts.netloc
    if endpoint := q.get("endpoint_override"):
        if "://" not in endpoint:
            endpoint = f"{q.get('scheme', 'https')}://{endpoint}"
        opts["aws_endpoint_url"] = endpoint
        if endpoint.startswith("http://"):
            opts["aws_allow_http"] = "true"
    return urlunsplit(("s3", bucket, parts.path, "", "")).rstrip("/"), opts


def _scan(
    root: str, table: str, schema: pa.Schema, storage_options: dict[str, Any] | None, files: list[str] | None = None
) -> pl.LazyFrame:
    """A scan of `table`: its glob, or exactly `files` when some of its files had to be left out."""
    if files is not None and not files:
        return pl.LazyFrame(schema=polars_schema(schema))
    return pl.scan_parquet(
        files if files is not None else f"{root}/{table}/**/*.parquet",
        schema=polars_schema(schema, partitions=False),
        hive_partitioning=True,
        hive_schema=HIVE_SCHEMA,
        try_parse_hive_dates=False,
        missing_columns="insert",  # files from before a column was added
        extra_columns="ignore",  # files from a newer rayq, read by an older one
        hidden_file_prefix=HIDDEN_PREFIXES,
        storage_options=storage_options,
    )


_SQL_ERRORS: tuple[type[pl.exceptions.PolarsError], ...] = (
    pl.exceptions.SQLSyntaxError,
    pl.exceptions.SQLInterfaceError,
    pl.exceptions.InvalidOperationError,
    pl.exceptions.DuplicateError,
    pl.exceptions.StructFieldNotFoundError,
)


def _as_query_error(e: pl.exceptions.PolarsError) -> QueryError | None:
    """Polars' error as one line, or None when it is not the query's fault."""
    msg = _first_line(str(e))
    if isinstance(e, pl.exceptions.ColumnNotFoundError):
        m = re.match(r'unable to find column "(.*?)"(?:; valid columns: \[(.*)\])?', msg)
        if m is None:
            return QueryError(f"unknown column: {msg}")
        valid = (m.group(2) or "").replace('"', "")
        return QueryError(f"unknown column {m.group(1)!r}" + (f"; columns: {valid}" if valid else ""))
    if not isinstance(e, _SQL_ERRORS):
        return None
    if m := re.match(r"relation '(.*?)' was not found", msg):
        return QueryError(f"unknown table {m.group(1)!r}; tables: {', '.join(TABLES)}")
    if m := re.match(r"no column named '(.*?)' found in table '(.*?)'", msg):
        return QueryError(f"unknown column {m.group(1)!r} in table {m.group(2)!r}")
    return QueryError(f"bad SQL: {msg.removeprefix('sql parser error: ')}")


def _first_line(msg: str) -> str:
    return next((line.strip() for line in msg.splitlines() if line.strip()), msg.strip() or "unknown error")
