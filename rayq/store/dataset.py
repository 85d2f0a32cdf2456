"""The result store: a hive-partitioned Parquet dataset, the source of truth for what is done.

Layout: DIR/completions/model=M/precision=P/*.parquet. The partition columns live in the
path only (as pyarrow, Polars, DuckDB and Spark expect). DIR is a local directory or an
object-storage URI (s3://bucket/dir); rayq.store.storage says where the bytes go and how a file is
made to appear whole (renamed into place locally, a single PUT on object storage), so a
killed run never leaves a torn file. Compaction merges a partition's files and drops
duplicate `completion_id`s, which a retried Ray call can produce. Never imports torch.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import pyarrow as pa

from rayq.errors import EXIT_INCOMPLETE, ResultsDirError
from rayq.store.storage import Storage

# The public schema of the files (documented one line each in docs/schema.md). Add
# columns at the end; never rename, retype or drop one.
SCHEMA = pa.schema(
    [
        ("completion_id", pa.string()),
        ("sweep", pa.string()),
        ("prompt_id", pa.int32()),
        ("prompt", pa.string()),
        ("max_new_tokens", pa.int32()),
        ("temperature", pa.float64()),
        ("top_k", pa.int32()),
        ("top_p", pa.float64()),
        ("do_sample", pa.bool_()),
        ("repetition_penalty", pa.float64()),
        ("seed", pa.int64()),
        ("sampling_seed", pa.int64()),
        ("text", pa.string()),
        ("n_prompt_tokens", pa.int32()),
        ("n_new_tokens", pa.int32()),
        ("max_returned_tokens", pa.int32()),
        ("latency_s", pa.float64()),
        ("ttft_s", pa.float64()),
        ("tokens_per_s", pa.float64()),
        ("content_words", pa.int32()),
        ("duplicate_content_words", pa.int32()),
        ("peak_memory_mb", pa.float64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("node", pa.string()),
        ("device", pa.string()),
        ("batch_size", pa.int32()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("protocol", pa.string()),
        ("past_context", pa.bool_()),
        ("kv_cache", pa.string()),
        ("engine", pa.string()),
        ("shares_output_of", pa.string()),
    ]
)
# One row per model host and run: what loading the model in that precision measured.
MODELS_SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("run_id", pa.string()),
        ("node", pa.string()),
        ("device", pa.string()),
        ("protocol", pa.string()),
        ("batch_size", pa.int32()),
        ("torch_threads", pa.int32()),
        ("load_s", pa.float64()),
        ("load_status", pa.string()),
        ("load_error", pa.string()),
        ("n_params", pa.int64()),
        ("footprint_bytes", pa.int64()),
        ("peak_memory_mb", pa.float64()),
        ("settings_json", pa.string()),
        ("recorded_at", pa.timestamp("us", tz="UTC")),
        ("held_bytes", pa.int64()),
        ("reference_prompt", pa.string()),
        ("reference_tokens", pa.list_(pa.int32())),
        ("reference_text", pa.string()),
        ("quantize_s", pa.float64()),
        ("quantize_peak_mb", pa.float64()),
        ("measure_error", pa.string()),
        ("num_gpus", pa.float64()),
        ("gpu_ids", pa.string()),
        ("estimated_bytes", pa.int64()),
        ("generated_tokens", pa.int64()),
        ("generate_s", pa.float64()),
        ("context_length", pa.int64()),
        # the quantization scheme (rayq.catalog.schemes) and its measured fidelity (rayq.host.fidelity)
        ("weight_format", pa.string()),
        ("weight_bits", pa.float64()),
        ("act_bits", pa.int32()),
        ("kv_bits", pa.int32()),
        ("kv_cache", pa.string()),
        ("act_sqnr_db", pa.float64()),
        ("kv_sqnr_db", pa.float64()),
        ("fidelity_text", pa.string()),
        ("fidelity_tokens", pa.int64()),
        ("fidelity_baseline", pa.string()),
        ("ppl", pa.float64()),
        ("kl_div", pa.float64()),
        ("top1_agreement", pa.float64()),
        ("fidelity_error", pa.string()),
        ("engine", pa.string()),
    ]
)
# One row per quantized linear layer and run: its weight error against the unquantized weights.
LAYERS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("layer", pa.string()),
        ("kind", pa.string()),
        ("n_params", pa.int64()),
        ("sqnr_db", pa.float64()),
        ("quant_error", pa.float64()),
        ("recorded_at", pa.timestamp("us", tz="UTC")),
    ]
)
PARTITIONS = ("model", "precision")
STATUS_OK = "ok"
TABLES = ("completions", "models", "layers")  # the folders of DIR that hold Parquet data
QUARANTINE = "_quarantine"  # where `rayq run` moves unreadable files (hidden from every reader)


class DamagedFileWarning(UserWarning):
    """A results file could not be read and was left out; `rayq run` moves it to the quarantine."""


def warn_damaged(path: str, reason: str) -> None:
    warnings.warn(
        f"skipped unreadable file {path} ({reason}); `rayq run` moves it aside and runs its completions again",
        DamagedFileWarning,
        stacklevel=3,
    )


def damage_reason(e: BaseException) -> str:
    """The first line of a read error, without the file's name (the message names it already):
    what `rayq check`, the warning and the manifest say."""
    import re

    text = str(e).strip().splitlines()
    first = text[0].strip() if text else type(e).__name__
    return re.sub(r"^Could not open Parquet input source '[^']*': ", "", first)


# Errors that mean "this file's bytes are not a readable Parquet file"; a file deleted after it
# was listed (compaction) is not damage and is skipped silently.
_READ_ERRORS = (pa.ArrowException, OSError, ValueError)


def unreadable(storage: Storage, path: PurePath, full: bool = False) -> str | None:
    """Why the file at `path` cannot be read, or None: its footer is parsed (one small read,
    enough for a truncated or overwritten file), or with `full` every byte is read (a corrupt
    page behind an intact footer shows only then). A file gone since it was listed is not damage.
    """
    import pyarrow.parquet as pq

    try:
        if full:
            storage.read_table(path)
        else:
            with storage.fs.open_input_file(str(path)) as fh:
                pq.ParquetFile(fh).metadata  # noqa: B018 - parsing the footer is the check
    except FileNotFoundError:
        return None
    except _READ_ERRORS as e:
        return damage_reason(e)
    return None


def split_ok(table: pa.Table) -> tuple[set[str], set[str]]:
    """(every id, the ids with an ok row) of a table with `completion_id` and `status`."""
    ids = table["completion_id"].to_pylist()
    statuses = table["status"].to_pylist()
    return set(ids), {cid for cid, status in zip(ids, statuses, strict=True) if status == STATUS_OK}


@dataclass(frozen=True)
class Damaged:
    """An unreadable data file: where it is (relative to DIR) and why it cannot be read."""

    path: str
    reason: str


def completion_row(sweep: str, c: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A row of the completions table for planned completion `c` (`plan.Completion.to_dict()`):
    what the plan says about it, every other column null unless given in `fields`."""
    row: dict[str, Any] = dict.fromkeys(SCHEMA.names)
    row.update(
        completion_id=c["completion_id"],
        sweep=sweep,
        prompt_id=c["prompt_id"],
        prompt=c["prompt"],
        **c["params"],
        seed=c["seed"],
        sampling_seed=c["sampling_seed"],
    )
    return row | fields


