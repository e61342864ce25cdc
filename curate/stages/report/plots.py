"""Matplotlib figures of a run: ledger counts, score histograms, tiles / tokens / pack fill.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend): the
notebook displays them, the report embeds them as base64 PNG. Each function returns None when
the run has nothing to plot.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import polars as pl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from curate.stages.report.tables import RunTables

PALETTE = (
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
)


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def fig_to_png(fig: Figure, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def fig_to_data_uri(fig: Figure, dpi: int = 100) -> str:
    """The figure as ``data:image/png;base64,...`` (for a self-contained HTML file)."""
    return "data:image/png;base64," + base64.b64encode(fig_to_png(fig, dpi)).decode("ascii")


def show(fig: Figure | None, empty: str = "nothing to plot") -> None:
    """Display a figure in a notebook as a PNG output (works without a pyplot backend)."""
    from IPython.display import Image, display

    if fig is None:
        print(empty)
        return
    display(Image(data=fig_to_png(fig), format="png"))


def plot_counts(counts: pl.DataFrame) -> Figure | None:
    """Horizontal bars: samples per ``stage / rule (severity)``, stacked by dataset."""
    from matplotlib.ticker import MaxNLocator

    if counts.is_empty():
        return None
    counts = counts.with_columns(label=pl.format("{} / {} ({})", "stage", "rule", "severity"))
    labels = counts["label"].unique(maintain_order=True).to_list()
    datasets = sorted(counts["dataset"].unique().to_list())
    fig = _figure(7.5, 1.3 + 0.22 * (len(labels) + len(datasets)))
    ax = fig.add_subplot()
    left = [0] * len(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    for k, ds in enumerate(datasets):
        widths = [0] * len(labels)
        for row in counts.filter(pl.col("dataset") == ds).iter_rows(named=True):
            widths[index[row["label"]]] += row["samples"]
        ax.barh(
            range(len(labels)),
            widths,
            left=left,
            label=ds,
            height=0.7,
            color=PALETTE[k % len(PALETTE)],
        )
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in enumerate(left):
        ax.text(total, y, f" {total}", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, max(left) * 1.12 + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("samples", fontsize=8)
    ax.set_title("rejected / flagged samples per stage, rule and dataset", fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center", ncols=min(4, len(datasets)), frameon=False)
    return fig


def plot_score_histograms(scores: pl.DataFrame | None) -> Figure | None:
    """One histogram (score 0..10) per check and domain, its threshold(s) as dashed lines."""
    if scores is None or scores.is_empty():
        return None
    groups = scores.select("check", "domain").unique().sort("check", "domain").rows()
    ncols = min(5, len(groups))
    nrows = -(-len(groups) // ncols)
    fig = _figure(2.6 * ncols, 0.4 + 1.9 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    bins = [x - 0.5 for x in range(12)]
    for ax, (check, domain) in zip(axes.flat, groups, strict=False):
        g = scores.filter((pl.col("check") == check) & (pl.col("domain") == domain))
        values = g["score"].cast(pl.Float64)
        integer = values.null_count() < len(values)  # constrained choice 0..10
        if not integer:
            values = g["expected"].cast(pl.Float64)  # only expected scores: a float
        values = values.drop_nulls().to_list()
        ax.hist(
            values,
            bins=bins if integer else [i / 4 for i in range(41)],
            color="#4c72b0" if check == "quality" else "#8172b3",
        )
        for thr in g["threshold"].drop_nulls().unique().sort().to_list():
            x = thr - 0.5 if integer else thr  # integer scores below thr fall left of it
            ax.axvline(x, color="#c0392b", linestyle="--", linewidth=1.5, zorder=3)
            ax.text(
                x,
                0.97,
                f"< {thr:g} ",
                color="#c0392b",
                fontsize=8,
                va="top",
                ha="right",
                transform=ax.get_xaxis_transform(),
                zorder=4,
            )
        ax.set_title(f"{check}: {domain} (n={len(values)})", fontsize=9)
        ax.set_xticks(range(0, 11))
        ax.tick_params(labelsize=8)
        ax.set_xlim(-0.5, 10.5)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle("LLM judge scores per domain (dashed: reject / review below)", fontsize=10)
    return fig


def _hist(ax, values, title: str, xlabel: str, color: str, bins=30, vline=None) -> None:
    ax.hist(values, bins=bins, color=color)
    if vline is not None:
        ax.axvline(vline, color="#c0392b", linestyle="--", linewidth=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=8)


def plot_distributions(tables: RunTables) -> Figure | None:
    """Tiles and tokens per sample (budget), and after packing the token / tile fill per pack."""
    panels = []
    if tables.budget is not None and not tables.budget.is_empty():
        b = tables.budget
        panels.append(("tiles", b["tiles"].to_list(), "tiles per sample", "tiles", "#55a868", None))
        if "total_tokens" in b.columns:
            panels.append(
                (
                    "tokens",
                    b["total_tokens"].to_list(),
                    "tokens per sample",
                    "tokens (visual + text)",
                    "#4c72b0",
                    None,
                )
            )
    if tables.packs is not None and not tables.packs.is_empty():
        caps = tables.pack_caps
        p = tables.packs
        if caps:
            c, k = caps
            panels.append(
                (
                    "fill",
                    (p["n_tokens"] / c).to_list(),
                    f"pack token fill (C = {c:,})",
                    "tokens / C",
                    "#dd8452",
                    1.0,
                )
            )
            if k:
                panels.append(
                    (
                        "tfill",
                        (p["n_tiles"] / k).to_list(),
                        f"pack tile fill (K = {k})",
                        "tiles / K",
                        "#8172b3",
                        1.0,
                    )
                )
        else:
            panels.append(
                ("fill", p["n_tokens"].to_list(), "tokens per pack", "tokens", "#dd8452", None)
            )
            panels.append(
                ("tfill", p["n_tiles"].to_list(), "tiles per pack", "tiles", "#8172b3", None)
            )
    if not panels:
        return None
    ncols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // ncols)
    fig = _figure(3.4 * ncols, 2.3 * nrows)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax, (_, values, title, xlabel, color, vline) in zip(axes, panels, strict=False):
        _hist(ax, values, f"{title} (n={len(values)})", xlabel, color, vline=vline)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return fig
