"""HTML pieces for the notebook and the report: image thumbnails and sample cards.

Sample text is hostile until proven otherwise (annotations come from the internet): every
piece of text that reaches HTML, attribute values included, goes through ``html.escape``.
Thumbnails are read only from inside the run's dataset roots, never decoded at full size when
the format allows, and an unreadable image gives ``None`` instead of an exception.
"""

from __future__ import annotations

import base64
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

# Larger files are not thumbnailed (a report must not stall on one huge image).
MAX_THUMBNAIL_FILE_BYTES = 64 * 1024 * 1024
# Decoded pixels allowed when making a thumbnail (after JPEG draft reduction).
MAX_THUMBNAIL_PIXELS = 64 * 1024 * 1024

CARD_CSS = """
.card{border:1px solid #d0d4da;border-radius:6px;padding:10px 12px;margin:10px 0;
 background:#fff;font:13px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;color:#1d2330}
.card .head{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin-bottom:6px}
.card .sid{font-family:ui-monospace,Menlo,Consolas,monospace;font-weight:600}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:11px;
 background:#e8ebf0;color:#333}
.badge.reject{background:#c0392b;color:#fff}.badge.flag{background:#e67e22;color:#fff}
.badge.keep{background:#27ae60;color:#fff}
.thumbs{display:flex;flex-wrap:wrap;gap:6px;margin:6px 0}
.thumbs img{border:1px solid #ccc;border-radius:3px;max-height:160px}
.thumbs .noimg{display:inline-block;padding:8px;border:1px dashed #bbb;font-size:11px;
 color:#666;max-width:220px;word-break:break-all}
.turn{margin:4px 0}.turn .role{font-weight:600;color:#555;font-size:11px;text-transform:uppercase}
.turn pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;padding:6px;
 background:#f6f7f9;border-radius:4px;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;
 max-height:260px;overflow:auto}
table.fails{border-collapse:collapse;margin-top:6px;font-size:12px}
table.fails th,table.fails td{border:1px solid #dde1e6;padding:2px 6px;text-align:left;
 vertical-align:top}
table.fails td.num{text-align:right;font-family:ui-monospace,Menlo,Consolas,monospace}
table.fails td.detail{max-width:560px;word-break:break-word}
"""


