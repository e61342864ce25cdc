"""What review teaches: a rule's precision on the reviewed samples and a suggested threshold,
and the judge's agreement with the reviewers (Cohen's kappa); in the static report too."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest

from curate.core.folder import RunFolder
from curate.core.status import DECISION_SCHEMA, add_decisions
from curate.stages.report.lessons import (
    cohen_kappa,
    fail_direction,
    judge_agreement,
    rule_lessons,
    suggest_threshold,
)
from curate.stages.report.write import write_report
from tests.stages.report.test_html import parse


def test_cohen_kappa_known_values():
    # Wikipedia's example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4
    assert cohen_kappa(20, 5, 10, 15) == pytest.approx(0.4)
    assert cohen_kappa(10, 0, 0, 10) == pytest.approx(1.0)
    assert cohen_kappa(0, 10, 10, 0) == pytest.approx(-1.0)
    assert cohen_kappa(7, 0, 0, 0) is None  # one label only: chance agreement is 1
    assert cohen_kappa(0, 0, 0, 0) is None


def test_fail_direction():
    assert fail_direction([5.0, 9.0], 4.0) == "above"
    assert fail_direction([1.0, 2.0], 7.0) == "below"
    assert fail_direction([4.0, 4.0], 4.0) is None  # cannot tell
    assert fail_direction([3.0, 9.0], 4.0) is None  # values on both sides
    assert fail_direction([3.0], None) is None


def test_suggest_threshold_moves_towards_fewer_flags_only():
    # fails above 10: the reviewers kept 12 and 15, rejected 30 and 40 -> 15 fixes both
    assert suggest_threshold([12.0, 15.0], [30.0, 40.0], 10.0, "above") == (15.0, 2, 0)
    # a rejected sample below a kept one: the best cut misjudges one
    assert suggest_threshold([12.0, 35.0], [30.0, 40.0], 10.0, "above") == (12.0, 2, 1)
    # nothing kept: the threshold is right as it is
    assert suggest_threshold([], [30.0], 10.0, "above") == (10.0, 0, 0)
    # fails below 7 (the judge's quality): kept 5 and 6, rejected 2 -> 5
    assert suggest_threshold([5.0, 6.0], [2.0], 7.0, "below") == (5.0, 2, 0)


def _decisions(rows: list[dict]) -> pl.DataFrame:
    full = [
        {**dict.fromkeys(DECISION_SCHEMA.names), "decided_at": float(i), **r}
        for i, r in enumerate(rows)
    ]
    return pl.from_arrow(pa.Table.from_pylist(full, schema=DECISION_SCHEMA))


def _ledger(rows: list[tuple]) -> pl.DataFrame:
    cols = ["sample_id", "dataset", "stage", "rule", "severity", "value", "threshold"]
    return pl.DataFrame([dict(zip(cols, r, strict=True)) for r in rows])


def test_rule_lessons_per_rule_and_threshold():
    ledger = _ledger(
        [
            ("a", "d1", "filter", "tail_loop", "flag", 12.0, 10.0),
            ("b", "d1", "filter", "tail_loop", "flag", 30.0, 10.0),
            ("c", "d1", "filter", "tail_loop", "flag", 50.0, 10.0),
            ("e", "d2", "filter", "tail_loop", "flag", 90.0, 80.0),  # an override in d2
            ("f", "d1", "ingest", "malformed_json", "reject", None, None),
        ]
    )
    decisions = _decisions(
        [
            {"sample_id": "a", "dataset": "d1", "decision": "reject"},
            {"sample_id": "a", "dataset": "d1", "decision": "keep"},  # the latest wins
            {"sample_id": "b", "dataset": "d1", "decision": "reject"},
            {"dataset": "d2", "rule": "tail_loop", "decision": "keep"},
        ]
    )
    lessons = {(r.rule, r.threshold): r for r in rule_lessons(ledger, decisions)}
    assert set(lessons) == {("tail_loop", 10.0), ("tail_loop", 80.0)}  # no ingest rule
    d1 = lessons[("tail_loop", 10.0)]
    assert (d1.samples, d1.reviewed, d1.kept, d1.rejected) == (3, 2, 1, 1)
    assert d1.precision == 0.5 and d1.kept_share == 0.5 and d1.direction == "above"
    assert (d1.suggested, d1.errors_now, d1.errors_suggested) == (12.0, 1, 0)
    d2 = lessons[("tail_loop", 80.0)]
    assert d2.reviewed == 0 and d2.suggested is None and d2.rule_decisions == 1


def test_judge_agreement_counts():
    decisions = _decisions(
        [
            {"sample_id": s, "dataset": "d", "decision": d}
            for s, d in [
                ("a", "keep"),
                ("b", "keep"),
                ("c", "reject"),
                ("d", "reject"),
                ("e", "keep"),
            ]
        ]
    )
    judge = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d", "e", "z"],
            "decision": ["keep", "reject", "reject", "reject", "review", "keep"],
        }
    )
    j = judge_agreement(decisions, judge)
    assert (j.keep_keep, j.keep_reject, j.reject_keep, j.reject_reject) == (1, 1, 0, 2)
    assert j.judge_review == 1 and j.n == 4 and j.agreement == 0.75
    assert j.kappa == pytest.approx(cohen_kappa(1, 1, 0, 2))
    assert judge_agreement(decisions, None) is None


def test_the_report_shows_what_review_teaches(planted_run, run_copy, tmp_path):
    path = run_copy(planted_run[0])
    ids = planted_run[1]
    html = write_report(path, tmp_path / "before.html").path.read_text()
    assert "What review teaches" in html and "no per-sample review decisions yet" in html
    run = RunFolder(path)
    add_decisions(
        run,
        [
            {
                "sample_id": ids["many"][k],
                "dataset": "chart_qa",
                "decision": "keep" if k < 2 else "reject",
            }
            for k in range(5)
        ],
    )
    add_decisions(run, [{"sample_id": ids["low"][0], "dataset": "chart_qa", "decision": "keep"}])
    html = write_report(path, tmp_path / "after.html").path.read_text()
    section = html.split('<h2 id="lessons">', 1)[1].split("<h2>", 1)[0]
    row = section.split("filter / many_rule</td>", 1)[1].split("</tr>", 1)[0]
    cells = [x.split("<", 1)[0] for x in row.split('class="num">')[1:]]
    assert cells[:5] == ["8", "5", "2", "3", "60.0%"] and cells[6] == "1"
    assert "judge agreement on 6 reviewed samples: 33.3%; Cohen's kappa -0.3333" in section
    assert not [t for t, _ in parse(section).tags if t == "script"]
