"""1,000+ bad inputs through ingest, budget, filter and pack: no crash, every line accounted
for at every stage (rows in = kept + rejected), each bad line with its specific reason."""

from __future__ import annotations

import polars as pl
import pytest

from curate.core.folder import RunFolder
from curate.core.status import sample_status
from curate.stages.budget.config import BudgetConfig
from curate.stages.budget.stage import BudgetStage, RepeatStage
from curate.stages.filters.config import FilterConfig
from curate.stages.filters.dedup import DuplicatesStage
from curate.stages.filters.stage import FilterStage
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.stage import IngestStage
from curate.stages.pack.config import PackConfig
from curate.stages.pack.stage import PackStage
from curate.stages.pack.tokenize import TokenizeStage
from tests.conftest import run_stages
from tests.reliability.badcorpus import make_bad_corpus

PER_KIND = 40  # 26 bad kinds x 40 = 1,040 bad lines, plus 80 good ones


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tokenizer_dir):
    out = tmp_path_factory.mktemp("bad")
    meta, expected = make_bad_corpus(out / "data", per_kind=PER_KIND)
    run = RunFolder(out / "run")
    ingest = IngestConfig(shard_lines=250, max_line_bytes=64 * 1024)
    budget, filters = BudgetConfig(), FilterConfig(workers=1)
    summaries = run_stages(
        run,
        IngestStage(ingest, meta),
        BudgetStage(budget, tokenizer_dir),
        RepeatStage(budget),
        DuplicatesStage(filters),
        FilterStage(filters),
    )
    # The sample stages (repeat and the duplicate pass decide on no sample: counts are None).
    assert summaries["repeat"].rows_in is None and summaries["duplicates"].rows_in is None
    summaries = {k: summaries[k] for k in ("ingest", "budget", "filter")}
    return run, expected, summaries


def test_corpus_is_large_and_varied(bad_run):
    _, expected, _ = bad_run
    bad = [v for v in expected.values() if v[0]]
    assert len(bad) >= 1000
    assert len({rule for _, rule in bad}) >= 15


def test_every_stage_conserves_rows(bad_run):
    run, expected, summaries = bad_run
    assert summaries["ingest"].rows_in == len(expected)
    for name, s in summaries.items():
        assert s.rows_in == s.rows_kept + s.rows_rejected, name
        for ds, counts in s.by_dataset.items():
            assert counts[0] == counts[1] + counts[2], (name, ds)
    assert summaries["budget"].rows_in == summaries["ingest"].rows_kept
    assert summaries["filter"].rows_in == summaries["ingest"].rows_kept


def test_every_bad_line_has_its_reason(bad_run):
    run, expected, _ = bad_run
    by_line: dict[int, set[tuple[str, str]]] = {}
    for r in run.ledger().to_pylist():
        line, stage, rule = r["line"], r["stage"], r["rule"]
        by_line.setdefault(line, set()).add((stage, rule))
    missing = {n: w for n, w in expected.items() if w[0] and w not in by_line.get(n, set())}
    assert missing == {}


def test_good_lines_survive(bad_run):
    run, expected, _ = bad_run
    status = sample_status(run).join(
        pl.from_arrow(run.read("samples").select(["sample_id", "line"])), on="sample_id"
    )
    good = {n for n, want in expected.items() if not want[0]}
    rejected = status.filter(pl.col("line").is_in(list(good)) & (pl.col("status") == "reject"))
    assert rejected.height == 0
    assert status.filter(pl.col("line").is_in(list(good))).height == len(good)


def test_pack_takes_exactly_the_kept_samples(bad_run, tokenizer_dir, run_copy):
    run = RunFolder(run_copy(bad_run[0].path))
    cfg = PackConfig(max_tokens=8192, max_tiles=48)
    summaries = run_stages(
        run,
        TokenizeStage(cfg, tokenizer_dir, BudgetConfig().image_size),
        PackStage(cfg, tokenizer_dir, respects=("filter",)),
    )
    report = summaries["pack"].report
    keep = set(sample_status(run).filter(pl.col("status") == "keep")["sample_id"])
    packed = {s for p in run.read("packs").column("sample_ids").to_pylist() for s in p}
    assert packed == keep and report["samples_in"] == len(keep) == report["samples_packed"]
    # Tokenize sees every ingested sample; pack's outcome rows are the kept ones, once each.
    tokenize = summaries["tokenize"]
    assert tokenize.rows_in == tokenize.rows_kept + tokenize.rows_rejected
    assert tokenize.rows_in == bad_run[2]["ingest"].rows_kept
    assert set(run.read("pack")["sample_id"].to_pylist()) == keep


@pytest.mark.slow
def test_score_stage_scores_injections_instead_of_obeying(bad_run, demo_models, run_copy):
    """The judge answers through a constrained 0..10 choice: text telling it to answer 10
    gets a score like any other sample, and every scored row is a valid score."""
    from curate.stages.score.config import ScoreConfig
    from curate.stages.score.stage import ScoreStage

    run = RunFolder(run_copy(bad_run[0].path))
    cfg = ScoreConfig(
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=64 << 20,
        batch_size=128,
        repetition_scope="all",
    )
    stage = ScoreStage(cfg, demo_models["judge"])
    try:
        summary = run_stages(run, stage)["score"]
    finally:
        stage.close()
    assert summary.rows_in == summary.rows_kept + summary.rows_rejected
    scores = pl.from_arrow(run.read("scores")).join(
        pl.from_arrow(run.read("samples").select(["sample_id", "conversations"])), on="sample_id"
    )
    injected = scores.filter(
        pl.col("conversations").list.first().struct.field("text").str.contains("Ignore the rubric")
    )
    assert injected.height >= PER_KIND
    assert scores["quality_score"].is_between(0, 10).all()
    assert injected["quality_score"].null_count() == 0
    checked = scores.filter(pl.col("repetition_checked"))
    assert checked["repetition_score"].is_between(0, 10).all()
    assert "score_invalid" not in set(run.ledger("score").column("rule").to_pylist())
