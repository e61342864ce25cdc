"""Thumbnails (safe for unreadable images, never outside the dataset roots) and sample cards
(every text escaped)."""

from __future__ import annotations

import base64
import io
import os
from html.parser import HTMLParser

from PIL import Image

from curate.stages.report.html import cards_html, fmt_number, sample_card_html, thumbnail_data_uri


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
