"""The review page in a real browser: headless Debian Chromium driven by Playwright (no browser
download: ``executable_path``), under the app's Content-Security-Policy. Three samples are
reviewed with the keyboard (one decision made while another process holds the run lock: it
waits, and is saved once the lock is free), one is undone; then decisions.parquet and what
``curate pack`` packs are checked. A screenshot of the page is kept (``review.png``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from curate.core.folder import RunFolder
from curate.core.status import current_decisions
from curate.review.serve import open_server
from curate.stages.pack.config import PackConfig
from tests.stages.report.conftest import pack

CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
]


def _saved(page) -> None:
    page.wait_for_selector('#save-state[data-state="saved"]', timeout=15_000)


def _showing(page, sample_id: str) -> None:
    page.wait_for_selector(f'#sample .card.current[data-sample="{sample_id}"]', timeout=15_000)


def test_keyboard_review_in_chromium(review_copy, tokenizer_dir, tmp_path):
    run, ids = review_copy
    flagged, many, zero = ids["flagged"][0], ids["many"], ids["zero"][0]
    problems: list[str] = []
    with open_server(run, port=0, lock_wait_s=0.2) as server:
        thread = server.start_thread()
        try:
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.on("console", lambda m: problems.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
                page.goto(server.url)
                _showing(page, flagged)  # the queue starts at the first rule's first sample
                assert "1 of 10" in page.inner_text("#position")

                page.keyboard.press("k")  # 1: keep the flagged sample
                _showing(page, many[0])
                page.keyboard.press("c")  # a note, then back to the keys
                page.keyboard.type("chart reads fine")
                page.keyboard.press("Enter")
                page.keyboard.press("k")  # 2: keep many[0], with the note
                _showing(page, many[1])
                _saved(page)

                with RunFolder(run.path).lock():  # another curate process holds the run
                    page.keyboard.press("x")  # 3: reject many[1]: queued, not lost
                    page.wait_for_selector('#save-state[data-state="waiting"]', timeout=15_000)
                    assert "retry" in page.inner_text("#save-state")
                    assert many[1] not in _decided(run)
                _saved(page)  # the lock is free: the page's retry saved it
                assert _decided(run)[many[1]] == "reject"

                page.keyboard.press("u")  # undo the reject: many[1] is awaiting review again
                _showing(page, many[1])
                _saved(page)
                page.wait_for_selector("#panel >> text=2 reviewed", timeout=15_000)
                assert "awaiting review" in page.inner_text("#position")
                assert "8 remaining" in page.inner_text("#position")

                assert "decided" not in page.inner_text("#sample")
                page.keyboard.press("p")  # back to many[0]: its decision and note are shown
                _showing(page, many[0])
                assert "decided: keep — chart reads fine" in page.inner_text("#sample")
                assert "what review teaches" in page.inner_text("#lessons")
                shot = tmp_path / "review.png"
                page.screenshot(path=str(shot), full_page=True)
                page.keyboard.press("f")  # full size with the tile grid
                page.wait_for_selector("#viewer:not([hidden])")
                page.wait_for_timeout(500)  # for the image to decode
                lines = page.locator("#viewer-grid line").count()
                page.screenshot(path=str(tmp_path / "viewer.png"))
                page.keyboard.press("Escape")

                # the rest of zero_run in math_text, rejected with one key (and a second to
                # confirm): a per-rule decision, as `curate review --rule` records it
                page.goto(server.url + f"?sample={zero}")
                _showing(page, zero)
                page.keyboard.press("X")
                assert "reject the rest of rule zero_run in dataset math_text" in (
                    page.inner_text("#confirm")
                )
                page.keyboard.press("X")
                _saved(page)
                page.wait_for_selector("#panel >> text=3 reviewed", timeout=15_000)
                browser.close()
        finally:
            server.stop()
            thread.join(timeout=10)
    # Nothing the CSP blocked, no script error; the 409 is the decision made while locked.
    problems = [m for m in problems if "409 (Conflict)" not in m]
    assert not problems, problems
    assert shot.stat().st_size > 20_000 and lines >= 2
    shutil.copy(shot, run.path / "review.png")  # the artifact, beside the run it shows
    print(f"screenshot: {shot}")

    decided = current_decisions(run).select("sample_id", "dataset", "rule", "decision", "note")
    assert sorted(decided.rows(), key=str) == sorted(
        [
            (flagged, "doc_ocr", None, "keep", None),
            (many[0], "chart_qa", None, "keep", "chart reads fine"),
            (None, "math_text", "zero_run", "reject", None),
        ],
        key=str,
    )
    # pack takes the two kept samples, not the undone one nor the other flags
    summary = pack(run, PackConfig(max_tokens=8192, max_tiles=40), tokenizer_dir)
    assert summary.redone == ["all"]
    packed = {s for p in run.read("packs").to_pylist() for s in p["sample_ids"]}
    assert {flagged, many[0]} <= packed
    assert not set(many[1:]) & packed and zero not in packed


def _decided(run: RunFolder) -> dict[str, str]:
    d = current_decisions(run)
    return dict(d.filter(d["sample_id"].is_not_null()).select("sample_id", "decision").rows())
