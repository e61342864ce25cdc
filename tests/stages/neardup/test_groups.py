"""The grouping step on a small hand-made run: grouping in tiny pieces (a few band keys per
partition, a few rows per row group) gives exactly the result of one piece, down to the
member that joined its cluster through a chain; the spill returns every row once."""

from __future__ import annotations

import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.folder import RunFolder
from curate.core.io import write_json_atomic, write_parquet_atomic
from curate.core.records import SAMPLE_SCHEMA
from curate.stages.neardup import spill
from curate.stages.neardup.config import NearDupConfig
from tests.stages.neardup.helpers import drop_grouping, run_neardup, with_settings

# Estimated Jaccard (128 permutations, seed 1) of the chain below: A-B 0.91, B-C 0.91, A-C 0.82.
CHAIN = NearDupConfig(threshold=0.87)


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(n)]


def _edit(words: list[str], positions: range) -> list[str]:
    return [("zz" + w if i in positions else w) for i, w in enumerate(words)]


def make_run(path, texts: list[tuple[str, str]], shard_rows: int) -> RunFolder:
    """A run with ``texts`` ((dataset, answer) in line order per dataset) ingested in shards of
    ``shard_rows`` samples, as ingest would leave it."""
    lines: dict[str, int] = {}
    rows = []
    for k, (dataset, answer) in enumerate(texts):
        lines[dataset] = lines.get(dataset, 0) + 1
        rows.append(
            {
                "sample_id": f"s{k}",
                "dataset": dataset,
                "line": lines[dataset],
                "domain": "general",
                "kind": "text",
                "conversations": [
                    {"role": "human", "text": "what does it say?"},
                    {"role": "gpt", "text": answer},
                ],
                "images": [],
                "video": None,
                "extra": None,
            }
        )
    for start in range(0, len(rows), shard_rows):
        name = f"synth-{start // shard_rows:05d}"
        table = pa.Table.from_pylist(rows[start : start + shard_rows], schema=SAMPLE_SCHEMA)
        write_parquet_atomic(table, path / "samples" / f"{name}.parquet")
        marker = {"fingerprint": "test", "inputs": {}, "output": f"test-{name}"}
        write_json_atomic(marker, path / "_done" / "ingest" / f"{name}.json")
    datasets = {d: {"name": d, "domain": "general"} for d in lines}
    write_json_atomic({"datasets": datasets, "dataset_order": sorted(lines)}, path / "run.json")
    return RunFolder(path)


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    rng = random.Random(7)
    a = _words(rng, 80)
    b = _edit(a, range(76, 80))
    c = _edit(b, range(4))
    texts = [("d1", " ".join(a)), ("d1", " ".join(b)), ("d2", " ".join(c))]
    # Unrelated samples around them, a few near-duplicate pairs among them, over 4 shards.
    for k in range(120):
        words = _words(rng, 30)
        texts.append((f"d{1 + k % 3}", " ".join(words)))
        if k % 10 == 0:
            texts.append((f"d{1 + (k + 1) % 3}", " ".join(_edit(words, range(29, 30)))))
    run = make_run(tmp_path_factory.mktemp("chain") / "run", texts, shard_rows=40)
    run_neardup(run.path, CHAIN)
    return run


def _members(run: RunFolder) -> dict[str, dict]:
    return {m["sample_id"]: m for m in run.read("neardup_groups").to_pylist()}


def test_tiny_partitions_and_row_groups_give_the_same_groups(chain_run, tmp_path, monkeypatch):
    _assert_chain(chain_run)
    path = tmp_path / "run"
    shutil.copytree(chain_run.path, path)
    drop_grouping(path)
    counts = []
    ranges = spill.Spill.ranges

    def counted(self, partition_rows):
        out = ranges(self, partition_rows)
        counts.append(len(out))
        return out

    monkeypatch.setattr(spill.Spill, "ranges", counted)
    monkeypatch.setattr(spill, "ROW_GROUP", 7)
    run_neardup(path, with_settings(CHAIN, partition_rows=5))
    assert max(counts) > 100  # the band keys really were grouped a few at a time
    again = RunFolder(path)
    assert _same_outputs(chain_run, again)
    assert again.ledger("neardup").to_pylist() == chain_run.ledger("neardup").to_pylist()
    _assert_chain(again)


def _assert_chain(run: RunFolder) -> None:
    """A (d1:1) ~ B (d1:2) ~ C (d2:1), A !~ C: C is a duplicate of A joined through B."""
    members = _members(run)
    assert members["s0"]["role"] == "kept"
    assert members["s1"]["kept_id"] == "s0" and members["s1"]["via_id"] is None
    c = members["s2"]
    assert c["role"] == "duplicate" and c["kept_id"] == "s0" and c["cluster_size"] == 3
    assert c["similarity"] < CHAIN.threshold <= c["via_similarity"]
    assert (c["via_id"], c["via_dataset"], c["via_line"]) == ("s1", "d1", 2)
    detail = {r["sample_id"]: r["detail"] for r in run.ledger("neardup").to_pylist()}
    assert "joined through s1 (d1:2" in detail["s2"]


def _same_outputs(a: RunFolder, b: RunFolder) -> bool:
    files = sorted(p.relative_to(a.path) for p in (a.path / "neardup_groups").rglob("*.parquet"))
    other = sorted(p.relative_to(b.path) for p in (b.path / "neardup_groups").rglob("*.parquet"))
    assert files == other and len(files) > 3
    for f in files:
        assert pq.read_table(b.path / f).equals(pq.read_table(a.path / f)), f
    report = a.marker("neardup_groups", "all")["report"]
    assert b.marker("neardup_groups", "all")["report"] == report
    return True


def test_spill_returns_every_row_once_with_equal_keys_together(tmp_path, monkeypatch):
    import numpy as np

    monkeypatch.setattr(spill, "ROW_GROUP", 16)
    rng = np.random.default_rng(0)
    schema = pa.schema([("part", pa.uint64()), ("row", pa.int64())])
    store = spill.Spill(tmp_path, schema)
    written = []
    for shard in range(3):
        part = rng.integers(0, 2**64 - 1, 500, dtype=np.uint64, endpoint=True)
        part[:20] = part[20:40]  # repeated keys, within the shard and (below) across shards
        part[40:45] = [0, 2**64 - 1, 2**63, 2**63 - 1, 1]  # the ends of the hash space
        part[45:50] = written[0][:5] if written else part[45:50]
        rows = np.arange(shard * 500, shard * 500 + 500)
        store.write(pa.table({"part": part, "row": rows}))
        written.append(part)
    store.write(schema.empty_table())  # an empty shard writes nothing
    assert store.rows == 1500 and len(store.files) == 3
    pieces = list(store.parts(100))
    assert len(pieces) == 15
    seen = np.concatenate([p.column("row").to_numpy() for p in pieces])
    assert sorted(seen.tolist()) == list(range(1500))
    where = {}
    for k, p in enumerate(pieces):
        for key in set(p.column("part").to_pylist()):
            assert where.setdefault(key, k) == k  # a key is in one piece only
