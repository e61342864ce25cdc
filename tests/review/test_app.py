"""``curate review --serve``'s routes through Starlette's TestClient: the queue and its filters,
the sample view, images (by sample id, from inside the dataset roots only), decisions and undo
persisted through the shared decision module under the run lock, and the safety checks
(escaping, CSP, same-origin token, host and URL token)."""

from __future__ import annotations

import os

import polars as pl
import pyarrow as pa
import pytest
from PIL import Image
from starlette.testclient import TestClient

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from curate.core.records import LedgerEntry, ledger_table
from curate.core.status import current_decisions, load_decisions, status_totals
from curate.review.app import CSRF_HEADER, create_app, state_of
from curate.review.data import ReviewData
from tests.conftest import mark_planted
from tests.stages.report.conftest import HOSTILE, HOSTILE_CONVERSATION, make_hostile_conversation
from tests.stages.report.test_html import parse


def client(run: RunFolder, **kw) -> tuple[TestClient, str]:
    app = create_app(ReviewData(run), hosts=("testserver",), lock_wait_s=0.2, **kw)
    return TestClient(app), state_of(app).csrf


def decide(c: TestClient, csrf: str, **body):
    return c.post("/api/decide", json=body, headers={CSRF_HEADER: csrf})


def test_page_shows_the_queue_sorted_by_rule_then_dataset(review_copy):
    run, ids = review_copy
    c, _ = client(run)
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["referrer-policy"] == "no-referrer"
    q = c.get("/api/queue").json()
    assert q["total"] == 10 and q["reviewed"] == 0
    order = [(it["rule"], it["dataset"]) for it in q["items"]]
    assert order == sorted(order, key=lambda x: (x[0], x[1]))  # all filter rules: by name
    assert [it["id"] for it in q["items"]][0] == ids["flagged"][0]
    assert {r["rule"]: r["remaining"] for r in q["per_rule"]} == {
        "duplicate_lines": 1,
        "many_rule": 8,
        "zero_run": 1,
    }
    # the first sample awaiting review is on the page, with its tile grid and judge chart
    p = parse(r.text)
    cards = [a for t, a in p.tags if t == "div" and "card" in a.get("class", "").split()]
    assert cards[0]["data-sample"] == ids["flagged"][0]
    assert ("svg", {"class": "grid"}) in [(t, {"class": a.get("class")}) for t, a in p.tags]
    assert "judge quality: score 8" in r.text and "P(8) = " in r.text
    # no inline script or style anywhere: the CSP would block them
    scripts = [a for t, a in p.tags if t == "script"]
    assert all(a.get("src") or a.get("type") == "application/json" for a in scripts)
    assert not [a for _, a in p.tags if "style" in a] and "<style" not in r.text


def test_filters_narrow_the_queue(review_copy):
    run, ids = review_copy
    c, _ = client(run)

    def ids_of(**params):
        r = c.get("/api/queue", params=params)
        assert r.status_code == 200, r.text
        return [it["id"] for it in r.json()["items"]]

    assert ids_of(rule="many_rule") == sorted(ids_of(rule="many_rule"), key=ids["many"].index)
    assert set(ids_of(rule="many_rule")) == set(ids["many"])
    assert ids_of(dataset="math_text") == ids["zero"]
    assert ids_of(domain="ocr") == ids["flagged"]
    assert ids_of(stage="score") == []  # nothing the judge flagged
    assert set(ids_of(mode="audit")) == {*ids["hostile"], *ids["low"], *_tokenize_rejects(run)}
    assert ids_of(mode="audit", rule="quality_below_threshold", score_max="2.5") == ids["low"][:1]
    assert set(ids_of(mode="audit", stage="score", score_min="3", score_max="5")) == set(
        ids["low"][1:]
    )
    bad = c.get("/api/queue", params={"score_min": "lots"})
    assert bad.status_code == 400 and "score_min must be a number" in bad.json()["error"]
    assert c.get("/", params={"mode": "everything"}).status_code == 400


def _tokenize_rejects(run: RunFolder) -> set[str]:
    ledger = pl.from_arrow(run.ledger("tokenize"))
    return set(ledger.filter(pl.col("severity") == "reject")["sample_id"])


