"""Run tables, counts and the rejected-sample selection on the planted run."""

from __future__ import annotations

import polars as pl

from curate.core.folder import RunFolder
from curate.stages.report import rows as report_rows
from curate.stages.report.rows import CONTENT_COLUMNS, read_rows
from curate.stages.report.tables import (
    counts_by_stage_rule_dataset,
    find_run,
    load_run_tables,
    pack_caps,
    rejected_samples,
    score_view,
    status_counts,
    with_content,
)


def test_load_run_tables_reads_every_stage(planted_run):
    path, ids = planted_run
    t = load_run_tables(path)
    assert len(t.samples) == len(RunFolder(path).read("samples"))
    assert t.budget is not None and t.packs is not None and t.scores is not None
    assert t.filter is None  # no filter/ outputs planted: optional
    assert t.pack_caps == (8192, 40)
    assert all(r.is_dir() for r in t.roots) and len(t.roots) == 8
    assert set(t.scores["check"]) == {"quality"}


def test_samples_are_read_without_their_content(planted_run):
    """Every sample's small columns only: a run of 16M samples fits in memory because the
    conversations, images and video (≈ 3.4 kB a sample) are not among them."""
    path, _ = planted_run
    t = load_run_tables(path)
    assert t.samples.columns == ["sample_id", "dataset", "line", "domain", "kind"]
    assert not set(CONTENT_COLUMNS) & set(t.samples.columns)


def test_with_content_reads_the_given_samples_only(planted_run, monkeypatch):
    path, ids = planted_run
    t = load_run_tables(path)
    asked = []

    def spy(run, table, wanted, columns):
        asked.append((table, list(wanted)))
        return read_rows(run, table, wanted, columns)

    monkeypatch.setattr(report_rows, "read_rows", spy)
    few = rejected_samples(t, rule="many_rule").head(3)
    out = with_content(t, few)
    assert asked == [("samples", few["sample_id"].to_list())]
    assert out["sample_id"].to_list() == few["sample_id"].to_list()
    assert all(out["conversations"].list.len() > 0)
    assert read_rows(RunFolder(path), "samples", [], ["sample_id"]).is_empty()
    unknown = with_content(t, pl.DataFrame({"sample_id": ["nope"]}))
    assert unknown["conversations"].to_list() == [None]


def test_only_samples_is_enough(ingested_run):
    t = load_run_tables(ingested_run)
    assert t.budget is None and t.scores is None and t.packs is None
    assert t.stats["ingest"]["rows_in"] > len(t.samples)


def test_counts_by_stage_rule_dataset(planted_run):
    path, ids = planted_run
    counts = counts_by_stage_rule_dataset(load_run_tables(path))

    def n(stage, rule):
        return counts.filter((pl.col("stage") == stage) & (pl.col("rule") == rule))["samples"].sum()

    assert n("filter", "many_rule") == 8
    assert n("filter", "char_run") == 1
    assert n("score", "quality_below_threshold") == 3
    assert n("ingest", "image_unreadable") == 2
    # pipeline order: ingest rows first, then filter, then score (pack's own rejects last)
    stages = counts["stage"].unique(maintain_order=True).to_list()
    assert stages[:3] == ["ingest", "filter", "score"]


def test_rejected_samples_filters(planted_run):
    path, ids = planted_run
    t = load_run_tables(path)
    every = rejected_samples(t)
    assert set(ids["hostile"] + ids["flagged"] + ids["many"] + ids["low"]) <= set(
        every["sample_id"]
    )
    assert every["sample_id"].n_unique() == len(every)
    hostile = rejected_samples(t, rule="char_run")
    assert hostile["sample_id"].to_list() == ids["hostile"]
    row = hostile.row(0, named=True)
    assert row["status"] == "reject" and row["worst"] == "reject" and row["ingested"]
    assert row["failures"][0]["value"] == 150.0 and row["failures"][0]["threshold"] == 100.0
    assert "conversations" not in hostile.columns  # content only when asked for
    with_text = rejected_samples(t, rule="char_run", content=True).row(0, named=True)
    assert with_text["conversations"] and with_text["images"]
    assert {k: v for k, v in with_text.items() if k not in CONTENT_COLUMNS} == row
    assert set(rejected_samples(t, score_below=7)["sample_id"]) == set(ids["low"])
    assert set(rejected_samples(t, score_below=3)["sample_id"]) == {ids["low"][0]}
    assert set(rejected_samples(t, dataset="chart_qa", rule="many_rule")["sample_id"]) == set(
        ids["many"]
    )
    assert rejected_samples(t, dataset="code_text", rule="many_rule").is_empty()
    flags = rejected_samples(t, status="flag")
    assert set(flags["sample_id"]) == set(ids["flagged"] + ids["zero"] + ids["many"])
    ingest_only = every.filter(~pl.col("ingested"))
    assert len(ingest_only) >= 5 and set(ingest_only["status"]) == {"reject"}
    rejects = rejected_samples(t, status="reject")  # the notebook's STATUS = "reject"
    assert set(ingest_only["sample_id"]) <= set(rejects["sample_id"])


def test_status_counts_match_sample_status(planted_run):
    path, ids = planted_run
    s = status_counts(load_run_tables(path))
    assert int(s["reject"].sum()) == 1 + 3 + 1  # char_run + three low scores + truncated JPEG
    assert int(s["flag"].sum()) == 1 + 1 + 8
    assert (s["samples"] == s["keep"] + s["reject"] + s["flag"]).all()


def test_score_view_plain_layout():
    plain = pl.DataFrame(
        {
            "sample_id": ["a", "b"],
            "dataset": ["d", "d"],
            "domain": [None, "math"],
            "score": [3, None],
            "expected": [3.2, 6.5],
            "threshold": [7.0, 7.0],
        }
    )
    v = score_view(plain)
    assert v["domain"].to_list() == ["(none)", "math"] and v["check"].to_list() == ["quality"] * 2
    assert score_view(pl.DataFrame({"sample_id": ["a"]})) is None


def test_pack_caps_from_fill():
    stats = {
        "packs": 45,
        "tokens": 356286,
        "token_fill": 0.96649,
        "tiles": 1198,
        "tile_fill": 0.66556,
    }
    assert pack_caps(stats) == (8192, 40)
    assert pack_caps(None) is None and pack_caps({"packs": 0}) is None


def test_find_run_looks_in_parents(tmp_path, monkeypatch):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert find_run("runs/demo").resolve() == (tmp_path / "runs" / "demo").resolve()
