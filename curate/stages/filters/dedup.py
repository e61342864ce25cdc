"""Exact duplicate samples within and across datasets, found with one global pass.

A sample's content hash is xxh3-64 of its normalised conversation (roles, and texts with runs
of whitespace collapsed) and its image paths. Every shard's (sample id, dataset, line, hash)
rows are small, so the whole run's table fits in memory: sorted by (dataset order, line), the
first sample of each hash is kept and the later ones are duplicates of it.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import xxhash

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from curate.core.stage import GlobalInput, GlobalOutput, GlobalStage

_COLUMNS = ["sample_id", "dataset", "line", "conversations", "images", "video"]


@dataclass(frozen=True, slots=True)
class FirstCopy:
    """The sample a duplicate repeats."""

    sample_id: str
    dataset: str
    line: int


def normalised_content(conversations: list[dict], images: list[dict], video: str | None) -> bytes:
    turns = "\x1e".join(f"{t['role']}\x1f{' '.join(t['text'].split())}" for t in conversations)
    paths = "\x1e".join(im["path"] for im in images)
    return f"{turns}\x1d{paths}\x1d{video or ''}".encode("utf-8", "surrogatepass")


def content_hashes(table: pa.Table) -> np.ndarray:
    """xxh3-64 of every sample's normalised content (uint64)."""
    convs = table.column("conversations").to_pylist()
    images = table.column("images").to_pylist()
    videos = table.column("video").to_pylist()
    return np.fromiter(
        (
            xxhash.xxh3_64_intdigest(normalised_content(c, i or [], v))
            for c, i, v in zip(convs, images, videos, strict=True)
        ),
        dtype=np.uint64,
        count=len(convs),
    )


def _shard_hashes(run_path: str, shard: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    table = RunFolder(run_path).read("samples", [shard], columns=_COLUMNS)
    return (
        table.column("sample_id").to_pylist(),
        table.column("dataset").to_pylist(),
        table.column("line").to_numpy(),
        content_hashes(table),
    )


def find_duplicates(
    run: RunFolder, shards: list[str], dataset_order: list[str], workers: int = 1
) -> dict[str, FirstCopy]:
    """Map every duplicate sample id to the first sample with the same content.

    "First" is by dataset order (as in the meta file), then line; datasets not in
    ``dataset_order`` come after, by name.
    """
    if workers > 1 and len(shards) > 1:
        # forkserver: a forked child of a process whose polars/tokenizers threads hold a
        # lock can hang on it.
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            parts = list(pool.map(_shard_hashes, [str(run.path)] * len(shards), shards))
    else:
        parts = [_shard_hashes(str(run.path), s) for s in shards]
    ids = [x for p in parts for x in p[0]]
    datasets = [x for p in parts for x in p[1]]
    if not ids:
        return {}
    lines = np.concatenate([p[2] for p in parts]).astype(np.int64)
    hashes = np.concatenate([p[3] for p in parts])
    known = {name: i for i, name in enumerate(dataset_order)}
    extra = sorted(set(datasets) - set(known))
    known.update({name: len(dataset_order) + i for i, name in enumerate(extra)})
    rank = np.fromiter((known[d] for d in datasets), dtype=np.int64, count=len(datasets))
    order = np.lexsort((lines, rank, hashes))  # by hash, then dataset order, then line
    h = hashes[order]
    first_of_run = np.concatenate(([True], h[1:] != h[:-1]))
    first_idx = order[np.flatnonzero(first_of_run)][np.cumsum(first_of_run) - 1]
    dups = np.flatnonzero(~first_of_run)
    return {
        ids[order[i]]: FirstCopy(ids[j], datasets[j], int(lines[j]))
        for i, j in zip(dups, first_idx[dups], strict=True)
    }


DUPLICATES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("first_id", pa.string()),
        ("first_dataset", pa.string()),
        ("first_line", pa.int64()),
    ]
)


def duplicates_table(ids: list[str], duplicates: dict[str, FirstCopy]) -> pa.Table:
    """The duplicates among ``ids`` (one shard's samples), with the copy each repeats."""
    found = [(i, duplicates[i]) for i in ids if i in duplicates]
    return pa.table(
        {
            "sample_id": [i for i, _ in found],
            "first_id": [f.sample_id for _, f in found],
            "first_dataset": [f.dataset for _, f in found],
            "first_line": [f.line for _, f in found],
        },
        schema=DUPLICATES_SCHEMA,
    )


def read_duplicates(table: pa.Table) -> dict[str, FirstCopy]:
    return {
        r["sample_id"]: FirstCopy(r["first_id"], r["first_dataset"], r["first_line"])
        for r in table.to_pylist()
    }


class DuplicatesStage(GlobalStage):
    """Exact duplicates across every shard and dataset: ``duplicates/<shard>.parquet`` (one
    file per samples shard, so a filter shard is redone only when its own duplicates change)."""

    name = "duplicates"
    reads = ("ingest",)
    outputs = ("duplicates",)

    def settings(self) -> dict:
        return {"content": "conversation + image paths, whitespace-normalised"}

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        return {"dataset_order": ",".join(dataset_order(run))}

    def run(self, inp: GlobalInput) -> GlobalOutput:
        shards = inp.run.shards("samples")
        order = dataset_order(inp.run)  # meta-file order: the first copy is kept
        duplicates = find_duplicates(inp.run, shards, order, self.config.workers or 1)
        for shard in shards:
            ids = inp.run.read("samples", [shard], columns=["sample_id"])["sample_id"].to_pylist()
            write_parquet_atomic(
                duplicates_table(ids, duplicates), inp.out / "duplicates" / f"{shard}.parquet"
            )
        return GlobalOutput(report={"exact_duplicates": len(duplicates)})


def dataset_order(run: RunFolder) -> list[str]:
    """Datasets in meta-file order, as ingest recorded it."""
    return run.info().get("dataset_order") or sorted(run.datasets())