class StaleWriterError(ResultsDirError):
    """A writer from an earlier (killed) run tried to commit after a new run took over.

    A RuntimeError, as it always was. Its run stops with what it wrote kept: exit status 3.
    """

    exit_status = EXIT_INCOMPLETE


@dataclass(frozen=True)
class Fence:
    """The run that owns the dataset; writes from any other run are refused."""

    run_id: str


class Store:
    """The dataset at `root`: a local directory, or a URI (any string containing `://`).

    `root` is a `Path` for a local store and the URI itself (a str) on object storage, so
    code that builds local paths from it fails there instead of writing to a local folder
    named after the bucket; `location` is a string that names the store either way.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.storage = Storage.at(root)
        self.root: Path | str = Path(self.storage.root) if self.storage.is_local else self.storage.location
        self.location = self.storage.location
        self.completions = self.storage.path("completions")
        self._tmp = self.storage.tmp_dir
        self.lock_path = self.storage.path("run.lock")
        self.damaged: dict[PurePath, str] = {}  # files found unreadable by this Store's reads

    @property
    def display(self) -> str:
        """The location for messages (keys given in a URI left out)."""
        return self.storage.display

    @property
    def tune_dir(self) -> str:
        """Where Ray Tune keeps its own bookkeeping (never read back, see docs/resume.md).

        DIR/_tune locally; on object storage a local scratch folder, so Tune's frequent
        state snapshots cost no requests.
        """
        if self.storage.is_local:
            return str(self.storage.path("_tune"))
        import tempfile

        return os.path.join(tempfile.gettempdir(), "rayq-tune")

    def exists(self) -> bool:
        """Whether anything is there (a local directory; on object storage, any object under the prefix)."""
        return self.storage.exists()

    # -- layout -------------------------------------------------------------------
    def partition_dir(self, model: str, precision: str) -> PurePath:
        return self.completions / f"model={model}" / f"precision={precision}"

    def files(self, model: str | None = None, precision: str | None = None) -> list[PurePath]:
        """The committed files, sorted: `Path`s locally, `bucket/key` PurePosixPaths on object storage."""
        folder = self.completions
        if model is not None:
            folder = folder / f"model={model}"
            if precision is not None:
                folder = folder / f"precision={precision}"
        out = []
        for f in self.storage.list_parquet(folder):
            rel = f.relative_to(self.completions).parts
            if len(rel) != 3 or not rel[0].startswith("model=") or not rel[1].startswith("precision="):
                continue
            m, p = _partition_of(f)
            if (model is None or m == model) and (precision is None or p == precision):
                out.append(f)
        return out

    def partitions(self) -> list[tuple[str, str]]:
        return sorted({_partition_of(f) for f in self.files()})

    # -- ownership ----------------------------------------------------------------
    def read_lock(self) -> dict[str, Any] | None:
        try:
            data = self.storage.read_bytes(self.lock_path)
            return json.loads(data) if data is not None else None
        except (OSError, ValueError):
            return None

    def take_ownership(self, force: bool = False) -> Fence:
        """Claim the dataset for a new run; refuse if a live run on this host still holds it.

        The check is the host name and pid in `run.lock`, the same on object storage: a
        live run on another host is not detected (it is fenced out at its next commit).
        """
        held = self.read_lock()
        if held and not force and held.get("host") == socket.gethostname() and _pid_alive(held.get("pid", -1)):
            raise ResultsDirError(
                f"{self.display} is being written by another rayq run (pid {held['pid']}); "
                "wait for it, or pass --force if it is gone"
            )
        fence = Fence(uuid.uuid4().hex)
        self.storage.clear_tmp()  # leftovers of a killed run; its writers are fenced out below
        self.storage.write_bytes(
            self.lock_path,
            json.dumps({"run_id": fence.run_id, "host": socket.gethostname(), "pid": os.getpid()}).encode(),
        )
        return fence

    def release(self, fence: Fence) -> None:
        held = self.read_lock()
        if held and held.get("run_id") == fence.run_id:
            self.storage.delete(self.lock_path)

    def _check_fence(self, fence: Fence | None) -> None:
        if fence is None:
            return
        held = self.read_lock()
        if not held or held.get("run_id") != fence.run_id:
            raise StaleWriterError(f"run {fence.run_id} no longer owns {self.display}; its write is dropped")

    # -- writing ------------------------------------------------------------------
    def write(self, model: str, precision: str, rows: list[dict[str, Any]], fence: Fence | None = None) -> PurePath:
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        return self._commit_table(table, self.partition_dir(model, precision), fence)

    def _commit_table(self, table: pa.Table, part_dir: PurePath, fence: Fence | None) -> PurePath:
        """Write `table` as a new file in `part_dir` if `fence` still owns the store, checked just before it appears."""
        final = part_dir / f"part-{uuid.uuid4().hex}.parquet"
        self.storage.write_table(table, final, check=lambda: self._check_fence(fence))
        return final

    def write_model_info(self, sweep: str, info: dict[str, Any], fence: Fence | None = None) -> PurePath:
        """Append a host's measurements to DIR/models/model=M/precision=P/."""
        from datetime import UTC, datetime

        row = {name: info.get(name) for name in MODELS_SCHEMA.names}
        row.update(
            sweep=sweep,
            run_id=fence.run_id if fence else None,
            settings_json=json.dumps(info.get("settings") or {}, sort_keys=True, default=str),
            recorded_at=datetime.now(UTC),
        )
        table = pa.Table.from_pylist([row], schema=MODELS_SCHEMA)
        where = (f"model={info['model']}", f"precision={info['precision']}")
        if info.get("layers"):
            layers = [
                {
                    **{k: layer.get(k) for k in LAYERS_SCHEMA.names},
                    "run_id": row["run_id"],
                    "recorded_at": row["recorded_at"],
                }
                for layer in info["layers"]
            ]
            layers_table = pa.Table.from_pylist(layers, schema=LAYERS_SCHEMA)
            self._commit_table(layers_table, self.storage.path("layers", *where), fence)
        return self._commit_table(table, self.storage.path("models", *where), fence)

    # -- reading ------------------------------------------------------------------
    def read(self, columns: Iterable[str] | None = None) -> pa.Table:
        """All rows with the partition columns, as one Arrow table (empty if none)."""
        cols = list(columns) if columns is not None else None
        tables = []
        for f in self.files():
            t = self._read_or_skip(f, [c for c in cols if c not in PARTITIONS] if cols else None)
            if t is None:
                continue
            model, precision = _partition_of(f)
            t = t.append_column("model", pa.array([model] * t.num_rows, pa.string()))
            t = t.append_column("precision", pa.array([precision] * t.num_rows, pa.string()))
            tables.append(t)
        if not tables:
            fields = [SCHEMA.field(c) for c in (cols or SCHEMA.names) if c not in PARTITIONS]
            empty = pa.schema(fields).empty_table()
            for p in PARTITIONS:  # always there, as in a table read from files
                empty = empty.append_column(p, pa.array([], pa.string()))
            return empty
        return pa.concat_tables(tables)

    def partition_ids(self, model: str, precision: str) -> set[str]:
        """Ids in one partition, whatever their status (a cheap check of one host's work)."""
        ids: set[str] = set()
        for f in self.files(model, precision):
            t = self._read_or_skip(f, ["completion_id"])
            if t is not None:
                ids.update(t["completion_id"].to_pylist())
        return ids

    def _read_or_skip(self, path: PurePath, columns: list[str] | None = None) -> pa.Table | None:
        """The file as the current schema, or None when it is gone or unreadable.

        One damaged file (truncated by a full disk, a bad copy, a sync tool) must not make
        the whole dataset unreadable: it is left out, named in a DamagedFileWarning and
        remembered in `self.damaged`, so `rayq run` can move it aside and redo its rows.
        """
        if path in self.damaged:
            return None
        try:
            return _read_conformed(self.storage, path, columns)
        except FileNotFoundError:  # compacted away after it was listed
            return None
        except _READ_ERRORS as e:
            self.damaged[path] = damage_reason(e)
            warn_damaged(self.relative(path), self.damaged[path])
            return None

    def relative(self, path: PurePath) -> str:
        """`path` relative to DIR, as messages and the manifest name it."""
        return path.relative_to(self.storage.root).as_posix()

    def data_files(self, tables: Iterable[str] = TABLES) -> list[PurePath]:
        """Every Parquet file of `tables` (by default all three: completions, models, layers)."""
        out: list[PurePath] = []
        for table in tables:
            out.extend(self.storage.list_parquet(self.storage.path(table)))
        return out

    def verify(self, full: bool = False, tables: Iterable[str] = TABLES) -> list[Damaged]:
        """The files of `tables` that cannot be read (see `unreadable`: footers, or with `full`
        every byte); they are added to `self.damaged`, so this Store's reads skip them."""
        bad = []
        for f in self.data_files(tables):
            reason = unreadable(self.storage, f, full)
            if reason is not None:
                bad.append(Damaged(self.relative(f), reason))
                self.damaged.setdefault(f, reason)
        return bad

    def quarantine(self, relpaths: Iterable[str], run_id: str) -> list[dict[str, str]]:
        """Move unreadable files to DIR/_quarantine/RUN_ID/ (same relative path); returns what moved where.

        Moved, never deleted: the bytes may still be worth recovering by hand. The folder's
        name starts with `_`, so no reader (rayq, Polars, DuckDB, Spark) ever sees it.
        """
        moved = []
        for rel in relpaths:
            src = self.storage.path(rel)
            dst = self.storage.path(QUARANTINE, run_id, rel)
            if self.storage.is_local:
                Path(dst).parent.mkdir(parents=True, exist_ok=True)
            try:
                self.storage.fs.move(str(src), str(dst))
            except FileNotFoundError:
                continue
            moved.append({"file": rel, "moved_to": self.relative(dst)})
        return moved

    def finished_ids(self, retry_failed: bool = False) -> set[str]:
        """Ids already on disk; with `retry_failed`, only those that finished with status ok.

        What counts as done, for every caller, is rayq.store.done's rule over these ids."""
        every, ok = split_ok(self.read(["completion_id", "status"]))
        return ok if retry_failed else every

    def status_counts(self) -> dict[tuple[str, str], Counter[str]]:
        t = self.read(["completion_id", "status"])
        out: dict[tuple[str, str], Counter[str]] = {}
        seen: dict[tuple[str, str], dict[str, str]] = {}
        for cid, status, model, precision in zip(
            t["completion_id"].to_pylist(),
            t["status"].to_pylist(),
            t["model"].to_pylist(),
            t["precision"].to_pylist(),
            strict=True,
        ):
            best = seen.setdefault((model, precision), {})
            if best.get(cid) != STATUS_OK:
                best[cid] = status
        for key, ids in seen.items():
            out[key] = Counter(ids.values())
        return out

    # -- compaction ---------------------------------------------------------------
    def compact(self, model: str, precision: str, fence: Fence | None = None) -> int:
        """Merge a partition into one file, one row per completion_id; returns rows kept.

        The merged file is committed before the old files are removed, so a crash in
        between leaves duplicates (which the next compaction removes) but never a loss.
        A row with status ok wins over a failed one; otherwise the latest wins.
        """
        read = [(f, self._read_or_skip(f)) for f in self.files(model, precision)]
        files = [f for f, t in read if t is not None]  # an unreadable file is never deleted here
        if not files:
            return 0
        table = pa.concat_tables([t for _, t in read if t is not None])
        n_before = table.num_rows
        table = _dedupe(table)
        if len(files) == 1 and table.num_rows == n_before:
            return n_before
        self._commit_table(table, self.partition_dir(model, precision), fence)
        self.storage.delete(*files)
        return table.num_rows


