"""`curate review`: decisions from the command line, their effect on status, and on what
`pack` keeps (a flagged sample packed only if kept; a rejected one restored)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from curate.cli.main import app
from curate.core.folder import RunFolder
from curate.core.status import current_decisions, load_decisions, pending_review, status_totals
from curate.stages.pack.config import PackConfig
from tests.stages.report.conftest import pack

runner = CliRunner()


def _review(run, *args):
    result = runner.invoke(app, ["review", "--run", str(run), *args])
    return result, " ".join(result.output.split())


def _packed(run: RunFolder) -> set[str]:
    return {s for p in run.read("packs").to_pylist() for s in p["sample_ids"]}


@pytest.fixture
def planted_copy(planted_run, run_copy):
    path, ids = planted_run
    return run_copy(path), ids


def test_pending_lists_flagged_samples_with_rules(planted_copy):
    path, ids = planted_copy
    result, out = _review(path, "--pending", "--limit", "100")
    assert result.exit_code == 0, result.output
    assert "flagged samples awaiting review (10)" in out
    assert ids["flagged"][0] in out and "duplicate_lines (0.9167 vs 0.5)" in out
    assert ids["hostile"][0] not in out  # rejected, not awaiting review
    pending = pending_review(RunFolder(path))
    assert set(pending["sample_id"]) == set(ids["flagged"] + ids["zero"] + ids["many"])


def test_sample_and_rule_decisions_show_their_effect(planted_copy):
    path, ids = planted_copy
    run = RunFolder(path)
    before = status_totals(run)
    result, out = _review(path, "--sample", ids["flagged"][0], "--keep", "--note", "fine")
    assert result.exit_code == 0, result.output
    assert re.search(rf"keep\W+{before['keep']:,}\W+{before['keep'] + 1:,}\W+\+1", out)
    assert re.search(rf"flag\W+{before['flag']}\W+{before['flag'] - 1}\W+-1", out)
    result, out = _review(path, "--dataset", "chart_qa", "--rule", "many_rule", "--reject")
    assert result.exit_code == 0, result.output
    assert "recorded: reject rule many_rule of dataset chart_qa" in out
    after = status_totals(run)
    assert after["flag"] == before["flag"] - 1 - 8 and after["reject"] == before["reject"] + 8
    # --rule alone: every dataset the rule failed in
    result, out = _review(path, "--rule", "zero_run", "--keep")
    assert result.exit_code == 0 and "rule zero_run of dataset math_text" in out
    result, out = _review(path, "--list")
    assert "review decisions in force (3)" in out and "fine" in out
    # a later decision replaces an earlier one for the same key
    _review(path, "--sample", ids["flagged"][0], "--reject")
    cur = current_decisions(run)
    assert len(cur) == 3 and len(load_decisions(run)) == 4
    row = cur.filter(cur["sample_id"] == ids["flagged"][0]).row(0, named=True)
    assert row["decision"] == "reject" and row["superseded"] == 1


def test_bad_review_requests_are_refused(planted_copy, ingested_run):
    path, ids = planted_copy
    cases = [
        (["--sample", "nope", "--keep"], "no such sample"),
        (["--dataset", "code_text", "--rule", "many_rule", "--keep"], "has no ledger rows"),
        (["--rule", "no_such_rule", "--reject"], "has no ledger rows"),
        (["--rule", "image_missing", "--keep"], "is an ingest rule"),
        (["--sample", ids["flagged"][0]], "say --keep or --reject"),
        (["--keep"], "needs --sample"),
        (["--sample", ids["flagged"][0], "--rule", "x", "--keep"], "not both"),
        (["--dataset", "chart_qa", "--keep"], "--dataset needs --rule"),
    ]
    for args, message in cases:
        result, out = _review(path, *args)
        assert result.exit_code == 2 and message in out, (args, out)
    # an ingest reject never became a sample: say so
    from curate.stages.report.tables import load_run_tables, rejected_samples

    ingest_only = rejected_samples(load_run_tables(path)).filter(
        ~rejected_samples(load_run_tables(path))["ingested"]
    )["sample_id"][0]
    result, out = _review(path, "--sample", ingest_only, "--keep")
    assert result.exit_code == 2 and "rejected at ingest" in out
    assert load_decisions(RunFolder(path)).is_empty()


def test_decisions_change_what_pack_keeps(planted_copy, tokenizer_dir):
    path, ids = planted_copy
    run = RunFolder(path)
    cfg = PackConfig(max_tokens=8192, max_tiles=40)
    packed = _packed(run)  # the planted run was packed before any decision
    assert ids["flagged"][0] not in packed and ids["hostile"][0] not in packed
    assert not set(ids["many"]) & packed and not set(ids["low"]) & packed
    keeper = ids["low"][0]
    plain = sorted(packed)[0]  # a kept sample with no ledger row
    for args in (
        ["--sample", ids["flagged"][0], "--keep"],  # flagged: packed only if kept
        ["--sample", ids["hostile"][0], "--keep", "--note", "restore"],  # rejected: restored
        ["--sample", keeper, "--keep"],  # rejected by the judge: restored
        ["--dataset", "chart_qa", "--rule", "many_rule", "--keep"],  # a rule waived
        ["--sample", ids["many"][0], "--reject"],  # ... except for one sample
        ["--sample", plain, "--reject"],  # a clean sample rejected by hand
    ):
        result, _ = _review(path, *args)
        assert result.exit_code == 0, result.output
    summary = pack(run, cfg, tokenizer_dir)
    assert summary.redone == ["all"]  # the decisions are pack's inputs: it is redone
    report = summary.report
    now = _packed(run)
    assert {ids["flagged"][0], ids["hostile"][0], keeper} <= now
    assert set(ids["many"][1:]) <= now and ids["many"][0] not in now
    assert plain not in now and ids["zero"][0] not in now  # still flagged, never kept
    assert not set(ids["low"][1:]) & now
    # + 1: the demo's truncated JPEG, rejected by tokenize (no filter stage decoded it)
    assert report["samples_excluded"] == {
        "reject": 1 + 2 + 1 + 1,
        "flag": 1,
    }
    # the pack ledger and outcome rows agree with what was packed
    outcomes = run.read("pack").to_pylist()
    assert {r["sample_id"] for r in outcomes if r["copies"]} == now
