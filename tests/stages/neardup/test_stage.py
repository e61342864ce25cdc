"""The near-duplicate steps through the engine on the demo run: every planted near-duplicate
(text: whitespace and punctuation edits, reordered turns, a reworded answer; images: resized,
re-encoded, cropped, each with its conversation) is found, no near-miss is, the kept sample
is the first in meta order then line, counts hold, and reruns redo only what changed."""

from __future__ import annotations

import shutil

import pytest

from curate.core.folder import RunFolder
from curate.stages.neardup.config import NearDupConfig, NearDupOverride
from tests.stages.neardup.helpers import (
    drop_grouping,
    ledger_by_id,
    planted_ids,
    run_neardup,
    with_settings,
)

# copy -> the planted sample it repeats (the one kept: earlier in meta order, then line).
PLANTED = {
    "nd:whitespace": "nd:base_whitespace",  # science_text copy of a math_text sample
    "nd:reordered": "nd:base_turns",
    "nd:reworded": "nd:base_reworded",  # science_text copy of a code_text sample
    "nd:resized": "nd:base_resized",
    "nd:jpeg_q35": "nd:base_jpeg_q35",
    "nd:cropped": "nd:base_cropped",
}
NEAR_MISSES = ("nm:same_question", "nm:same_image", "nm:same_text", "nm:ten_words")
# The demo's three icons share one conversation; two of them are the same drawing resized.
INCIDENTAL = {"icon2": "icon0"}
# The demo's code answers reuse five fixed functions (pipelines/demo.yaml raises the
# programming threshold to 0.9 for them, as here).
DEMO = NearDupConfig(overrides={"programming": NearDupOverride(threshold=0.9)})


@pytest.fixture(scope="module")
def demo_neardup(ingested_run, tmp_path_factory):

    path = tmp_path_factory.mktemp("neardup") / "run"
    shutil.copytree(ingested_run, path)
    summaries = run_neardup(path, DEMO)
    return RunFolder(path), summaries


def test_every_planted_pair_is_found_and_no_near_miss(demo_neardup):
    run, _ = demo_neardup
    ledger = ledger_by_id(run, "neardup")
    ids = {v: k for k, v in planted_ids(run).items()}
    assert set(ledger) == set(PLANTED) | set(INCIDENTAL)
    for copy, kept in {**PLANTED, **INCIDENTAL}.items():
        row = ledger[copy]
        assert row["rule"] == "near_duplicate" and row["severity"] == "flag"
        assert ids[kept] in row["detail"], (copy, row["detail"])
        assert row["value"] >= 0.7
    for miss in NEAR_MISSES:
        assert miss not in ledger


def test_detail_names_the_kept_sample_and_its_line(demo_neardup):
    run, _ = demo_neardup
    row = ledger_by_id(run, "neardup")["nd:whitespace"]
    kept = next(r for r in run.read("samples").to_pylist() if '"nd:base_whitespace"' in r["extra"])
    assert f"({kept['dataset']}:{kept['line']})" in row["detail"]
    assert kept["dataset"] == "math_text" and row["dataset"] == "science_text"
    assert "estimated Jaccard 1.00" in row["detail"]
    image_row = ledger_by_id(run, "neardup")["nd:jpeg_q35"]
    assert "pHash bits" in image_row["detail"]


def test_counts_hold_and_nothing_is_rejected_by_default(demo_neardup):
    run, summaries = demo_neardup
    s = summaries["neardup"]
    assert s.rows_in == s.rows_kept + s.rows_rejected
    assert s.rows_rejected == 0 and s.rows_flagged == len(PLANTED) + len(INCIDENTAL)
    assert summaries["signatures"].rows_in == len(run.read("samples"))
    rows = run.read("neardup")
    assert rows.num_rows == s.rows_in  # one row per sample, clustered or not


def test_kept_sample_is_deterministic(demo_neardup, tmp_path):

    run, _ = demo_neardup
    again = tmp_path / "again"
    shutil.copytree(run.path, again)
    for folder in ("_done", "neardup", "neardup_groups", "signatures", "ledger/neardup"):
        shutil.rmtree(again / folder, ignore_errors=True)
    # Shards in another order on disk must not matter: the order is meta order, then line.
    run_neardup(again, DEMO)
    assert RunFolder(again).ledger("neardup").to_pylist() == run.ledger("neardup").to_pylist()


def test_rerun_redoes_nothing_and_threshold_redoes_the_grouping_only(demo_neardup, run_copy):
    run, _ = demo_neardup
    path = run_copy(run.path)
    again = run_neardup(path, DEMO)
    assert all(not s.redone for s in again.values())
    stricter = DEMO.model_copy(update={"threshold": 0.95})
    redo = run_neardup(path, stricter)
    assert not redo["signatures"].redone  # signatures do not depend on the threshold
    assert redo["neardup_groups"].redone == ["all"]
    ledger = ledger_by_id(RunFolder(path), "neardup")
    assert "nd:reworded" not in ledger  # Jaccard 0.80 < 0.95
    assert "nd:whitespace" in ledger


def test_partition_rows_changes_nothing_so_redoes_nothing(demo_neardup, run_copy):
    run, _ = demo_neardup
    path = run_copy(run.path)
    again = run_neardup(path, with_settings(DEMO, partition_rows=10))
    assert all(not s.redone for s in again.values())