def test_decisions_are_persisted_with_the_clis_code_and_undone(review_copy):
    run, ids = review_copy
    c, csrf = client(run)
    flagged, many = ids["flagged"][0], ids["many"]
    before = status_totals(run)
    r = decide(c, csrf, sample_id=flagged, decision="keep", note="fine <b>really</b>")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "keep" and body["scope"] == "sample"
    (row,) = load_decisions(run).to_dicts()  # on disk at once
    assert (row["sample_id"], row["dataset"], row["decision"]) == (flagged, "doc_ocr", "keep")
    assert row["note"] == "fine <b>really</b>" and row["decided_at"] == body["decided_at"]
    assert status_totals(run)["flag"] == before["flag"] - 1
    # the rest of a rule in a dataset: a per-rule decision, as `curate review --rule` records
    r = decide(c, csrf, dataset="chart_qa", rule="many_rule", decision="reject")
    assert r.status_code == 200 and r.json()["scope"] == "rule"
    rule_at = r.json()["decided_at"]
    q = c.get("/api/queue", params={"rule": "many_rule"}).json()
    assert q["reviewed"] == 8 and {it["status"] for it in q["items"]} == {"reject"}
    # undo the per-rule decision: the eight are awaiting review again
    r = c.post(
        "/api/undo",
        json={"dataset": "chart_qa", "rule": "many_rule", "decided_at": rule_at},
        headers={CSRF_HEADER: csrf},
    )
    assert r.status_code == 200 and r.json()["removed"] == 1
    assert c.get("/api/queue", params={"rule": "many_rule"}).json()["reviewed"] == 0
    # undo a sample decision: its earlier decision is in force again
    first = decide(c, csrf, sample_id=many[0], decision="keep").json()
    second = decide(c, csrf, sample_id=many[0], decision="reject").json()
    r = c.post(
        "/api/undo",
        json={"sample_id": many[0], "decided_at": second["decided_at"]},
        headers={CSRF_HEADER: csrf},
    )
    assert r.status_code == 200 and r.json()["status"] == "keep"
    cur = current_decisions(run)
    assert cur.filter(pl.col("sample_id") == many[0])["decided_at"][0] == first["decided_at"]
    # undoing it again: nothing left to withdraw, said so
    again = c.post(
        "/api/undo",
        json={"sample_id": many[0], "decided_at": second["decided_at"]},
        headers={CSRF_HEADER: csrf},
    )
    assert again.status_code == 409 and "already undone" in again.json()["error"]
    assert len(load_decisions(run)) == 2  # flagged keep, many[0] keep


def test_bad_decisions_are_refused_and_nothing_is_written(review_copy, ingested_run):
    run, ids = review_copy
    c, csrf = client(run)
    ingest_reject = pl.from_arrow(run.ledger("ingest"))["sample_id"][0]
    cases = [
        ({"sample_id": "0000000000000000", "decision": "keep"}, 400, "no such sample"),
        ({"sample_id": ingest_reject, "decision": "keep"}, 400, "rejected at ingest"),
        ({"sample_id": ids["flagged"][0], "decision": "maybe"}, 400, "keep or reject"),
        ({"dataset": "code_text", "rule": "many_rule", "decision": "keep"}, 400, "no ledger rows"),
        ({"decision": "keep"}, 400, "name a sample_id"),
        ({"sample_id": ids["flagged"][0], "decision": "keep", "note": "x" * 3000}, 400, "note"),
    ]
    for body, status, message in cases:
        r = decide(c, csrf, **body)
        assert r.status_code == status and message in r.json()["error"], (body, r.text)
    assert load_decisions(run).is_empty()


def test_posts_need_the_same_origin_token(review_copy):
    run, ids = review_copy
    c, csrf = client(run)
    body = {"sample_id": ids["flagged"][0], "decision": "reject"}
    assert c.post("/api/decide", json=body).status_code == 403  # no token
    stale = c.post("/api/decide", json=body, headers={CSRF_HEADER: "from-an-old-server"})
    assert stale.status_code == 403 and stale.json()["stale_token"] is True
    assert c.get("/api/token").json() == {"csrf": csrf}  # what the page asks for then
    assert c.post("/api/decide", json=body, headers={CSRF_HEADER: "guess"}).status_code == 403
    cross = {CSRF_HEADER: csrf, "origin": "http://evil.example"}
    assert c.post("/api/decide", json=body, headers=cross).status_code == 403
    site = {CSRF_HEADER: csrf, "sec-fetch-site": "cross-site"}
    assert c.post("/api/decide", json=body, headers=site).status_code == 403
    form = c.post("/api/decide", data=body, headers={CSRF_HEADER: csrf})  # a form post
    assert form.status_code == 415
    assert c.get("/api/decide").status_code == 405
    assert load_decisions(run).is_empty()
    same = {CSRF_HEADER: csrf, "origin": "http://testserver", "sec-fetch-site": "same-origin"}
    assert c.post("/api/decide", json=body, headers=same).status_code == 200


