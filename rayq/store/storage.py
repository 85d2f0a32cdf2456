"""Where the result bytes live: a local directory or a prefix on object storage, one interface.

A `Storage` is a pyarrow FileSystem and a root in it, made from a local path or a URI that
`pyarrow.fs.FileSystem.from_uri` understands, e.g.
`s3://bucket/dir?endpoint_override=http://127.0.0.1:9000&scheme=http&region=us-east-1`
(keys come from the usual AWS_* variables). Paths go in and out as PurePaths: a `Path` for a
local directory, so callers can still open one; a `PurePosixPath` of `bucket/dir/...` on
object storage.

Writes are atomic either way, by different means. Locally a file is written to DIR/_tmp/,
flushed and fsynced, renamed into place (os.replace) and its folder fsynced: a reader, or a
crash, sees all of it or none. On object storage a PUT is atomic already (an object appears
whole or not at all; a multipart upload only when it completes), so the bytes go straight to
their final key, serialised in memory first so the upload starts only once all of it is
there; there is no rename and no fsync. Callers name every file uniquely, so two writers
never replace each other's file.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Spark's `_SUCCESS`, rayq's `_tmp/`, editors' and rsync's dot files: never data.
HIDDEN_PREFIXES = ("_", ".")
COMPRESSION = "zstd"


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether `location` names a filesystem by URI (s3://, gs://, file://, ...) rather than a local path."""
    return "://" in os.fspath(location)


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether `location` is on object storage (a URI other than file://)."""
    return is_uri(location) and not os.fspath(location).startswith("file://")


def normalize(location: str | os.PathLike[str]) -> str:
    """A URI as given; a local path made absolute, symlinks resolved."""
    s = os.fspath(location)
    return s if is_uri(s) else str(Path(s).resolve())


@dataclass(frozen=True)
class Storage:
    fs: pafs.FileSystem
    root: PurePath  # a Path for a local directory, PurePosixPath("bucket/dir") on object storage
    location: str  # the URI as given, or the absolute local path

    @classmethod
    def at(cls, location: str | os.PathLike[str]) -> Storage:
        s = os.fspath(location)
        if not is_uri(s):
            return cls(pafs.LocalFileSystem(), Path(s), str(Path(s).absolute()))
        fs, base = pafs.FileSystem.from_uri(s)
        if isinstance(fs, pafs.LocalFileSystem):  # file:///dir
            return cls(fs, Path(base), base)
        return cls(fs, PurePosixPath(base.rstrip("/")), s)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def display(self) -> str:
        """The location for messages: keys given in the URI (s3://KEY:SECRET@bucket/dir) left out."""
        if not is_uri(self.location):
            return self.location
        parts = urlsplit(self.location)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))

    @property
    def tmp_dir(self) -> PurePath:
        """Where local writes are staged before their rename; unused on object storage."""
        return self.path("_tmp")

    def path(self, *parts: str) -> PurePath:
        return self.root.joinpath(*parts)

    def exists(self) -> bool:
        """Whether the root holds anything (locally: is a directory)."""
        return self.fs.get_file_info(str(self.root)).type == pafs.FileType.Directory

    # -- reading ------------------------------------------------------------------
    def list_parquet(self, folder: PurePath) -> list[PurePath]:
        """The `*.parquet` files under `folder`, at any depth, sorted; none under a hidden name."""
        base = str(folder)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        out = []
        for info in infos:
            if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
                continue
            rel = PurePosixPath(info.path[len(base) :].lstrip("/"))
            if not any(part.startswith(HIDDEN_PREFIXES) for part in rel.parts):
                out.append(self._as_path(info.path))
        return sorted(out)

    def read_schema(self, path: PurePath) -> pa.Schema:
        return pq.read_schema(str(path), filesystem=self.fs)

    def read_table(self, path: PurePath, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(str(path), columns=columns, filesystem=self.fs)

    def read_bytes(self, path: PurePath) -> bytes | None:
        """The file's bytes, or None if there is no such file."""
        try:
            with self.fs.open_input_stream(str(path)) as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    # -- writing ------------------------------------------------------------------
    def write_table(self, table: pa.Table, path: PurePath, check: Callable[[], None] | None = None) -> None:
        """Write `table` as Parquet at `path`, atomically; `check` runs just before it becomes visible.

        If `check` raises, nothing is left behind and the error propagates.
        """
        if self.is_local:
            self._commit_local(path, lambda fh: pq.write_table(table, fh, compression=COMPRESSION), check)
            return
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression=COMPRESSION)
        self._put(path, buf.getvalue(), check)

    def write_bytes(self, path: PurePath, data: bytes, check: Callable[[], None] | None = None) -> None:
        """Write `data` at `path`, atomically (as `write_table`)."""
        if self.is_local:
            self._commit_local(path, lambda fh: fh.write(data), check)
        else:
            self._put(path, data, check)

    def delete(self, *paths: PurePath) -> None:
        """Remove files; a missing one is no error. Locally their folders are fsynced after."""
        for p in paths:
            try:
                self.fs.delete_file(str(p))
            except FileNotFoundError:
                pass
        if self.is_local:
            for folder in {Path(p).parent for p in paths}:
                if folder.is_dir():
                    _fsync_dir(folder)

    def clear_tmp(self) -> None:
        """Remove what killed local writers left in DIR/_tmp/ (object storage stages nothing)."""
        tmp = Path(self.tmp_dir)
        if self.is_local and tmp.is_dir():
            for leftover in tmp.iterdir():
                leftover.unlink(missing_ok=True)

    def _commit_local(
        self, path: PurePath, fill: Callable[[BinaryIO], object], check: Callable[[], None] | None
    ) -> None:
        final = Path(path)
        tmp_dir = Path(self.tmp_dir)
        tmp_dir.mkdir(parents=True, exist_ok=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_dir / f".{final.name}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            if check is not None:
                check()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        _fsync_dir(final.parent)

    def _put(self, path: PurePath, data: bytes | pa.Buffer, check: Callable[[], None] | None) -> None:
        if check is not None:
            check()
        with self.fs.open_output_stream(str(path)) as out:
            out.write(data)

    def _as_path(self, s: str) -> PurePath:
        return Path(s) if self.is_local else PurePosixPath(s)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