def test_grouping_in_tiny_partitions_gives_the_same_clusters(demo_neardup, run_copy, monkeypatch):
    """Text band keys and image uses grouped a few at a time (hundreds of partitions, tiny
    row groups): the same members, kept samples, image clusters, report and ledger rows."""
    import pyarrow.parquet as pq

    from curate.stages.neardup import spill

    run, _ = demo_neardup
    path = run_copy(run.path)
    drop_grouping(path)
    monkeypatch.setattr(spill, "ROW_GROUP", 3)
    run_neardup(path, with_settings(DEMO, partition_rows=2))
    files = sorted(p.relative_to(run.path) for p in (run.path / "neardup_groups").rglob("*.pa*"))
    assert files == sorted(p.relative_to(path) for p in (path / "neardup_groups").rglob("*.pa*"))
    for f in files:
        assert pq.read_table(path / f).equals(pq.read_table(run.path / f)), f
    images = pq.read_table(path / "neardup_groups" / "clusters" / "images.parquet")
    assert images.num_rows > 0  # the image side was grouped too
    again = RunFolder(path)
    assert (
        again.marker("neardup_groups", "all")["report"]
        == run.marker("neardup_groups", "all")["report"]
    )
    assert again.ledger("neardup").to_pylist() == run.ledger("neardup").to_pylist()


def test_severity_redoes_only_the_ledger_step(demo_neardup, run_copy):
    run, _ = demo_neardup
    path = run_copy(run.path)
    redo = run_neardup(path, DEMO.model_copy(update={"severity": "reject"}))
    assert not redo["signatures"].redone and not redo["neardup_groups"].redone
    assert redo["neardup"].redone
    assert redo["neardup"].rows_rejected == len(PLANTED) + len(INCIDENTAL)


def test_a_changed_shard_redoes_its_signatures_only(demo_neardup, run_copy):
    import pyarrow.parquet as pq

    from curate.core.io import write_parquet_atomic

    run, _ = demo_neardup
    path = run_copy(run.path)
    folder = RunFolder(path)
    shard = next(s for s in folder.shards("samples") if s.startswith("math_text"))
    table = pq.read_table(folder.shard_path("samples", shard))
    write_parquet_atomic(table.slice(0, table.num_rows - 1), folder.shard_path("samples", shard))
    # As a fixed annotation line would: ingest's output for that shard changes.
    marker = folder.marker("ingest", shard)
    marker["output"] = "changed"
    from curate.core.io import write_json_atomic

    write_json_atomic(marker, folder.marker_path("ingest", shard))
    redo = run_neardup(path, DEMO)
    assert redo["signatures"].redone == [shard]
    assert redo["neardup_groups"].redone == ["all"]


def test_disabled_dataset_is_neither_compared_nor_marked(demo_neardup, run_copy):
    run, _ = demo_neardup
    path = run_copy(run.path)
    cfg = DEMO.model_copy(
        update={"overrides": {**DEMO.overrides, "science_text": NearDupOverride(enabled=False)}}
    )
    run_neardup(path, cfg)
    ledger = ledger_by_id(RunFolder(path), "neardup")
    assert not {"nd:whitespace", "nd:reordered", "nd:reworded"} & set(ledger)
    assert "nd:resized" in ledger


def test_pipeline_sections_become_steps_that_pack_and_score_respect(tmp_path, demo_dir):
    from curate.pipeline.config import validate
    from curate.pipeline.run import SECTIONS, build_stages

    bench = {"name": "b", "path": str(demo_dir / "benchmarks" / "demo_bench.parquet")}
    raw = {
        "run": str(tmp_path / "run"),
        "meta": str(demo_dir / "meta.json"),
        "models": {"tokenizer": str(demo_dir), "judge": str(demo_dir)},
        "stages": {
            "budget": {},
            "filter": {},
            "decontaminate": {"benchmarks": [bench]},
            "neardup": {"threshold": 0.8},
            "score": {},
            "pack": {},
        },
    }
    stages = {s.name: s for s in build_stages(validate(raw, "test"))}
    names = list(stages)
    assert names.index("filter") < names.index("signatures") < names.index("decontaminate")
    assert names.index("decontaminate") < names.index("neardup_groups") < names.index("neardup")
    assert names.index("neardup") < names.index("score")
    assert stages["score"].respects == ("filter", "decontaminate", "neardup")
    assert {"decontaminate", "neardup"} <= set(stages["pack"].respects)
    assert stages["neardup_groups"].reads == ("signatures", "decontaminate")
    assert SECTIONS["neardup"] == ("signatures", "neardup_groups", "neardup")


def test_an_image_another_shard_hashed_is_not_decoded_again(tmp_path, monkeypatch):
    """Shard B reads the pHash of an image shard A already hashed (same file, size, mtime)
    from A's cache file instead of decoding it; a changed file is decoded again."""
    import os

    import pyarrow as pa
    from PIL import Image

    from curate.core.io import write_parquet_atomic
    from curate.stages.neardup import images as nd_images
    from curate.stages.neardup import signatures as sig

    image = tmp_path / "shared.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(image)
    cache = sig.HashCache()
    (known,) = cache.hashes([str(image)])
    key = cache.key(str(image))
    folder = tmp_path / "_cache" / "signatures"
    row = {"path": key[0], "size": key[1], "mtime_ns": key[2], "phash": known}
    row["fingerprint"] = sig._HASH_VERSION
    write_parquet_atomic(
        pa.Table.from_pylist([row], schema=sig._CACHE_SCHEMA), folder / "A.parquet"
    )
    table = pa.table({"kind": ["image"], "images": [[{"path": str(image)}]]})

    def no_decoding(path):
        raise AssertionError("decoded again")

    monkeypatch.setattr(nd_images, "grey_thumbnail", no_decoding)
    fresh = sig.HashCache()
    fresh.known.update(sig._other_shards_hashes(folder / "B.parquet", table, fresh, 8))
    assert fresh.hashes([str(image)]) == [known] and fresh.decoded == 0
    os.utime(image, ns=(key[2], key[2] + 10**9))  # the file changed: its entry no longer counts
    assert sig._other_shards_hashes(folder / "B.parquet", table, sig.HashCache(), 8) == {}
