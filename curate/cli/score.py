"""What ``curate score`` prints: the score distribution per domain."""

from __future__ import annotations


def distribution_table(rows: list[dict]):
    """Per domain: samples, the score histogram 0..10, means and decisions."""
    from rich.table import Table

    t = Table(title="score: quality scores per domain")
    for col in (
        "domain",
        "prompt",
        "samples",
        "histogram 0..10",
        "mean",
        "expected",
        "below thr",
        "invalid",
        "rep. checked",
        "rep. flagged",
    ):
        t.add_column(
            col, justify="left" if col in ("domain", "prompt", "histogram 0..10") else "right"
        )
    for r in rows:
        t.add_row(
            str(r["domain"]),
            str(r["prompt"]),
            str(r["samples"]),
            " ".join(str(n) for n in r["histogram"]),
            "-" if r["mean_score"] is None else f"{r['mean_score']:.2f}",
            "-" if r["mean_expected"] is None else f"{r['mean_expected']:.2f}",
            str(r["below_threshold"]),
            str(r["invalid"]),
            str(r["repetition_checked"]),
            str(r["repetition_flagged"]),
        )
    return t
