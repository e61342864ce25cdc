"""The report's near-duplicate and contamination tables, on the demo run after both steps."""

from __future__ import annotations

import shutil

import pytest

from curate.core.folder import RunFolder
from curate.stages.decontaminate.config import Benchmark, DecontaminateConfig
from curate.stages.neardup.config import NearDupConfig, NearDupOverride
from curate.stages.report.tables import contamination_by_benchmark, load_run_tables
from curate.stages.report.write import render_report
from tests.stages.neardup.helpers import run_neardup


@pytest.fixture(scope="module")
def tables(ingested_run, demo_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("report_neardup") / "run"
    shutil.copytree(ingested_run, path)
    bench = Benchmark(name="demo_bench", path=demo_dir / "benchmarks" / "demo_bench.parquet")
    cfg = NearDupConfig(overrides={"programming": NearDupOverride(threshold=0.9)})
    run_neardup(path, cfg, DecontaminateConfig(benchmarks=[bench]))
    return load_run_tables(RunFolder(path))


def test_contamination_table_counts_items_samples_and_how(tables):
    (row,) = contamination_by_benchmark(tables).to_dicts()
    assert row["benchmark"] == "demo_bench"
    # leak:image (item 1), leak:text (item 3), leak:both (item 5, by image and by text)
    assert (row["items_matched"], row["samples"], row["removed"]) == (3, 3, 3)
    assert (row["by_image"], row["by_text"]) == (2, 2)
    assert row["datasets"] == ["general_vqa", "science_text"]


def test_report_shows_clusters_image_reuse_and_contamination(tables):
    html = render_report(tables)
    assert "Near-duplicates and benchmark contamination" in html
    assert "benchmark contamination, per benchmark" in html
    # six planted pairs and the demo's two alike icons: seven clusters of two
    assert "7 clusters, 7 near-duplicates marked" in html
    assert "math_text:" in html and "image reuse" in html
    reuse = tables.image_clusters
    scene = reuse.filter(reuse["example"].str.ends_with("scene_0.jpg")).to_dicts()[0]
    # scene_0.jpg: its planted copy, and the near-miss asking about it differently
    assert (scene["files"], scene["samples"]) == (2, 3)


def test_report_without_the_steps_has_no_such_section(ingested_run):
    assert "Near-duplicates and benchmark" not in render_report(load_run_tables(ingested_run))
