"""HTML pieces for the notebook, the report and the review app: thumbnails and sample cards.

Cards are rendered by one jinja2 template (``templates/card.html``) that the static report,
the notebook and ``curate review --serve`` all use, so they never drift; this module builds
what the template shows (``card_context``) and renders it. Sample text is hostile until proven
otherwise (annotations come from the internet): the templates autoescape every value,
attribute values included, and mark nothing safe. Thumbnails are read only from inside the
run's dataset roots, never decoded at full size when the format allows, and an unreadable
image gives ``None`` instead of an exception.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

if TYPE_CHECKING:
    from curate.core.folder import RunFolder

# Larger files are not thumbnailed (a report must not stall on one huge image).
MAX_THUMBNAIL_FILE_BYTES = 64 * 1024 * 1024
# Decoded pixels allowed when making a thumbnail (after JPEG draft reduction).
MAX_THUMBNAIL_PIXELS = 64 * 1024 * 1024

TEMPLATES = Path(__file__).with_name("templates")
CARD_CSS = (TEMPLATES / "card.css").read_text(encoding="utf-8")

# Conversation roles as InternVL annotations spell them (CSS classes of the turns).
ROLES = ("system", "human", "gpt")
STATUSES = ("keep", "reject", "flag")
SEVERITIES = ("reject", "flag")


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


def image_jpeg(
    path: str | os.PathLike[str] | None,
    max_side: int = 160,
    *,
    roots: Sequence[str | os.PathLike[str]],
    quality: int = 80,
) -> bytes | None:
    """The image at ``path`` as JPEG bytes, its longest side at most ``max_side``, or None.

    None when the path is outside every dataset root (after resolving symlinks), is not a
    regular file, is too large, or cannot be decoded. ``roots`` is required: pass
    ``RunTables.roots`` (the run's dataset roots). Pixels go through ``convert("RGB")``, as the
    trainer reads them.
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
        rgb.save(buf, format="JPEG", quality=quality)
    except Exception:  # noqa: BLE001 - any decoder failure means "no image"
        return None
    return buf.getvalue()


def thumbnail_data_uri(
    path: str | os.PathLike[str] | None,
    max_side: int = 160,
    *,
    roots: Sequence[str | os.PathLike[str]],
) -> str | None:
    """A JPEG thumbnail of the image at ``path`` as a ``data:`` URI, or None (``image_jpeg``)."""
    data = image_jpeg(path, max_side, roots=roots)
    if data is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")


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


def fmt_pct(x: float | None) -> str:
    """A share for display: ``83.3%``; ``–`` for None (nothing to divide)."""
    return "–" if x is None else f"{x:.1%}"


# --- templates --------------------------------------------------------------------------------


def make_environment(*first: str | os.PathLike[str]) -> jinja2.Environment:
    """A jinja2 environment over ``first`` (a caller's own templates) and these templates:
    autoescaping on, undefined names an error, the number filters ``fmt`` and ``pct``."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([*(str(p) for p in first), str(TEMPLATES)]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = fmt_number
    env.filters["pct"] = fmt_pct
    return env


@functools.cache
def _environment() -> jinja2.Environment:
    return make_environment()


def render_card(c: dict, extra_class: str = "") -> str:
    """The card template on a ``card_context``."""
    return str(_environment().get_template("card.html").module.card(c, extra_class))


def lessons_html(lessons: object) -> str:
    """What review teaches (``curate.stages.report.lessons.Lessons``) as HTML."""
    return str(_environment().get_template("lessons.html").module.lessons(lessons))


# --- what a card shows ------------------------------------------------------------------------

# A span a rule's detail quotes: «...» (``_clip`` in the filters writes \n as \\n and cuts
# long spans with …).
_QUOTED = re.compile(r"«(.+?)»")
# tail_loop: "turn K ends with «span» (P chars) repeated R x over its last C chars".
_TAIL = re.compile(r"turn (\d+) ends with «.*?».*?over its last ([\d,]+) chars")
# Marks per turn: enough to see the loop, not so many that the page drowns.
MAX_MARKS_PER_TURN = 200
# Quoted spans shorter than this are not searched for (every "a" of a text would light up).
MIN_SPAN_CHARS = 3


def _unclip(span: str) -> str:
    return span.removesuffix("…").replace("\\n", "\n")


def loop_marks(
    turns: Sequence[tuple[str, str]], failures: Iterable[dict]
) -> dict[int, list[tuple[int, int]]]:
    """Character ranges to highlight per turn (by position), from the failed rules: a tail
    loop's last C characters, runs longer than ``zero_run`` / ``char_run`` thresholds, and
    every occurrence in the answers of a span a detail quotes («...»)."""
    marks: dict[int, list[tuple[int, int]]] = {}
    answers = [(k, text) for k, (role, text) in enumerate(turns) if role == "gpt"]

    def add(k: int, start: int, end: int) -> None:
        got = marks.setdefault(k, [])
        if len(got) < MAX_MARKS_PER_TURN and end > start:
            got.append((start, end))

    for f in failures:
        detail, rule, threshold = str(f.get("detail") or ""), f.get("rule"), f.get("threshold")
        tail = _TAIL.search(detail)
        if tail and int(tail[1]) < len(turns):
            k, chars = int(tail[1]), int(tail[2].replace(",", ""))
            end = len(turns[k][1].rstrip())
            add(k, max(0, end - chars), end)
            continue
        if rule in ("zero_run", "char_run") and threshold is not None:
            n = max(1, int(threshold))
            run = re.compile(f"0{{{n + 1},}}" if rule == "zero_run" else f"([^\\s0])\\1{{{n},}}")
            for k, text in answers:
                for m in run.finditer(text):
                    add(k, *m.span())
            continue
        for span in {_unclip(s) for s in _QUOTED.findall(detail)}:
            if len(span.strip()) < MIN_SPAN_CHARS:
                continue
            for k, text in answers:
                at = text.find(span)
                while at >= 0 and len(marks.get(k, [])) < MAX_MARKS_PER_TURN:
                    add(k, at, at + len(span))
                    at = text.find(span, at + len(span))
    return marks


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def segments(
    text: str, marks: Sequence[tuple[int, int]] = (), max_chars: int | None = None
) -> list[tuple[str, str]]:
    """``text`` as (piece, kind) with kind ``""`` (plain), ``mark`` (highlighted) or ``cut``
    (a note standing for characters left out). A text over ``max_chars`` keeps its first two
    thirds and last third of that: loops sit at the end of an answer."""
    n = len(text)
    windows = [(0, n)]
    if max_chars is not None and n > max_chars:
        head, tail = (2 * max_chars) // 3, max_chars // 3
        windows = [(0, head), (n - tail, n)]
    marks = _merge(marks)
    out: list[tuple[str, str]] = []
    for w, (lo, hi) in enumerate(windows):
        if w:
            out.append((f"\n… {windows[1][0] - windows[0][1]:,} characters not shown …\n", "cut"))
        at = lo
        for start, end in marks:
            start, end = max(start, lo), min(end, hi)
            if start >= end:
                continue
            if start > at:
                out.append((text[at:start], ""))
            out.append((text[start:end], "mark"))
            at = end
        if at < hi:
            out.append((text[at:hi], ""))
    return out


# The judge's bar chart: bar width, gap and plot height in pixels (P = 1 fills the plot).
PROB_BAR_PX, PROB_GAP_PX, PROB_PLOT_PX = 14, 3, 56


def prob_chart(
    check: str,
    probs: Sequence[float],
    score: float | None = None,
    expected: float | None = None,
    threshold: float | None = None,
) -> dict:
    """The geometry of a small bar chart of the judge's label probabilities P(0)..P(10):
    labels below the threshold in red, the chosen label outlined."""
    bar_px, gap_px, plot_px = PROB_BAR_PX, PROB_GAP_PX, PROB_PLOT_PX
    bars = []
    for label, p in enumerate(probs):
        h = round(max(0.0, min(1.0, float(p or 0.0))) * plot_px, 2)
        cls = "below" if threshold is not None and label < threshold else "above"
        if score is not None and label == score:
            cls += " top"
        x = label * (bar_px + gap_px) + 1
        bars.append(
            {
                "label": label,
                "p": f"{float(p or 0.0):.3f}",
                "x": x,
                "w": bar_px,
                "y": round(2 + plot_px - h, 2),
                "h": h,
                "cx": x + bar_px / 2,
                "cls": cls,
            }
        )
    summary = [
        f"score {fmt_number(score)}",
        f"expected {expected:.2f}" if expected is not None else None,
        f"threshold {fmt_number(threshold)}" if threshold is not None else None,
    ]
    return {
        "check": check,
        "bars": bars,
        "width": len(bars) * (bar_px + gap_px) + 1,
        "height": plot_px + 14,
        "summary": " · ".join(s for s in summary if s),
    }


ImageSource = Callable[[int, dict], tuple[str | None, str | None]]


def data_uri_images(
    roots: Sequence[str | os.PathLike[str]],
    max_side: int,
    cache: dict[str, str | None] | None = None,
) -> ImageSource:
    """Image sources for a self-contained page: (thumbnail data URI, no full-size link)."""

    def source(k: int, im: dict) -> tuple[str | None, str | None]:
        p = im.get("path")
        if cache is not None and p in cache:
            return cache[p], None
        uri = thumbnail_data_uri(p, max_side, roots=roots)
        if cache is not None:
            cache[p] = uri
        return uri, None

    return source


def _image_views(
    images: Sequence[dict] | None,
    source: ImageSource,
    grids: Sequence[dict] | None,
    max_images: int,
) -> tuple[list[dict], int]:
    views = []
    for k, im in enumerate((images or [])[:max_images]):
        im = im if isinstance(im, dict) else {"path": str(im)}
        p = im.get("path")
        src, full = source(k, im)
        grid = grids[k] if grids is not None and k < len(grids) else None
        caption = ""
        if grid:
            tiles = grid["cols"] * grid["rows"] + int(bool(grid.get("thumbnail")))
            thumb = " + thumbnail" if grid.get("thumbnail") else ""
            caption = f"{grid['cols']}×{grid['rows']} tiles{thumb} = {tiles}"
        views.append(
            {
                "index": k,
                "src": src,
                "full": full,
                "name": Path(p).name if p else "(no path)",
                "grid": dict(grid) if grid else None,
                "caption": caption,
            }
        )
    return views, max(0, len(images or []) - max_images)


def card_context(
    sample: dict,
    ledger_rows: Sequence[dict],
    *,
    images: ImageSource,
    grids: Sequence[dict] | None = None,
    judge: Sequence[dict] = (),
    max_images: int = 8,
    max_chars: int | None = 3000,
    max_detail_chars: int = 600,
) -> dict:
    """What the card template shows of one sample.

    ``sample`` is a sample row (or a ``rejected_samples`` row): sample_id, dataset, line, and,
    where ingest accepted it, kind, domain, conversations, images, status, score.
    ``ledger_rows`` are its failed rules (stage, rule, severity, value, threshold, detail);
    the spans they name are highlighted in the conversation (``loop_marks``). ``images``
    gives each image's (thumbnail src, full-size link); ``grids`` the budget's tile grid per
    image; ``judge`` the ``prob_chart``s of the judge's probabilities.
    """
    badges = [
        {"label": label, "value": str(sample[key]), "cls": ""}
        for label, key in (("dataset", "dataset"), ("line", "line"), ("kind", "kind"))
        + (("domain", "domain"),)
        if sample.get(key) is not None
    ]
    status = sample.get("status")
    if status:
        cls = str(status) if status in STATUSES else ""
        badges.append({"label": "status", "value": str(status), "cls": cls})
    if sample.get("score") is not None:
        badges.append({"label": "quality score", "value": fmt_number(sample["score"]), "cls": ""})
    turns = [
        (
            str(t.get("role") or t.get("from") or ""),
            str(t.get("text") if t.get("text") is not None else t.get("value") or ""),
        )
        for t in sample.get("conversations") or []
    ]
    marks = loop_marks(turns, ledger_rows)
    views, more = _image_views(sample.get("images"), images, grids, max_images)
    return {
        "sample_id": str(sample.get("sample_id") or ""),
        "badges": badges,
        "ingest_only": sample.get("kind") is None and sample.get("conversations") is None,
        "images": views,
        "more_images": more,
        "turns": [
            {
                "role": role,
                "role_class": role if role in ROLES else "",
                "segments": segments(text, marks.get(k, ()), max_chars),
            }
            for k, (role, text) in enumerate(turns)
        ],
        "judge": list(judge),
        "failures": [
            {
                "stage": str(r.get("stage") or ""),
                "rule": str(r.get("rule") or ""),
                "severity": str(r.get("severity") or ""),
                "value": fmt_number(r.get("value")),
                "threshold": fmt_number(r.get("threshold")),
                "detail": _truncate(str(r.get("detail") or ""), max_detail_chars),
            }
            for r in ledger_rows
        ],
    }


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n… ({len(text) - max_chars:,} more characters)"


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
    """One sample as a self-contained HTML card: id, dataset, status, thumbnails (data URIs),
    conversation, failures (see ``card_context``). Images are thumbnailed only from inside
    ``roots``; with no roots, images are named, not shown."""
    c = card_context(
        sample,
        ledger_rows,
        images=data_uri_images(roots, max_side, thumbnail_cache),
        max_images=max_images,
        max_chars=max_chars,
    )
    return render_card(c)


def cards_html(
    rows: Iterable[dict],
    *,
    roots: Sequence[str | os.PathLike[str]] = (),
    limit: int = 24,
    max_side: int = 160,
    run: RunFolder | None = None,
) -> str:
    """Cards of ``rejected_samples`` rows (each with its ``failures``), at most ``limit``,
    with the card style sheet and a count of the rows not shown. With ``run``, the
    conversations and images of the shown rows that lack them are read from its samples/
    (for these rows only: ``rejected_samples`` leaves them out)."""
    rows = list(rows)
    shown = rows[:limit]
    if run is not None:
        shown = _with_content(run, shown)
    cache: dict[str, str | None] = {}
    cards = [
        sample_card_html(
            r, r.get("failures") or [], roots=roots, max_side=max_side, thumbnail_cache=cache
        )
        for r in shown
    ]
    more = (
        f'<p class="more-cards">… and {len(rows) - limit} more not shown</p>'
        if len(rows) > limit
        else ""
    )
    return f"<style>{CARD_CSS}</style>" + "\n".join(cards) + more


def _with_content(run: RunFolder, rows: list[dict]) -> list[dict]:
    """``rows`` with the content columns of those that lack them, read in one pass."""
    from curate.stages.report.rows import sample_content

    missing = [r["sample_id"] for r in rows if "conversations" not in r and r.get("sample_id")]
    if not missing:
        return rows
    found = {r["sample_id"]: r for r in sample_content(run, missing).to_dicts()}
    return [{**r, **found.get(r.get("sample_id"), {})} for r in rows]