def _partition_of(path: PurePath) -> tuple[str, str]:
    """(model, precision) of a file at completions/model=M/precision=P/part.parquet."""
    return path.parent.parent.name.split("=", 1)[1], path.parent.name.split("=", 1)[1]


def _read_conformed(storage: Storage, path: PurePath, columns: list[str] | None = None) -> pa.Table:
    """Read a file as the current schema: columns added since it was written come back null."""
    present = set(storage.read_schema(path).names)
    wanted = columns if columns is not None else SCHEMA.names
    t = storage.read_table(path, columns=[c for c in wanted if c in present])
    for name in wanted:
        if name not in present:
            t = t.append_column(SCHEMA.field(name), pa.nulls(t.num_rows, SCHEMA.field(name).type))
    return t.select(wanted).cast(pa.schema([SCHEMA.field(c) for c in wanted]))


def _dedupe(table: pa.Table) -> pa.Table:
    import polars as pl

    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    df = (
        df.with_columns((pl.col("status") == STATUS_OK).alias("_ok"))
        .sort(["completion_id", "_ok", "finished_at"], nulls_last=False)
        .unique(subset="completion_id", keep="last", maintain_order=True)
        .drop("_ok")
        .sort(["prompt_id", "completion_id"])
    )
    return df.to_arrow().cast(SCHEMA)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
