"""Thumbnails (safe for unreadable images, never outside the dataset roots) and sample cards
(every text escaped)."""

from __future__ import annotations

import base64
import io
import os
from html.parser import HTMLParser

from PIL import Image

from curate.stages.report.html import (
    PROB_BAR_PX,
    PROB_GAP_PX,
    PROB_PLOT_PX,
    cards_html,
    fmt_number,
    loop_marks,
    prob_chart,
    sample_card_html,
    segments,
    thumbnail_data_uri,
)


def _jpeg(path, size=(640, 480), color=(200, 40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def _decode(uri: str) -> Image.Image:
    prefix, data = uri.split(",", 1)
    assert prefix == "data:image/jpeg;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_thumbnail_of_a_readable_image(tmp_path):
    img = _jpeg(tmp_path / "root" / "a.jpg")
    uri = thumbnail_data_uri(img, 100, roots=[tmp_path / "root"])
    thumb = _decode(uri)
    assert max(thumb.size) == 100 and thumb.size == (100, 75)
    png = tmp_path / "root" / "b.png"
    Image.new("RGBA", (50, 20), (0, 0, 255, 128)).save(png)
    assert _decode(thumbnail_data_uri(png, 100, roots=[tmp_path / "root"])).size == (50, 20)


def test_unreadable_images_give_none(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "empty.jpg").write_bytes(b"")
    (root / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    good = _jpeg(root / "good.jpg")
    (root / "truncated.jpg").write_bytes(good.read_bytes()[:200])
    (root / "folder.jpg").mkdir()
    for name in ("empty.jpg", "garbage.jpg", "truncated.jpg", "folder.jpg", "missing.jpg"):
        assert thumbnail_data_uri(root / name, 64, roots=[root]) is None, name
    assert thumbnail_data_uri(None, 64, roots=[root]) is None


def test_never_reads_outside_the_roots(tmp_path):
    root = tmp_path / "root"
    outside = _jpeg(tmp_path / "secret" / "s.jpg")
    _jpeg(root / "ok.jpg")
    assert thumbnail_data_uri(outside, 64, roots=[root]) is None
    assert thumbnail_data_uri(root / ".." / "secret" / "s.jpg", 64, roots=[root]) is None
    os.symlink(outside, root / "link.jpg")
    assert thumbnail_data_uri(root / "link.jpg", 64, roots=[root]) is None
    assert thumbnail_data_uri(root / "ok.jpg", 64, roots=[]) is None  # no roots: nothing read
    assert thumbnail_data_uri(root / "ok.jpg", 64, roots=[root]) is not None


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    return p


HOSTILE = '<script>alert(1)</script>"><img src=x onerror="alert(2)">'


def test_sample_card_escapes_everything(tmp_path):
    img = _jpeg(tmp_path / "root" / 'we"ird<name>.jpg')
    sample = {
        "sample_id": 'id"><script>alert(3)</script>',
        "dataset": "<b>ds</b>",
        "line": 7,
        "kind": "image",
        "status": 'flag" onmouseover="alert(4)',
        "conversations": [{"role": "human", "text": HOSTILE}, {"role": "gpt", "text": "ok"}],
        "images": [{"path": str(img)}, {"path": "/nope/missing.jpg"}],
    }
    rows = [
        {
            "stage": "filter",
            "rule": "<i>r</i>",
            "severity": "reject",
            "value": 150.0,
            "threshold": 100.0,
            "detail": HOSTILE,
        }
    ]
    html = sample_card_html(sample, rows, roots=[tmp_path / "root"], max_side=64)
    p = parse(html)
    assert not [t for t, _ in p.tags if t in ("script", "b", "i")]
    assert all(not k.startswith("on") for _, attrs in p.tags for k in attrs)
    imgs = [a for t, a in p.tags if t == "img"]
    assert len(imgs) == 1 and imgs[0]["src"].startswith("data:image/jpeg;base64,")
    assert imgs[0]["alt"] == 'we"ird<name>.jpg'  # escaped in the attribute, intact when parsed
    text = "".join(p.text)
    assert HOSTILE in text  # shown as text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "150" in text and "100" in text and "image 2 not shown" in text


def test_cards_cap_and_ingest_rejects():
    rows = [
        {
            "sample_id": f"s{i}",
            "dataset": "d",
            "line": i,
            "failures": [
                {
                    "stage": "ingest",
                    "rule": "malformed_json",
                    "severity": "reject",
                    "value": None,
                    "threshold": None,
                    "detail": "bad",
                }
            ],
        }
        for i in range(5)
    ]
    html = cards_html(rows, limit=3)
    assert html.count('class="card"') == 3 and "2 more not shown" in html
    assert "rejected at ingest" in html


def test_fmt_number():
    assert fmt_number(None) == "–" and fmt_number(3.0) == "3" and fmt_number(12000) == "12,000"
    assert fmt_number(0.91666) == "0.9167" and fmt_number(float("nan")) == "nan"


def test_loop_marks_from_the_details():
    turns = [("human", "Count please."), ("gpt", "1 2 3 " + "la " * 20 + "\n")]
    tail = {
        "rule": "tail_loop",
        "detail": "loops = 20 (> 8): turn 1 ends with «la » (3 chars) repeated 20.0x over its "
        "last 59 chars",
    }
    (span,) = loop_marks(turns, [tail])[1]
    assert turns[1][1][span[0] : span[1]] == ("la " * 20).rstrip()
    quoted = {"rule": "repeated_paragraph", "detail": "x: turn 1 gives «1 2 3» twice in a row"}
    assert loop_marks(turns, [quoted]) == {1: [(0, 5)]}
    short = {"rule": "x", "detail": "«la»"}  # too short to search for
    assert loop_marks(turns, [short]) == {}
    clipped = {"rule": "x", "detail": "«la la la…»"}  # a span the filters cut
    assert len(loop_marks(turns, [clipped])[1]) == 6  # "la la la" six times, not overlapping
    zeros = [("gpt", "a 10000 b " + "0" * 30 + " c")]
    assert loop_marks(zeros, [{"rule": "zero_run", "threshold": 24.0}]) == {0: [(10, 40)]}
    assert loop_marks(turns, [{"rule": "char_run", "threshold": None}]) == {}


def test_segments_mark_and_cut():
    assert segments("abcdef", [(1, 3)]) == [("a", ""), ("bc", "mark"), ("def", "")]
    assert segments("abcdef", [(4, 9), (0, 1), (3, 5)]) == [
        ("a", "mark"),
        ("bc", ""),
        ("def", "mark"),
    ]
    text = "h" * 100 + "LOOP" * 50
    out = segments(text, [(100, 300)], max_chars=60)  # the head and the loop's end are kept
    assert out[0] == ("h" * 40, "") and out[1][1] == "cut" and "240 characters" in out[1][0]
    assert out[2] == ("LOOP" * 5, "mark") and len(out) == 3
    assert "".join(p for p, k in out if k != "cut") == text[:40] + text[-20:]


def test_prob_chart_geometry():
    probs = [0.0] * 11
    probs[8], probs[3] = 0.75, 0.25
    c = prob_chart("quality", probs, score=8, expected=6.75, threshold=7)
    assert len(c["bars"]) == 11 and c["width"] == 11 * (PROB_BAR_PX + PROB_GAP_PX) + 1
    b8, b3 = c["bars"][8], c["bars"][3]
    assert b8["h"] == 0.75 * PROB_PLOT_PX and b8["y"] == 2 + PROB_PLOT_PX - b8["h"]
    assert b8["cls"] == "above top" and b8["x"] == 8 * (PROB_BAR_PX + PROB_GAP_PX) + 1
    assert b3["cls"] == "below" and b3["p"] == "0.250"
    assert c["summary"] == "score 8 · expected 6.75 · threshold 7"


def test_card_draws_the_tile_grid_and_highlights_the_loop(tmp_path):
    from curate.stages.report.html import card_context, data_uri_images, render_card

    img = _jpeg(tmp_path / "root" / "a.jpg")
    sample = {
        "sample_id": "s",
        "kind": "image",
        "conversations": [{"role": "gpt", "text": "x " + "ab" * 40}],
        "images": [{"path": str(img)}],
    }
    fails = [
        {
            "rule": "tail_loop",
            "detail": "turn 0 ends with «ab» (2 chars) repeated 40.0x over its last 80 chars",
        }
    ]
    c = card_context(
        sample,
        fails,
        images=data_uri_images([tmp_path / "root"], 64),
        grids=[{"cols": 3, "rows": 2, "thumbnail": True}],
    )
    html = render_card(c)
    p = parse(html)
    lines = [a for t, a in p.tags if t == "line"]
    assert len(lines) == 2 + 1  # 2 vertical, 1 horizontal
    assert [a for t, a in p.tags if t == "svg"][0]["viewbox"] == "0 0 3 2"
    assert "3×2 tiles + thumbnail = 7" in html
    assert "<mark>" + "ab" * 40 + "</mark>" in html
