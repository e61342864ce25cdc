"""Decontamination through the engine on the demo run: the leaked benchmark items are found by
image alone, by text alone, and by both; the ten-word near-miss is not; the ledger names the
benchmark and the item; counts hold; a changed benchmark redoes every shard."""

from __future__ import annotations

import pytest

from curate.core.folder import RunFolder
from curate.stages.decontaminate.config import Benchmark, DecontaminateConfig
from curate.stages.decontaminate.stage import DecontaminateStage
from curate.stages.neardup.config import NearDupConfig
from curate.stages.neardup.signatures import SignaturesStage
from tests.conftest import run_stages
from tests.stages.neardup.helpers import ledger_by_id, planted_ids, run_neardup

LEAKS = {"leak:image": ("demo-001", "image"), "leak:text": ("demo-003", "text")}


def _config(demo_dir, **kw) -> DecontaminateConfig:
    bench = Benchmark(name="demo_bench", path=demo_dir / "benchmarks" / "demo_bench.parquet")
    return DecontaminateConfig(benchmarks=[bench], **kw)


def _run(path, cfg):
    return run_stages(path, SignaturesStage(None), DecontaminateStage(cfg))


@pytest.fixture(scope="module")
def demo_decontaminated(ingested_run, demo_dir, tmp_path_factory):
    import shutil

    path = tmp_path_factory.mktemp("decontaminate") / "run"
    shutil.copytree(ingested_run, path)
    return RunFolder(path), _run(path, _config(demo_dir))


def test_leaks_are_found_by_image_by_text_and_by_both(demo_decontaminated):
    run, summaries = demo_decontaminated
    ledger = ledger_by_id(run, "decontaminate")
    assert set(ledger) == {"leak:image", "leak:text", "leak:both"}
    for leak, (item, how) in LEAKS.items():
        row = ledger[leak]
        assert row["rule"] == "benchmark_contamination" and row["severity"] == "reject"
        assert f"benchmark demo_bench item {item}" in row["detail"]
        assert ("pHash" in row["detail"]) == (how == "image")
    ids = planted_ids(run)
    rows = {ids[r["sample_id"]]: r for r in run.read("decontaminate").to_pylist()}
    assert {m["by"] for m in rows["leak:both"]["matches"]} == {"image", "text"}
    assert not rows["nm:ten_words"]["contaminated"]
    s = summaries["decontaminate"]
    assert s.rows_in == s.rows_kept + s.rows_rejected and s.rows_rejected == 3


def test_text_only_and_image_only_matching(demo_decontaminated, demo_dir, run_copy):
    run, _ = demo_decontaminated
    path = run_copy(run.path)
    _run(path, _config(demo_dir, match=["text"]))
    assert set(ledger_by_id(RunFolder(path), "decontaminate")) == {"leak:text", "leak:both"}
    _run(path, _config(demo_dir, match=["image"]))
    assert set(ledger_by_id(RunFolder(path), "decontaminate")) == {"leak:image", "leak:both"}


def test_a_changed_benchmark_redoes_every_shard(demo_decontaminated, demo_dir, run_copy, tmp_path):
    import os
    import shutil

    run, _ = demo_decontaminated
    path = run_copy(run.path)
    copy = tmp_path / "bench.parquet"
    shutil.copy(demo_dir / "benchmarks" / "demo_bench.parquet", copy)
    cfg = _config(demo_dir)
    cfg.benchmarks[0].path = copy
    _run(path, cfg)
    assert not _run(path, cfg)["decontaminate"].redone  # nothing changed: nothing to redo
    st = os.stat(copy)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten in place
    again = _run(path, cfg)["decontaminate"]
    assert len(again.redone) == again.shards


def test_contaminated_samples_are_never_kept_as_near_duplicate_representatives(
    demo_decontaminated, demo_dir, run_copy
):
    run, _ = demo_decontaminated
    path = run_copy(run.path)
    summaries = run_neardup(path, NearDupConfig(), _config(demo_dir))
    groups = RunFolder(path).read("neardup_groups").to_pylist()
    ids = planted_ids(RunFolder(path))
    assert not {ids[g["sample_id"]] for g in groups} & {"leak:image", "leak:text", "leak:both"}
    assert summaries["neardup"].rows_in == summaries["decontaminate"].rows_kept