def within_roots(path: str | os.PathLike[str], roots: Iterable[str | os.PathLike[str]]) -> bool:
    """Whether ``path`` (symlinks and ``..`` resolved) lies inside one of ``roots``."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    for root in roots:
        try:
            real.relative_to(Path(root).resolve())
            return True
        except (ValueError, OSError, RuntimeError):
            continue
    return False


def thumbnail_data_uri(
    path: str | os.PathLike[str] | None,
    max_side: int = 160,
    *,
    roots: Sequence[str | os.PathLike[str]],
) -> str | None:
    """A JPEG thumbnail of the image at ``path`` as a ``data:`` URI, or None.

    None when the path is outside every dataset root (after resolving symlinks), is not a
    regular file, is too large, or cannot be decoded. ``roots`` is required: pass
    ``RunTables.roots`` (the run's dataset roots).
    """
    if not path or not roots or not within_roots(path, roots):
        return None
    from PIL import Image

    real = Path(path).resolve()
    try:
        if not real.is_file() or real.stat().st_size > MAX_THUMBNAIL_FILE_BYTES:
            return None
        with warnings.catch_warnings(), Image.open(real) as img:
            warnings.simplefilter("ignore")  # DecompressionBombWarning: sizes are checked here
            if img.width * img.height > 16 * MAX_THUMBNAIL_PIXELS:
                return None
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale
            if img.width * img.height > MAX_THUMBNAIL_PIXELS:
                return None
            img.thumbnail((max_side, max_side))
            rgb = img.convert("RGB")
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=80)
    except Exception:  # noqa: BLE001 - any decoder failure means "no thumbnail"
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def fmt_number(x: float | None) -> str:
    """A ledger value or threshold for display: integers without decimals, others 4 digits."""
    if x is None:
        return "–"
    x = float(x)
    if x != x:  # NaN
        return "nan"
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.4g}"


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n… ({len(text) - max_chars:,} more characters)"


def _thumbs_html(
    images: Sequence[dict] | None,
    roots: Sequence[str | os.PathLike[str]],
    max_side: int,
    max_images: int,
    cache: dict[str, str | None] | None,
) -> str:
    if not images:
        return ""
    parts = []
    for k, im in enumerate(images[:max_images]):
        p = im.get("path") if isinstance(im, dict) else str(im)
        if cache is not None and p in cache:
            uri = cache[p]
        else:
            uri = thumbnail_data_uri(p, max_side, roots=roots)
            if cache is not None:
                cache[p] = uri
        name = escape(Path(p).name if p else "(no path)", quote=True)
        if uri:
            parts.append(
                f'<img src="{escape(uri, quote=True)}" alt="{name}" title="{name}" loading="lazy">'
            )
        else:
            parts.append(f'<span class="noimg">image {k + 1} not shown: {name}</span>')
    if len(images) > max_images:
        parts.append(f'<span class="noimg">+{len(images) - max_images} more</span>')
    return '<div class="thumbs">' + "".join(parts) + "</div>"


def _failures_html(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    head = "".join(
        f"<th>{h}</th>" for h in ("stage", "rule", "severity", "value", "threshold", "detail")
    )
    body = []
    for r in rows:
        sev = str(r.get("severity") or "")
        body.append(
            "<tr>"
            f"<td>{escape(str(r.get('stage') or ''))}</td>"
            f"<td>{escape(str(r.get('rule') or ''))}</td>"
            f'<td><span class="badge {escape(sev, quote=True)}">{escape(sev)}</span></td>'
            f'<td class="num">{escape(fmt_number(r.get("value")))}</td>'
            f'<td class="num">{escape(fmt_number(r.get("threshold")))}</td>'
            f'<td class="detail">{escape(_truncate(str(r.get("detail") or ""), 600))}</td>'
            "</tr>"
        )
    return f'<table class="fails"><tr>{head}</tr>{"".join(body)}</table>'


def sample_card_html(
    sample: dict,
    ledger_rows: Sequence[dict],
    *,
    roots: Sequence[str | os.PathLike[str]] = (),
    max_side: int = 160,
    max_images: int = 8,
    max_chars: int = 3000,
    thumbnail_cache: dict[str, str | None] | None = None,
) -> str:
    """One sample as an HTML card: id, dataset, status, thumbnails, conversation, failures.

    ``sample`` is a sample row (or a ``rejected_samples`` row): sample_id, dataset, line,
    and, where ingest accepted it, kind, domain, conversations, images. ``ledger_rows`` are its
    failed rules (stage, rule, severity, value, threshold, detail). Images are thumbnailed
    only from inside ``roots``; with no roots, images are named, not shown.
    """
    sid = str(sample.get("sample_id") or "")
    status = sample.get("status")
    badges = [f'<span class="sid">{escape(sid)}</span>']
    for label, key in (
        ("dataset", "dataset"),
        ("line", "line"),
        ("kind", "kind"),
        ("domain", "domain"),
    ):
        if sample.get(key) is not None:
            badges.append(f'<span class="badge">{label}: {escape(str(sample[key]))}</span>')
    if status:
        badges.append(
            f'<span class="badge {escape(str(status), quote=True)}">status: '
            f"{escape(str(status))}</span>"
        )
    score = sample.get("score")
    if score is not None:
        badges.append(f'<span class="badge">quality score: {escape(fmt_number(score))}</span>')
    parts = [
        f'<div class="card" data-sample="{escape(sid, quote=True)}">',
        f'<div class="head">{"".join(badges)}</div>',
    ]
    if sample.get("kind") is None and sample.get("conversations") is None:
        parts.append(
            '<div class="turn"><em>rejected at ingest: the line never became a sample '
            "(see the detail below)</em></div>"
        )
    parts.append(_thumbs_html(sample.get("images"), roots, max_side, max_images, thumbnail_cache))
    for turn in sample.get("conversations") or []:
        role = escape(str(turn.get("role") or turn.get("from") or ""))
        text = escape(_truncate(str(turn.get("text") or turn.get("value") or ""), max_chars))
        parts.append(f'<div class="turn"><div class="role">{role}</div><pre>{text}</pre></div>')
    parts.append(_failures_html(ledger_rows))
    parts.append("</div>")
    return "\n".join(p for p in parts if p)


def cards_html(
    rows: Iterable[dict],
    *,
    roots: Sequence[str | os.PathLike[str]] = (),
    limit: int = 24,
    max_side: int = 160,
) -> str:
    """Cards of ``rejected_samples`` rows (each with its ``failures``), at most ``limit``,
    with the card style sheet and a count of the rows not shown."""
    rows = list(rows)
    cache: dict[str, str | None] = {}
    cards = [
        sample_card_html(
            r, r.get("failures") or [], roots=roots, max_side=max_side, thumbnail_cache=cache
        )
        for r in rows[:limit]
    ]
    more = (
        f'<p style="color:#5a6270"><em>… and {len(rows) - limit} more not shown</em></p>'
        if len(rows) > limit
        else ""
    )
    return f"<style>{CARD_CSS}</style>" + "\n".join(cards) + more
