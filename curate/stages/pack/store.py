"""The tokens store: each sample's training ids kept once, compact, read back by row.

``tokens/`` holds every tokenised sample once. Its ids are stored without the image context
runs: a run of ``<IMG_CONTEXT>`` tokens (256 per tile, so 3,328 for one 13-tile image) becomes
its position and length (``context_at``, ``context_len``), and :func:`expand` puts it back. The
expanded ids are exactly what the template tokeniser gave; the compact ones are what is stored
and read, a fraction of the size on image data.

The pack manifest refers to samples by (tokens shard, row); :class:`TokenStore` reads one row
without decoding its shard (the tokenize stage writes small row groups, each group's first row
is known from the file footer) and keeps the last few groups it decoded.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.core.chat import IGNORE_INDEX

TOKENS_ROW_GROUP_ROWS = 128  # one row read back decodes at most 128 samples' compact ids
STORE_COLUMNS = ("sample_id", "input_ids", "labels", "context_at", "context_len", "images")


def compact(
    ids: list[int], labels: list[int], context_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, context_at, context_len): runs of ``context_id`` cut out of the sample.

    Only runs whose labels are all ignored are cut (an image in a user turn; a context token
    the model is trained to predict stays inline), so :func:`expand` restores labels exactly.
    ``context_at[k]`` is where run k goes back in the compact ids.
    """
    ids_a = np.asarray(ids, dtype=np.int32)
    labels_a = np.asarray(labels, dtype=np.int32)
    is_context = (ids_a == context_id) & (labels_a == IGNORE_INDEX)
    if not is_context.any():
        empty = np.zeros(0, dtype=np.int32)
        return ids_a, labels_a, empty, empty
    edges = np.diff(np.concatenate([[0], is_context.astype(np.int8), [0]]))
    starts = np.flatnonzero(edges == 1)
    lengths = np.flatnonzero(edges == -1) - starts
    before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    keep = ~is_context
    return (
        ids_a[keep],
        labels_a[keep],
        (starts - before).astype(np.int32),
        lengths.astype(np.int32),
    )


def expand(
    ids: np.ndarray,
    labels: np.ndarray,
    context_at: np.ndarray,
    context_len: np.ndarray,
    context_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The sample's full ids and labels: each context run put back where it was cut."""
    if len(context_at) == 0:
        return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    at = np.repeat(np.asarray(context_at, dtype=np.int64), context_len)
    return (
        np.insert(np.asarray(ids, dtype=np.int64), at, context_id),
        np.insert(np.asarray(labels, dtype=np.int64), at, IGNORE_INDEX),
    )


def images_before(ids: np.ndarray, n_tokens: int, img_end_id: int) -> int:
    """Images whole inside the first ``n_tokens`` ids (a truncated sample keeps those)."""
    return int(np.count_nonzero(ids[:n_tokens] == img_end_id))


class TokenStore:
    """Random access to rows of ``tokens/`` shards by (shard name, row)."""

    def __init__(self, folder: str | Path, cached_row_groups: int = 16) -> None:
        self.folder = Path(folder)
        self.cached_row_groups = cached_row_groups
        self._files: dict[str, tuple[pq.ParquetFile, np.ndarray]] = {}
        self._groups: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()

    def __getstate__(self) -> dict:  # DataLoader workers open their own files
        return {"folder": self.folder, "cached_row_groups": self.cached_row_groups}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"], state["cached_row_groups"])

    def _file(self, shard: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if shard not in self._files:
            path = self.folder / f"{shard}.parquet"
            if not path.exists():
                raise FileNotFoundError(f"{path}: tokens shard missing (rerun `curate pack`)")
            f = pq.ParquetFile(path)
            rows = [f.metadata.row_group(g).num_rows for g in range(f.metadata.num_row_groups)]
            self._files[shard] = (f, np.cumsum([0, *rows]))
        return self._files[shard]

    def row(self, shard: str, row: int) -> dict:
        """One sample's stored row: sample_id, compact ids and labels (numpy), context runs,
        images."""
        f, starts = self._file(shard)
        group = int(np.searchsorted(starts, row, side="right")) - 1
        if not 0 <= row < starts[-1]:
            raise IndexError(f"tokens shard {shard} has {starts[-1]} rows, not row {row}")
        key = (shard, group)
        table = self._groups.get(key)
        if table is None:
            table = f.read_row_group(group, columns=list(STORE_COLUMNS))
            self._groups[key] = table
            if len(self._groups) > self.cached_row_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(key)
        i = row - int(starts[group])
        return {
            "sample_id": table.column("sample_id")[i].as_py(),
            **{
                c: table.column(c)[i].values.to_numpy(zero_copy_only=False)
                for c in ("input_ids", "labels", "context_at", "context_len")
            },
            "images": table.column("images")[i].as_py(),
        }


def resolve_pack(
    store: TokenStore, pack: dict, context_id: int
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A reference-manifest row's concatenated ids and labels and its images (each with its
    ``sample_index`` in the pack): every sample read from the store, its context runs put back,
    cut at its packed length (a truncated sample keeps its first ``image_counts[k]`` images).
    """
    refs = zip(
        pack["sample_ids"],
        pack["token_shards"],
        pack["token_rows"],
        pack["seq_lens"],
        pack["image_counts"],
        strict=True,
    )
    ids, labels, images = [], [], []
    for k, (sample_id, shard, row, n_tokens, n_images) in enumerate(refs):
        stored = store.row(shard, row)
        if stored["sample_id"] != sample_id:
            raise ValueError(
                f"pack {pack['pack_id']}: tokens/{shard} row {row} holds "
                f"{stored['sample_id']}, the manifest says {sample_id}: the tokens changed "
                "since packing; rerun `curate pack`"
            )
        full_ids, full_labels = expand(
            stored["input_ids"],
            stored["labels"],
            stored["context_at"],
            stored["context_len"],
            context_id,
        )
        if n_tokens > len(full_ids):
            raise ValueError(
                f"pack {pack['pack_id']}: {sample_id} packed at {n_tokens} tokens, "
                f"its tokens row has {len(full_ids)}"
            )
        ids.append(full_ids[:n_tokens])
        labels.append(full_labels[:n_tokens])
        images += [{**im, "sample_index": k} for im in stored["images"][:n_images]]
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    return np.concatenate(ids), np.concatenate(labels), images
