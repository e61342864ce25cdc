"""Atomic file writes and shard reads: a half-written file is never seen under its final name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which is not thread-safe to repeat.
_FILE_MODE = 0o666 & ~_umask()


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes 0600 files; a finished output gets the mode the user's umask gives.
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return Path(tmp)


def _commit(tmp: Path, path: Path) -> None:
    # fsync before rename so a crash after the rename cannot leave an empty file behind.
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path, row_group_rows: int | None = None) -> None:
    """Write a Parquet file to a temp name beside ``path``, then rename it into place.

    ``row_group_rows``: rows per row group (small groups make one row cheap to read back;
    None: pyarrow's default, one group for any shard this project writes)."""
    tmp = _temp_beside(path)
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    tmp = _temp_beside(path)
    try:
        tmp.write_bytes(data)
        _commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(obj: object, path: Path) -> None:
    write_bytes_atomic(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS), path)


def file_hash(path: Path) -> str:
    """xxh3-64 of a file's bytes (a finished output's identity for the stages that read it)."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


SMALL_FILE_BYTES = 64 << 20


def path_identity(path: str | os.PathLike[str]) -> str:
    """Identity of a model or tokenizer folder by its files, not its name: small files
    (configs, vocabularies) by content, large ones (weights) by size and mtime. Replacing a
    tokenizer in place at the same path changes it; so does retraining a judge."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    h = xxhash.xxh3_64(str(root.resolve()).encode())
    for f in files:
        if any(part.startswith(".") for part in f.relative_to(root).parts if root.is_dir()):
            continue
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0".encode())
        h.update(
            file_hash(f).encode()
            if st.st_size <= SMALL_FILE_BYTES
            else str(st.st_mtime_ns).encode()
        )
    return h.hexdigest()


def read_json(path: Path) -> object:
    return orjson.loads(Path(path).read_bytes())


def read_parquet_files(paths: Iterable[Path], schema: pa.Schema | None = None) -> pa.Table:
    """Concatenate Parquet files in order; no files gives ``schema``'s empty table."""
    tables = [pq.read_table(p) for p in paths]
    if not tables:
        if schema is None:
            raise ValueError("no files to read and no schema for an empty table")
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")
