"""The compact tokens store: context runs cut and put back exactly, single rows read back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curate.core.chat import IGNORE_INDEX
from curate.core.io import write_parquet_atomic
from curate.stages.pack.store import TokenStore, compact, expand, resolve_pack
from curate.stages.pack.tokenize import TOKENS_SCHEMA

CTX = 9

# A sample as pieces: ("text", n) trained or not, ("image", n context tokens), ("ctx", n): a
# context run the model is trained on (stays inline).
PIECES = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.integers(1, 5), st.booleans()),
        st.tuples(st.just("image"), st.integers(1, 40), st.just(False)),
        st.tuples(st.just("ctx"), st.integers(1, 3), st.just(True)),
    ),
    max_size=12,
)


def _build(pieces) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for kind, n, trained in pieces:
        if kind == "text":
            chunk = [1 + (len(ids) + i) % 7 for i in range(n)]
            ids += chunk
            labels += chunk if trained else [IGNORE_INDEX] * n
        else:
            ids += [CTX] * n
            labels += [CTX] * n if trained else [IGNORE_INDEX] * n
    return ids, labels


@settings(max_examples=200, deadline=None)
@given(PIECES)
def test_compact_then_expand_is_the_identity(pieces):
    ids, labels = _build(pieces)
    c_ids, c_labels, at, length = compact(ids, labels, CTX)
    untrained_context = sum(n for kind, n, _ in pieces if kind == "image")
    assert len(c_ids) == len(ids) - untrained_context == len(c_labels)
    assert int(length.sum()) == untrained_context
    full_ids, full_labels = expand(c_ids, c_labels, at, length, CTX)
    assert full_ids.tolist() == ids and full_labels.tolist() == labels


def _row(sample_id: str, n_images: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    images = []
    for k in range(n_images):
        ids += [5, 6] + [CTX] * 256 + [7]
        labels += [IGNORE_INDEX] * 259
        images.append(
            {
                "path": f"{sample_id}-{k}.jpg",
                "cols": 1,
                "rows": 1,
                "thumbnail": False,
                "data_augment": False,
            }
        )
    answer = rng.integers(10, 50, size=int(rng.integers(1, 20))).tolist()
    ids += answer
    labels += answer
    c_ids, c_labels, at, length = compact(ids, labels, CTX)
    return {
        "sample_id": sample_id,
        "dataset": "d",
        "line": seed,
        "input_ids": c_ids,
        "labels": c_labels,
        "context_at": at,
        "context_len": length,
        "n_tokens": len(ids),
        "n_supervised": len(answer),
        "tiles": n_images,
        "images": images,
        "_full": (ids, labels),
    }


@pytest.fixture
def store(tmp_path):
    rows = {shard: [_row(f"{shard}-{i}", i % 3, i) for i in range(300)] for shard in ("a", "b")}
    for shard, rs in rows.items():
        table = pa.Table.from_pylist(
            [{k: v for k, v in r.items() if k != "_full"} for r in rs], schema=TOKENS_SCHEMA
        )
        write_parquet_atomic(table, tmp_path / f"{shard}.parquet", row_group_rows=128)
    return TokenStore(tmp_path, cached_row_groups=2), rows


def test_rows_come_back_from_any_row_group(store):
    st_, rows = store
    import pyarrow.parquet as pq

    assert pq.ParquetFile(st_.folder / "a.parquet").metadata.num_row_groups == 3
    for shard, i in [("a", 0), ("b", 299), ("a", 128), ("a", 127), ("b", 5), ("a", 257)]:
        got = st_.row(shard, i)
        want = rows[shard][i]
        assert got["sample_id"] == want["sample_id"]
        full = expand(got["input_ids"], got["labels"], got["context_at"], got["context_len"], CTX)
        assert full[0].tolist() == want["_full"][0] and full[1].tolist() == want["_full"][1]
        assert got["images"] == want["images"]
    assert len(st_._groups) == 2  # only the last groups read stay decoded


def test_resolve_pack_cuts_truncated_samples_and_names_stale_rows(store):
    st_, rows = store
    a, b = rows["a"][4], rows["b"][8]  # 1 and 2 images
    pack = {
        "pack_id": 3,
        "sample_ids": [a["sample_id"], b["sample_id"]],
        "token_shards": ["a", "b"],
        "token_rows": [4, 8],
        "seq_lens": [a["n_tokens"], 259],  # b cut after its first image
        "image_counts": [1, 1],
    }
    ids, labels, images = resolve_pack(st_, pack, CTX)
    assert ids.tolist() == a["_full"][0] + b["_full"][0][:259]
    assert labels.tolist() == a["_full"][1] + b["_full"][1][:259]
    assert [(im["path"], im["sample_index"]) for im in images] == [
        (a["images"][0]["path"], 0),
        (b["images"][0]["path"], 1),
    ]
    stale = {**pack, "token_rows": [5, 8]}
    with pytest.raises(ValueError, match="tokens changed since packing"):
        resolve_pack(st_, stale, CTX)
    with pytest.raises(FileNotFoundError, match="tokens shard missing"):
        st_.row("zz", 0)


def test_a_store_pickles_without_its_open_files(store):
    """DataLoader workers get the store pickled: they open their own files."""
    import pickle

    st_, rows = store
    st_.row("a", 3)
    copy = pickle.loads(pickle.dumps(st_))
    assert copy._files == {} and copy._groups == {}
    assert copy.row("a", 3)["sample_id"] == rows["a"][3]["sample_id"]
