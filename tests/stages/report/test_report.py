"""`curate report`: one self-contained HTML file, safe against hostile sample text, capped
gallery, the pipeline's last step; and a headless Chromium screenshot of it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from curate.cli.main import app
from curate.core.folder import RunFolder
from curate.pipeline.config import load_pipeline
from curate.stages.report.config import ReportConfig
from curate.stages.report.write import write_report
from tests.conftest import run_stages
from tests.stages.report.conftest import make_hostile_conversation
from tests.stages.report.test_html import parse

runner = CliRunner()
REPO = Path(__file__).resolve().parents[3]
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)


@pytest.fixture(scope="module")
def hostile_report(planted_run, tmp_path_factory):
    """The planted run with a hostile conversation, and its report (gallery cap 5)."""
    path, ids = planted_run
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(path, run)
    make_hostile_conversation(RunFolder(run), ids["hostile"][0])
    result = write_report(run, per_rule=5)
    return run, ids, result, result.path.read_text()


def test_report_is_self_contained(hostile_report):
    run, ids, result, html = hostile_report
    assert result.path == run / "report.html" and result.plots == 3
    p = parse(html)
    srcs = [a.get("src", "") for t, a in p.tags if "src" in a]
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert sum(s.startswith("data:image/png;base64,") for s in srcs) == 3  # the plots
    assert any(s.startswith("data:image/jpeg;base64,") for s in srcs)  # thumbnails
    assert not [t for t, _ in p.tags if t in ("script", "link", "iframe", "object", "embed")]
    hrefs = [a["href"] for t, a in p.tags if t == "a"]
    assert hrefs and all(h.startswith("#") for h in hrefs)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html)
    csp = [a["content"] for t, a in p.tags if a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "script-src 'none'" in csp[0] and "img-src data:" in csp[0]


def test_report_escapes_hostile_text(hostile_report):
    run, ids, result, html = hostile_report
    p = parse(html)
    assert "<script>" not in html and "<img src=x" not in html
    assert all(not k.startswith("on") for _, attrs in p.tags for k in attrs)
    text = "".join(p.text)
    assert '<script>alert(1)</script>"><img src=x onerror="alert(2)">' in text  # conversation
    assert "<script>alert(1)</script>\"><img src=x onerror=alert(2)> run of 'a'" in text  # ledger
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 2


def test_report_shows_control_characters_instead_of_writing_them(hostile_report):
    """HTML forbids NUL and most C0 controls: sample text holding them is shown as \\xNN."""
    run, ids, result, html = hostile_report
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", html)
    assert "NUL\\x00 bell\\x07" in html


def test_gallery_per_rule_with_values_and_cap(hostile_report):
    run, ids, result, html = hostile_report
    assert result.per_rule["filter / many_rule (flag)"] == (5, 8)
    assert result.per_rule["filter / char_run (reject)"] == (1, 1)
    assert result.per_rule["score / quality_below_threshold (reject)"] == (3, 3)
    section = html.split("filter / many_rule (flag): 8 samples", 1)[1].split("<section", 1)[0]
    assert section.count('class="card"') == 5 and "and 3 more samples with this rule" in section
    char = html.split("filter / char_run (reject): 1 sample<", 1)[1].split("<section", 1)[0]
    assert ids["hostile"][0] in char and ">150<" in char and ">100<" in char
    # flagged rules come first in the gallery
    assert html.index("many_rule (flag)</a>") < html.index("char_run (reject)</a>")


def test_report_reads_content_for_the_shown_cards_only(planted_run, tmp_path, monkeypatch):
    """The conversations and images of the samples on cards, in one read; not every sample's
    (which would make the report's memory grow with the run's content)."""
    from curate.stages.report import rows

    path, ids = planted_run
    asked, read_rows = [], rows.read_rows

    def spy(run, table, wanted, columns):
        asked.append((table, sorted(wanted), list(columns)))
        return read_rows(run, table, wanted, columns)

    monkeypatch.setattr(rows, "read_rows", spy)
    result = write_report(path, tmp_path / "r.html", per_rule=2)
    (call,) = asked  # one read for every card
    table, wanted, columns = call
    assert table == "samples" and {"conversations", "images"} <= set(columns)
    assert len(wanted) <= result.shown == sum(shown for shown, _ in result.per_rule.values())
    assert result.per_rule["filter / many_rule (flag)"] == (2, 8)
    assert len(set(wanted) & set(ids["many"])) == 2  # the two shown, not all eight
    html = result.path.read_text()
    assert all(sid in html for sid in wanted)


def _report_pipeline(tmp_path: Path, meta: Path, **report) -> Path:
    """A pipeline file that ingests the demo as the session fixture did, then reports."""
    p = tmp_path / "report.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "run": "unused",  # a command's --run wins
                "meta": str(meta),
                "stages": {"ingest": {"shard_lines": 40}, "report": report},
            }
        )
    )
    return p


def test_report_command_and_default_cap(planted_run, run_copy, demo_dir, tmp_path):
    path = run_copy(planted_run[0])
    out = tmp_path / "r.html"
    pipeline = _report_pipeline(tmp_path, demo_dir / "meta.json")
    args = ["report", "--run", str(path), "--config", str(pipeline), "--set", f"out={out}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out.resolve()) in "".join(result.output.split()) and out.stat().st_size > 10_000
    assert "gallery rules" in result.output
    assert not (path / "report.html").exists()  # out respected, no report in the run
    assert RunFolder(path).stats("report")["report"]["path"] == str(out.resolve())
    # the same inputs again: nothing to redo, the report is where it was
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "report up to date" in " ".join(again.output.split())
    # no run folder there: one line, exit 2
    bad = runner.invoke(app, ["report", "--run", str(tmp_path / "none")])
    assert bad.exit_code == 2 and bad.output.startswith("error:")
    assert "not a run folder" in bad.output and "Traceback" not in bad.output
    assert ReportConfig().per_rule == 24


def test_report_on_an_ingest_only_run(ingested_run, tmp_path):
    result = write_report(ingested_run, tmp_path / "r.html")
    assert result.plots == 1 and result.rules >= 5  # counts only; ingest rejects shown


def test_pipeline_ends_with_the_report(planted_run, run_copy, capsys):
    from types import SimpleNamespace

    from curate.cli.show import show_summaries
    from curate.core.status import add_decisions
    from curate.pipeline.run import build_stages
    from curate.stages.report.stage import ReportStage

    demo = load_pipeline(REPO / "pipelines" / "demo.yaml", check_paths=False)
    assert demo.stages.report == ReportConfig()
    stages = build_stages(demo)
    assert stages[-1].name == "report"
    # the report reads every stage before it: a change anywhere rewrites it
    assert stages[-1].reads == tuple(s.name for s in stages[:-1])

    path = run_copy(planted_run[0])
    reads = ("ingest", "budget", "repeat", "tokenize", "pack")
    report = ReportStage(ReportConfig(per_rule=2), reads)
    summary = run_stages(path, report)["report"]
    assert (path / "report.html").exists() and summary.redone == ["all"]
    show_summaries(SimpleNamespace(run=RunFolder(path)), {"report": summary})
    printed = "".join(capsys.readouterr().out.split())
    assert f"report:{(path / 'report.html').resolve()}" in printed
    counts = summary.report
    assert counts["samples"] == counts["keep"] + counts["reject"] + counts["flag"]
    # + 1: the demo's truncated JPEG, rejected by tokenize (no filter stage decoded it)
    assert counts["flag"] == 10 and counts["reject"] == 1 + 3 + 1
    # at most 2 cards a rule: many_rule shows 2 of 8, quality_below_threshold 2 of 3
    assert counts["rules"] >= 5 and counts["shown"] <= 2 * counts["rules"]
    assert counts["not_shown"] >= 6 + 1
    assert sum(v[0] for v in counts["by_dataset"].values()) == counts["samples"]
    # done stays done; a review decision is one of its inputs
    assert run_stages(path, report)["report"].redone == []
    add_decisions(RunFolder(path), [{"sample_id": planted_run[1]["zero"][0], "decision": "keep"}])
    again = run_stages(path, report)["report"]
    assert again.redone == ["all"] and again.report["flag"] == 9


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_screenshot_shows_the_gallery(hostile_report, tmp_path):
    run, ids, result, html = hostile_report
    shot = tmp_path / "shot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        result.path.resolve().as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    px = np.asarray(img).astype(np.int16)
    assert px.std() > 20  # not blank
    # the gallery is on screen: the orange "flag" badges of its cards (a colour no plot uses)
    orange = (
        (abs(px[..., 0] - 0xE6) < 12)
        & (abs(px[..., 1] - 0x7E) < 12)
        & (abs(px[..., 2] - 0x22) < 12)
    )
    assert orange.sum() > 200
    rows = np.nonzero(orange.any(axis=1))[0]
    assert rows.min() > 1000  # below the summary and the plots, where the gallery starts
    shutil.copy(shot, run / "screenshot.png")  # for a human look when debugging
