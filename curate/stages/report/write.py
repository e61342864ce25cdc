"""``curate report``: one self-contained HTML file showing what a run kept, rejected and why.

No external resources: CSS inline, plots as base64 PNG, thumbnails as data URIs, and a
Content-Security-Policy that forbids scripts and any network fetch, so the file can be mailed
around and opened anywhere. Every piece of sample text is escaped (``curate.stages.report.html``).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import polars as pl

from curate.core.folder import RunFolder
from curate.core.io import write_bytes_atomic
from curate.stages.report.html import CARD_CSS, fmt_number, lessons_html, sample_card_html
from curate.stages.report.rows import sample_content
from curate.stages.report.tables import (
    RunTables,
    contamination_by_benchmark,
    counts_by_stage_rule_dataset,
    load_run_tables,
    rejected_samples,
    status_counts,
)

CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'none'; base-uri 'none'; form-action 'none'"
)

PAGE_CSS = """
body{margin:0;background:#eef0f3;font:14px/1.5 system-ui,-apple-system,Segoe UI,sans-serif;
 color:#1d2330}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:26px 0 8px;
 border-bottom:2px solid #c9ced6;padding-bottom:3px}
h3{font-size:15px;margin:18px 0 4px}
.sub{color:#5a6270;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
table.data{border-collapse:collapse;background:#fff;font-size:12px}
table.data th,table.data td{border:1px solid #dde1e6;padding:3px 8px}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums}
table.data th{background:#f3f4f7;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.plots figure{margin:0;background:#fff;border:1px solid #d0d4da;border-radius:4px;padding:4px}
.plots figure.half{flex:1 1 440px;max-width:calc(50% - 6px)}
.plots figure.full{flex:1 1 100%}
.plots figcaption{font-weight:600;font-size:13px;margin:2px 4px}
img.plot{width:100%;height:auto;display:block}
nav.toc{background:#fff;border:1px solid #d0d4da;border-radius:6px;padding:6px 12px;
 font-size:12px;columns:2}
nav.toc a{color:#2a5db0;text-decoration:none}
.more{color:#5a6270;font-style:italic;margin:6px 0 14px}
.empty{color:#5a6270}
"""


@dataclass
class ReportResult:
    path: Path
    rules: int = 0  # gallery sections
    shown: int = 0  # cards in the gallery
    not_shown: int = 0  # samples over the per-rule cap
    plots: int = 0
    bytes: int = 0
    per_rule: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (shown, total)


def _table(headers: list[str], rows: list[list], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            text = fmt_number(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{escape(str(text))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="data"><tr>{head}</tr>{"".join(body)}</table>'


def _stage_table(tables: RunTables) -> str:
    rows = []
    for stage, s in tables.stats.items():
        if not isinstance(s, dict) or s.get("rows_in") is None:
            continue
        rows.append(
            [
                stage,
                s["rows_in"],
                s.get("rows_kept", 0),
                s.get("rows_rejected", 0),
                s.get("rows_flagged", 0),
                s.get("seconds", 0.0),
            ]
        )
    if not rows:
        return '<p class="empty">no stage statistics yet</p>'
    return _table(["stage", "in", "kept", "rejected", "flagged", "seconds"], rows, {1, 2, 3, 4, 5})


def _status_table(tables: RunTables) -> str:
    df = status_counts(tables)
    rows = [list(r) for r in df.iter_rows()]
    rows.append(["total", *(int(df[c].sum()) for c in ("samples", "keep", "reject", "flag"))])
    return _table(
        ["dataset", "samples", "keep", "reject", "flag (awaiting review)"], rows, {1, 2, 3, 4}
    )


def _pack_table(tables: RunTables) -> str:
    p = tables.stats.get("pack")
    if not p:
        return ""
    caps = tables.pack_caps
    rows = [
        ["packs", p.get("packs")],
        ["lower bound", p.get("lower_bound")],
        ["packs / lower bound", p.get("ratio_to_lower_bound")],
        ["samples packed", p.get("samples_packed")],
        ["copies packed", p.get("copies_packed")],
        ["token fill", f"{p.get('token_fill', 0):.2%}"],
        ["tile fill", f"{p.get('tile_fill', 0):.2%}"],
    ]
    if caps:
        rows.insert(0, ["caps C (tokens) / K (tiles)", f"{caps[0]:,} / {caps[1]}"])
    return "<h3>packing</h3>" + _table(["measure", "value"], rows, {1})


# Rows shown in each near-duplicate table (the largest clusters first).
CLUSTER_ROWS = 20


def _contamination_table(tables: RunTables) -> str:
    df = contamination_by_benchmark(tables)
    if df is None:
        return ""
    if df.is_empty():
        return (
            '<h3>benchmark contamination</h3><p class="empty">'
            "no training sample matches a benchmark item</p>"
        )
    rows = [
        [
            r["benchmark"],
            r["items_matched"],
            r["samples"],
            r["removed"],
            r["by_image"],
            r["by_text"],
            ", ".join(r["datasets"]),
        ]
        for r in df.iter_rows(named=True)
    ]
    head = [
        "benchmark",
        "items matched",
        "training samples",
        "removed",
        "by image",
        "by text",
        "datasets",
    ]
    return "<h3>benchmark contamination, per benchmark</h3>" + _table(head, rows, {1, 2, 3, 4, 5})


def _text_cluster_table(tables: RunTables) -> str:
    df = tables.text_clusters
    if df is None:
        return ""
    if df.is_empty():
        return '<h3>near-duplicate clusters</h3><p class="empty">no near-duplicates found</p>'
    report = tables.stats.get("neardup_groups", {})
    rows = [
        [
            f"{r['kept_dataset']}:{r['kept_line']}",
            r["size"],
            r["size"] - 1,
            ", ".join(r["datasets"]),
            r["min_similarity"],
            "yes" if r["with_images"] else "no",
        ]
        for r in df.head(CLUSTER_ROWS).iter_rows(named=True)
    ]
    more = len(df) - len(rows)
    note = (
        f'<p class="sub">{len(df)} clusters, {int(df["size"].sum() - len(df))} near-duplicates '
        f"marked; {report.get('candidate_pairs', 0)} candidate pairs from "
        f"{report.get('bands', '?')} LSH bands, {report.get('verified_pairs', 0)} verified"
        + (f"; the {more} smaller clusters are not listed" if more > 0 else "")
        + "</p>"
    )
    head = [
        "kept sample (dataset:line)",
        "samples",
        "marked",
        "datasets",
        "lowest Jaccard to kept",
        "with images",
    ]
    return "<h3>near-duplicate clusters</h3>" + _table(head, rows, {1, 2, 4}) + note


def _image_reuse_table(tables: RunTables) -> str:
    df = tables.image_clusters
    if df is None:
        return ""
    if df.is_empty():
        return '<h3>image reuse</h3><p class="empty">no image is used by two samples</p>'
    rows = [
        [
            Path(r["example"]).name,
            r["files"],
            r["samples"],
            r["n_datasets"],
            ", ".join(r["datasets"]),
        ]
        for r in df.head(CLUSTER_ROWS).iter_rows(named=True)
    ]
    more = len(df) - len(rows)
    note = (
        f'<p class="sub">{len(df)} image clusters (files within the pHash distance of '
        "one another) used by more than one sample"
        + (f"; the {more} smaller ones are not listed" if more > 0 else "")
        + ". Several questions about one image are normal: a sample is a near-duplicate "
        "only when its conversation is one too.</p>"
    )
    head = ["image (an example file)", "files", "samples", "datasets", "which"]
    return "<h3>image reuse</h3>" + _table(head, rows, {1, 2, 3}) + note


def _duplicates_section(tables: RunTables) -> str:
    parts = [_contamination_table(tables), _text_cluster_table(tables), _image_reuse_table(tables)]
    if not any(parts):
        return ""
    body = "".join(f"<div>{p}</div>" for p in parts if p)
    return f'<h2>Near-duplicates and benchmark contamination</h2><div class="grid">{body}</div>'


def _lessons_section(tables: RunTables) -> str:
    """What review teaches (``lessons``): each rule's precision on the reviewed samples and a
    suggested threshold, and the judge's agreement with the reviewers."""
    from curate.stages.report.lessons import judge_decisions, lessons

    found = lessons(tables.ledger, tables.decisions, judge_decisions(tables.run))
    return '<h2 id="lessons">What review teaches</h2>' + lessons_html(found)


def _plot_img(fig, alt: str) -> str:
    from curate.stages.report.plots import fig_to_data_uri

    uri = fig_to_data_uri(fig)
    return f'<img class="plot" src="{escape(uri, quote=True)}" alt="{escape(alt, quote=True)}">'


def _plots(tables: RunTables, counts: pl.DataFrame) -> tuple[str, int]:
    from curate.stages.report.plots import plot_counts, plot_distributions, plot_score_histograms

    parts, n = [], 0
    for title, fig, width in (
        ("Rejected and flagged samples per rule", plot_counts(counts), "half"),
        ("Tiles, tokens and pack fill", plot_distributions(tables), "half"),
        ("Judge scores per domain", plot_score_histograms(tables.scores), "full"),
    ):
        if fig is None:
            continue
        parts.append(
            f'<figure class="{width}"><figcaption>{escape(title)}</figcaption>'
            f"{_plot_img(fig, title)}</figure>"
        )
        n += 1
    if not parts:
        return '<p class="empty">nothing to plot yet</p>', 0
    return '<div class="plots">' + "\n".join(parts) + "</div>", n


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _gallery(tables: RunTables, per_rule: int, thumb_px: int, result: ReportResult) -> str:
    rejected = rejected_samples(tables)
    if rejected.is_empty():
        return '<p class="empty">no rejected or flagged samples</p>'
    # Flagged rules first (they await a decision), then rejections; pipeline order in each.
    keys = (
        counts_by_stage_rule_dataset(tables)
        .group_by("stage", "rule", "severity", maintain_order=True)
        .agg(pl.col("samples").sum())
        .with_row_index("_order")
        .sort(pl.col("severity") != "flag", "_order")
        .drop("_order")
    )
    toc, sections, cache = [], [], {}
    failures = dict(
        zip(rejected["sample_id"].to_list(), rejected["failures"].to_list(), strict=True)
    )
    exploded = rejected.explode("failures").with_columns(
        f_stage=pl.col("failures").struct.field("stage"),
        f_rule=pl.col("failures").struct.field("rule"),
        f_severity=pl.col("failures").struct.field("severity"),
    )
    per_key = []  # (label, samples, shown rows) per rule, in the gallery's order
    for stage, rule, severity, _ in keys.iter_rows():
        members = exploded.filter(
            (pl.col("f_stage") == stage)
            & (pl.col("f_rule") == rule)
            & (pl.col("f_severity") == severity)
        ).unique("sample_id", keep="first", maintain_order=True)
        shown = members.head(per_rule).drop("failures", "f_stage", "f_rule", "f_severity")
        per_key.append((f"{stage} / {rule} ({severity})", len(members), shown))
    # The content of the shown samples only (at most per_rule per rule), in one read.
    shown_ids = [i for _, _, shown in per_key for i in shown["sample_id"]]
    content = {r["sample_id"]: r for r in sample_content(tables.run, shown_ids).to_dicts()}
    for k, (label, total, shown) in enumerate(per_key):
        anchor = f"g{k}"
        toc.append(f'<li><a href="#{anchor}">{escape(label)}</a> — {total}</li>')
        cards = []
        for row in shown.iter_rows(named=True):
            cards.append(
                sample_card_html(
                    {**row, **content.get(row["sample_id"], {})},
                    failures[row["sample_id"]],
                    roots=tables.roots,
                    max_side=thumb_px,
                    thumbnail_cache=cache,
                )
            )
        more = (
            f'<p class="more">… and {_plural(total - len(shown), "more sample")} with this rule '
            f"(not shown; see <code>curate review --pending</code> or the notebook)</p>"
            if total > len(shown)
            else ""
        )
        sections.append(
            f'<section class="rule" id="{anchor}"><h3>{escape(label)}: '
            f"{_plural(total, 'sample')}</h3>{''.join(cards)}{more}</section>"
        )
        result.per_rule[label] = (len(shown), total)
        result.shown += len(shown)
        result.not_shown += total - len(shown)
    result.rules = len(sections)
    return f'<nav class="toc"><ul>{"".join(toc)}</ul></nav>' + "\n".join(sections)


def render_report(
    tables: RunTables, per_rule: int = 24, thumb_px: int = 160, result: ReportResult | None = None
) -> str:
    """The report's HTML text (``result``, if given, receives the gallery counts)."""
    result = result or ReportResult(path=Path())
    counts = counts_by_stage_rule_dataset(tables)
    plots, result.plots = _plots(tables, counts)
    n_dec = len(tables.decisions)
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    title = f"curate report — {tables.run.path.name}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f'<div class="sub">run folder {escape(str(tables.run.path.resolve()))} · '
        f"{len(tables.samples):,} samples · {len(tables.ledger):,} ledger rows · "
        f"{n_dec} review decisions · written {escape(when)}</div>",
        "<h2>Summary</h2>",
        '<div class="grid"><div><h3>stages</h3>',
        _stage_table(tables),
        "</div><div><h3>status after review, per dataset</h3>",
        _status_table(tables),
        "</div><div>",
        _pack_table(tables),
        "</div></div>",
        _duplicates_section(tables),
        _lessons_section(tables),
        "<h2>Plots</h2>",
        plots,
        f'<h2 id="gallery">Rejected and flagged samples, per rule (at most {per_rule} each)</h2>',
        _gallery(tables, per_rule, thumb_px, result),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP, quote=True)}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{PAGE_CSS}{CARD_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


# Control characters HTML forbids (sample text may hold NUL and friends): shown as \xNN.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def visible_controls(html: str) -> str:
    """The page with every forbidden control character written as a visible ``\\xNN``."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", html)


def write_report(
    run: RunTables | RunFolder | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    per_rule: int = 24,
    thumb_px: int = 160,
) -> ReportResult:
    """Write the report (default ``RUN/report.html``) atomically; returns where and counts."""
    tables = run if isinstance(run, RunTables) else load_run_tables(run)
    path = Path(out) if out is not None else tables.run.path / "report.html"
    result = ReportResult(path=path)
    data = visible_controls(render_report(tables, per_rule, thumb_px, result)).encode("utf-8")
    write_bytes_atomic(data, path)
    result.bytes = len(data)
    return result
