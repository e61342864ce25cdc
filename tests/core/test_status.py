"""A sample's status comes from the ledgers of the stages named, plus review decisions, and a
required stage that left a sample unjudged rejects it (``<stage>_missing``), never keeps it."""

from __future__ import annotations

import pyarrow as pa

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from curate.core.records import SAMPLE_SCHEMA, LedgerEntry, ledger_table
from curate.core.status import add_decisions, sample_status


def _samples(run: RunFolder, ids: list[str]) -> None:
    rows = [
        {
            "sample_id": i,
            "dataset": "d",
            "line": n + 1,
            "domain": "general",
            "kind": "text",
            "conversations": [],
            "images": [],
            "video": None,
            "extra": None,
        }
        for n, i in enumerate(ids)
    ]
    write_parquet_atomic(
        pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), run.shard_path("samples", "s0")
    )


def _ledger(run: RunFolder, stage: str, entries: list[tuple[str, str, str]]) -> None:
    rows = [LedgerEntry(i, "d", 1, stage, rule, sev) for i, rule, sev in entries]
    write_parquet_atomic(ledger_table(rows), run.ledger_path(stage, "s0"))


def _scores(run: RunFolder, ids: list[str]) -> None:
    table = pa.table({"sample_id": ids, "dataset": ["d"] * len(ids), "line": [1] * len(ids)})
    write_parquet_atomic(table, run.shard_path("scores", "s0"))


def _status(df) -> dict[str, str]:
    return dict(zip(df["sample_id"].to_list(), df["status"].to_list(), strict=True))


def test_status_reads_only_the_named_stages(tmp_path):
    run = RunFolder(tmp_path)
    _samples(run, ["a", "b", "c"])
    _ledger(run, "filter", [("a", "tail_loop", "flag")])
    _ledger(run, "pack", [("b", "over_token_cap", "reject")])  # pack's own earlier output
    assert _status(sample_status(run, ("filter",))) == {"a": "flag", "b": "keep", "c": "keep"}
    assert _status(sample_status(run))["b"] == "reject"  # the final status: every ledger


def test_a_sample_the_required_stage_never_judged_is_rejected(tmp_path):
    run = RunFolder(tmp_path)
    _samples(run, ["a", "b", "c"])
    _ledger(run, "filter", [("c", "empty_answer", "reject")])
    _ledger(run, "score", [])
    _scores(run, ["a"])  # b passed the filters but has no score
    df = sample_status(run, ("filter", "score"), {"score": "scores"})
    assert _status(df) == {"a": "keep", "b": "reject", "c": "reject"}
    reasons = dict(zip(df["sample_id"].to_list(), df["reasons"].to_list(), strict=True))
    assert reasons["b"] == ["score_missing"] and reasons["c"] == ["empty_answer"]


def test_review_decisions_override_the_ledger(tmp_path):
    run = RunFolder(tmp_path)
    _samples(run, ["a", "b"])
    _ledger(run, "filter", [("a", "tail_loop", "flag"), ("b", "char_run", "reject")])
    add_decisions(run, [{"sample_id": "a", "dataset": "d", "decision": "keep"}])
    add_decisions(run, [{"dataset": "d", "rule": "char_run", "decision": "keep"}])
    assert _status(sample_status(run, ("filter",))) == {"a": "keep", "b": "keep"}
    assert _status(sample_status(run, ("filter",), flagged="include"))["a"] == "keep"
