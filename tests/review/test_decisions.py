"""The one decision module behind both faces of review: targets checked, rows written under
the run lock (waiting a bounded time for it), and an undo that withdraws exactly one row."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest

from curate.core.folder import RunFolder, RunLockedError
from curate.core.status import current_decisions, load_decisions, sample_status
from curate.review.decisions import (
    ReviewError,
    locked,
    record,
    rule_targets,
    sample_targets,
    withdraw,
)


def test_record_writes_at_once_and_counts_the_effect(review_copy):
    run, ids = review_copy
    targets = sample_targets(run, ids["flagged"] + ids["zero"])
    assert [t["dataset"] for t in targets] == ["doc_ocr", "math_text"]
    done = record(run, targets, "keep", "looked fine", totals=True)
    assert done.after["flag"] == done.before["flag"] - 2
    assert done.after["keep"] == done.before["keep"] + 2
    rows = load_decisions(run).to_dicts()
    assert [r["sample_id"] for r in rows] == ids["flagged"] + ids["zero"]
    assert {r["decided_at"] for r in rows} == {done.decided_at}
    assert {r["note"] for r in rows} == {"looked fine"}


def test_targets_are_checked_against_frames_a_caller_holds(review_copy):
    """The app passes the samples and ledger it holds; the answers are the CLI's."""
    run, ids = review_copy
    samples = pl.from_arrow(run.read("samples", columns=["sample_id", "dataset"]))
    ledger = pl.from_arrow(run.ledger())
    assert sample_targets(run, ids["zero"], samples) == sample_targets(run, ids["zero"])
    assert rule_targets(run, None, "many_rule", ledger) == rule_targets(run, None, "many_rule")
    with pytest.raises(ReviewError, match="no such sample"):
        sample_targets(run, ["feedfacefeedface"], samples.head(3))
    with pytest.raises(ReviewError, match="has no ledger rows for dataset"):
        rule_targets(run, "math_text", "many_rule", ledger)
    with pytest.raises(ReviewError, match="keep or reject"):
        record(run, sample_targets(run, ids["zero"]), "later")
    with pytest.raises(ReviewError, match="nothing to decide"):
        record(run, [], "keep")


def test_undo_withdraws_one_decision_and_restores_the_earlier_one(review_copy):
    run, ids = review_copy
    sid = ids["zero"][0]
    first = record(run, sample_targets(run, [sid]), "reject")
    time.sleep(0.001)
    second = record(run, sample_targets(run, [sid]), "keep")
    status = dict(sample_status(run).select("sample_id", "status").iter_rows())
    assert status[sid] == "keep"
    assert withdraw(run, second.decided_at, sample_id=sid) == 1
    assert current_decisions(run)["decided_at"].to_list() == [first.decided_at]
    assert dict(sample_status(run).select("sample_id", "status").iter_rows())[sid] == "reject"
    assert withdraw(run, second.decided_at, sample_id=sid) == 0  # gone already
    rule = record(run, rule_targets(run, "chart_qa", "many_rule"), "keep")
    assert withdraw(run, rule.decided_at, sample_id=ids["many"][0]) == 0  # not that key
    assert withdraw(run, rule.decided_at, dataset="chart_qa", rule="many_rule") == 1
    assert len(load_decisions(run)) == 1


def test_writes_wait_for_the_run_lock_then_give_up(review_copy):
    run, ids = review_copy
    targets = sample_targets(run, ids["zero"])
    held = threading.Event()
    release = threading.Event()

    def hold(seconds: float) -> None:
        with RunFolder(run.path).lock():
            held.set()
            release.wait(seconds)

    t = threading.Thread(target=hold, args=(5.0,))
    t.start()
    held.wait()
    t0 = time.monotonic()
    with pytest.raises(RunLockedError, match="in use by another curate process"):
        record(run, targets, "keep", wait_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert load_decisions(run).is_empty()  # nothing half-written
    threading.Timer(0.2, release.set).start()  # the other process finishes soon
    done = record(run, targets, "keep", wait_s=5.0)  # ... so this one waits, and writes
    t.join()
    assert load_decisions(run)["decided_at"].to_list() == [done.decided_at]


def test_locked_releases_on_errors(review_copy):
    run, _ = review_copy
    with pytest.raises(RuntimeError), locked(run):
        raise RuntimeError("boom")
    with locked(run):  # free again
        pass
