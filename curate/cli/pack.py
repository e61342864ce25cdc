"""What ``curate pack`` prints, and ``curate export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunOpt = Annotated[Path, typer.Option("--run", help="run folder (budgeted)")]


def pack_report_table(report: dict):
    from types import SimpleNamespace

    from rich.table import Table

    report = SimpleNamespace(**report)
    t = Table(title=f"pack ({report.algorithm})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("samples kept (status keep)", f"{report.samples_in:,}"),
        ("samples rejected over a cap", f"{report.samples_rejected:,}"),
        ("samples truncated", f"{report.samples_truncated:,}"),
        ("samples not drawn (repeat r < 1)", f"{report.samples_not_drawn:,}"),
        (
            "samples not packed (status)",
            ", ".join(f"{k}: {v}" for k, v in report.samples_excluded.items()) or "0",
        ),
        ("copies packed", f"{report.copies_packed:,}"),
        ("packs", f"{report.packs:,}"),
        ("lower bound max(⌈Σtok/C⌉, ⌈Σtiles/K⌉)", f"{report.lower_bound:,}"),
        ("packs / lower bound", f"{report.ratio_to_lower_bound:.4f}"),
        *_certificate_rows(vars(report)),
        ("token fill", f"{report.token_fill:.2%}"),
        ("tile fill", f"{report.tile_fill:.2%}"),
        (
            "padded batches would process",
            f"{report.padded_batch_tokens:,} tokens ({report.padding_fraction_padded:.1%} padding)",
        ),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _certificate_rows(report: dict) -> list[tuple[str, str]]:
    """Best proven bound, which one, the gap; nothing for a report written before them."""
    if "best_bound" not in report:
        return []
    rows = [
        (f"best proven bound ({report['best_bound_kind']})", f"{report['best_bound']:,}"),
        ("gap to best bound", f"{report['gap_to_best_bound']:.2%}"),
    ]
    if report.get("lp_bound") is not None:
        state = "converged" if report["lp_bound_converged"] else "time-boxed, stopped early"
        rows.append(("2-D LP bound", f"{report['lp_bound']:,} ({state})"))
    return rows


def export_command(
    run: RunOpt,
    out: Annotated[Path, typer.Option(help="output folder")],
    format: Annotated[
        str, typer.Option(help="internvl (meta JSON + JSONL) | hf (save_to_disk)")
    ] = "internvl",
    embed_images: Annotated[
        bool,
        typer.Option(
            help="hf: embed image bytes, not paths (an EXIF-rotated image is stored unturned, "
            "as InternVL reads it)"
        ),
    ] = False,
    flagged: Annotated[
        str, typer.Option(help="exclude | include unreviewed flagged samples")
    ] = "exclude",
) -> None:
    """Export the kept samples for training elsewhere (InternVL's scripts or HF datasets), with
    the final status (every stage's ledger and the review decisions) and the repeat stage's
    copies.

    internvl: samples with 0 copies are left out; the others are grouped by
    their copies k: the smallest k of a dataset keeps its name, every other k
    becomes the entry NAME@xK; repeat_time is k, an int. InternVL, or
    `curate ingest` without target_tokens, trains on the run's samples and copies.

    hf: one row per kept sample with its copies (0: not drawn) and domain."""
    from curate.cli.console import console, fail, user_errors
    from curate.core.folder import RunFolder
    from curate.stages.pack.export import export_hf, export_internvl

    if format not in ("internvl", "hf"):
        fail(f"unknown format {format!r}: internvl or hf")
    folder = RunFolder(run)
    with user_errors(), folder.lock():  # no stage may replace tables while they are read
        if not folder.shards("samples"):
            fail(f"{run} has no samples/: run `curate ingest` (or a pipeline) first")
        if format == "internvl":
            path = export_internvl(folder, out, flagged=flagged)
        else:
            path = export_hf(folder, out, flagged=flagged, embed_images=embed_images)
    console.print(f"exported to {path}")