def test_a_decision_waits_for_the_run_lock_and_is_never_half_written(review_copy):
    run, ids = review_copy
    c, csrf = client(run)
    with RunFolder(run.path).lock():  # another curate process works on the run
        r = decide(c, csrf, sample_id=ids["zero"][0], decision="keep")
        assert r.status_code == 409 and r.json()["retry"] is True
        assert "in use by another curate process" in r.json()["error"]
        assert load_decisions(run).is_empty()
    r = decide(c, csrf, sample_id=ids["zero"][0], decision="keep")  # the page's retry
    assert r.status_code == 200 and len(load_decisions(run)) == 1


def test_the_app_sees_decisions_the_cli_wrote(review_copy):
    from typer.testing import CliRunner

    from curate.cli.main import app

    run, ids = review_copy
    c, _ = client(run)
    assert c.get("/api/queue").json()["reviewed"] == 0
    result = CliRunner().invoke(
        app, ["review", "--run", str(run.path), "--sample", ids["zero"][0], "--reject"]
    )
    assert result.exit_code == 0, result.output
    q = c.get("/api/queue").json()
    assert q["reviewed"] == 1
    assert {it["id"]: it["status"] for it in q["items"]}[ids["zero"][0]] == "reject"


def test_hostile_text_is_escaped_everywhere(review_copy):
    run, ids = review_copy
    hostile = ids["hostile"][0]
    make_hostile_conversation(run, hostile)
    c, csrf = client(run)
    decide(c, csrf, sample_id=hostile, decision="keep", note='<img src=x onerror="alert(5)">')
    for path, params in (("/", {"mode": "audit", "sample": hostile}), (f"/sample/{hostile}", {})):
        r = c.get(path, params=params)
        assert r.status_code == 200
        p = parse(r.text)
        assert all(not k.startswith("on") for _, attrs in p.tags for k in attrs)
        assert not [a for t, a in p.tags if t == "img" and a.get("src") == "x"]
        assert not [
            a
            for t, a in p.tags
            if t == "script" and not a.get("src") and a.get("type") != "application/json"
        ]
        text = "".join(p.text)
        assert HOSTILE in text  # the ledger detail, shown as text
        assert HOSTILE_CONVERSATION.split(" NUL")[0] in text  # the answer, shown as text
        assert "NUL\\x00 bell\\x07" in r.text  # control characters made visible
        assert '<img src=x onerror="alert(5)">' in text  # the note
    # the queue's JSON in the page cannot close its script element
    page = c.get("/", params={"mode": "audit"}).text
    block = page.split('id="queue-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block


def test_images_are_served_by_sample_id_from_inside_the_roots_only(review_copy, tmp_path):
    run, ids = review_copy
    sid = ids["flagged"][0]
    c, _ = client(run)
    thumb = c.get(f"/thumb/{sid}/0")
    full = c.get(f"/image/{sid}/0")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    import io

    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 240
    assert max(Image.open(io.BytesIO(full.content)).size) > 240
    for url in (
        f"/image/{sid}/1",  # no second image
        f"/image/{sid}/-1",
        "/image/nosuchsample/0",
        "/image/..%2F..%2F..%2Fetc%2Fpasswd/0",
        "/image/../../etc/passwd",
        "/static/../../pyproject.toml",
        "/static/..%2F..%2Fpyproject.toml",
        "/static/card.html",
    ):
        r = c.get(url)
        assert r.status_code == 404, url
        assert b"root:" not in r.content and b"[project]" not in r.content
    # a sample whose annotation points outside the dataset roots, directly or by a symlink
    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(secret)
    root = ReviewData(run).roots[0]
    os.symlink(secret, root / "innocent.png")
    _repoint_images(run, sid, [str(secret), str(root / "innocent.png"), "/etc/passwd"])
    c, _ = client(run)
    for k in range(3):
        assert c.get(f"/image/{sid}/{k}").status_code == 404
        assert c.get(f"/thumb/{sid}/{k}").status_code == 404
    assert "image 1 not shown" not in c.get(f"/sample/{sid}").text  # linked, not inlined


def _repoint_images(run: RunFolder, sample_id: str, paths: list[str]) -> None:
    for shard in run.shards("samples"):
        table = run.read("samples", [shard])
        rows = table.to_pylist()
        for r in rows:
            if r["sample_id"] == sample_id:
                r["images"] = [{"path": p, "width": 32, "height": 32} for p in paths]
        write_parquet_atomic(
            pa.Table.from_pylist(rows, schema=table.schema), run.shard_path("samples", shard)
        )


def test_a_duplicate_is_shown_beside_the_sample_it_copies(review_copy):
    run, ids = review_copy
    samples = pl.from_arrow(run.read("samples").select(["sample_id", "dataset", "line"]))
    kept, dup = samples.filter(pl.col("dataset") == "general_vqa").sort("line").head(2).rows()
    detail = f"near-duplicate of {kept[0]} ({kept[1]}:{kept[2]}), estimated Jaccard 0.91"
    entry = LedgerEntry(
        dup[0], dup[1], dup[2], "neardup", "near_duplicate", "flag", 0.91, 0.8, detail
    )
    write_parquet_atomic(ledger_table([entry]), run.ledger_path("neardup", "x"))
    mark_planted(run, "neardup", "x")
    c, _ = client(run)
    r = c.get(f"/sample/{dup[0]}")
    p = parse(r.text)
    cards = [a for t, a in p.tags if t == "div" and "card" in a.get("class", "").split()]
    assert [(a["data-sample"], a["class"]) for a in cards] == [
        (dup[0], "card current"),
        (kept[0], "card partner"),
    ]
    assert "the sample it copies" in r.text
    assert c.get(f"/sample/{ids['zero'][0]}").text.count('class="card') == 1
    assert c.get("/sample/nosuchsample").status_code == 404


def test_the_looped_span_is_highlighted(review_copy):
    run, ids = review_copy
    sid = ids["zero"][0]
    # the planted zero_run flag (threshold 24) on an answer with a run of 40 zeros
    rows = run.read("samples").to_pylist()
    answer = next(r for r in rows if r["sample_id"] == sid)["conversations"][-1]["text"]
    _set_answer(run, sid, answer + " 1" + "0" * 40 + " end")
    c, _ = client(run)
    html = c.get(f"/sample/{sid}").text
    assert "<mark>" + "0" * 40 + "</mark>" in html


def _set_answer(run: RunFolder, sample_id: str, text: str) -> None:
    for shard in run.shards("samples"):
        table = run.read("samples", [shard])
        rows = table.to_pylist()
        for r in rows:
            if r["sample_id"] == sample_id:
                r["conversations"][-1]["text"] = text
        write_parquet_atomic(
            pa.Table.from_pylist(rows, schema=table.schema), run.shard_path("samples", shard)
        )


def test_what_review_teaches_is_on_the_page(review_copy):
    run, ids = review_copy
    c, csrf = client(run)
    assert "no per-sample review decisions yet" in c.get("/lessons").text
    many = ids["many"]  # many_rule values 0..7, threshold 0, fails above
    for k, d in enumerate(["keep", "keep", "reject", "reject", "reject"]):
        assert decide(c, csrf, sample_id=many[k], decision=d).status_code == 200
    decide(c, csrf, sample_id=ids["low"][0], decision="keep")  # the judge rejected it
    html = c.get("/lessons").text
    row = html.split("filter / many_rule</td>", 1)[1].split("</tr>", 1)[0]
    cells = [x.split("<", 1)[0] for x in row.split('class="num">')[1:]]
    # samples, reviewed, kept, rejected, precision, threshold, suggested, misjudged
    assert cells[:5] == ["8", "5", "2", "3", "60.0%"]
    assert cells[5].startswith("0 (fails above") and cells[6] == "1" and cells[7] == "2 → 0"
    # judge: 5 many_rule samples the judge kept (2 kept, 3 rejected by the reviewer), one low
    # sample it rejected and the reviewer kept
    assert "judge agreement on 6 reviewed samples: 33.3%" in html
    assert "Cohen's kappa -0.3333" in html


def test_a_token_guards_a_server_bound_beyond_loopback(review_copy):
    run, _ = review_copy
    app = create_app(ReviewData(run), token="s3cret", hosts=None)
    c = TestClient(app)
    r = c.get("/")
    assert r.status_code == 403 and "token" in r.text
    assert c.get("/?token=wrong").status_code == 403
    assert c.get("/static/review.js").status_code == 403
    r = c.get("/?token=s3cret")
    assert r.status_code == 200 and "HttpOnly" in r.headers["set-cookie"]
    assert c.get("/static/review.js").status_code == 200  # the cookie carries it on


def test_unknown_host_names_are_refused(review_copy):
    """A loopback server answers loopback names only (DNS rebinding)."""
    run, _ = review_copy
    app = create_app(ReviewData(run))  # the default: loopback hosts only
    c = TestClient(app, base_url="http://127.0.0.1:8765")
    assert c.get("/").status_code == 200
    assert TestClient(app, base_url="http://localhost:8765").get("/").status_code == 200
    evil = TestClient(app, base_url="http://evil.example:8765")
    assert evil.get("/").status_code == 400
    assert evil.get("/api/queue").status_code == 400


def test_static_files_and_fragments(review_copy):
    run, ids = review_copy
    c, _ = client(run)
    assert "function" in c.get("/static/review.js").text
    css = c.get("/static/card.css")
    assert css.status_code == 200 and ".card{" in css.text
    assert c.get("/static/review.css").status_code == 200
    assert c.get("/favicon.ico").status_code == 204
    panel = c.get("/panel", params={"rule": "zero_run"}).text
    assert "filter / zero_run" in panel and "many_rule" not in panel


def test_a_second_review_server_on_the_run_is_refused(review_copy):
    from curate.review.serve import ReviewServerBusy, open_server

    run, _ = review_copy
    with open_server(run, port=0) as first:
        assert first.url.startswith("http://127.0.0.1:") and "token" not in first.url
        with pytest.raises(ReviewServerBusy, match="already works on"), open_server(run, port=0):
            pass
    with open_server(run, port=0):  # the first one gone: fine again
        pass


def test_serving_beyond_loopback_puts_a_token_in_the_url(review_copy):
    from curate.review.serve import open_server

    run, _ = review_copy
    with open_server(run, host="0.0.0.0", port=0) as server:
        assert "?token=" in server.url and len(server.url.split("token=")[1]) >= 24


def test_the_card_template_is_the_reports(review_copy):
    """The app's sample view and the static report render a sample with one template (the
    report's card.html; the app has none of its own): the same failure table and turns."""
    import re
    from pathlib import Path

    import curate.review
    from curate.stages.report.html import sample_card_html

    assert not (Path(curate.review.__file__).parent / "templates" / "card.html").exists()
    run, ids = review_copy
    sid = ids["flagged"][0]
    data = ReviewData(run)
    c, _ = client(run)
    app_html = c.get(f"/sample/{sid}").text
    report_html = sample_card_html({**data.sample(sid), "status": "flag"}, data.failures(sid))

    def pieces(html: str) -> list[str]:
        return re.findall(
            r'<table class="fails">.*?</table>|<div class="turn.*?</pre></div>', html, re.S
        )

    assert len(pieces(report_html)) == 3  # two turns and the failure table
    assert pieces(app_html) == pieces(report_html)


def test_the_queue_follows_a_stage_that_ran_since(review_copy):
    run, ids = review_copy
    c, _ = client(run)
    assert c.get("/api/queue").json()["total"] == 10
    s = pl.from_arrow(run.read("samples").select(["sample_id", "dataset", "line"]))
    sid, ds, line = s.filter(pl.col("dataset") == "code_text").row(0)
    entry = LedgerEntry(sid, ds, line, "neardup", "near_duplicate", "flag", 0.9, 0.8, "x")
    write_parquet_atomic(ledger_table([entry]), run.ledger_path("neardup", "x"))
    q = c.get("/api/queue").json()
    assert q["total"] == 11 and sid in {it["id"] for it in q["items"]}


def test_templates_and_static_files_ship_in_the_wheel():
    """pyproject's package data names every template and static file the app and report read."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import curate

    root = Path(curate.__file__).parent
    data = tomllib.loads((root.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = data["package-data"]
    shipped = []
    for folder in ("stages/report/templates", "review/templates", "review/static"):
        for f in sorted((root / folder).iterdir()):
            package = "curate." + str(f.parent.parent.relative_to(root)).replace("/", ".")
            rel = f"{f.parent.name}/{f.name}"
            assert any(fnmatch.fnmatch(rel, g) for g in globs.get(package, [])), (package, rel)
            shipped.append(rel)
    assert {"templates/card.html", "templates/lessons.html", "static/review.js"} <= set(shipped)
