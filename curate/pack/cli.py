"""``curate pack`` and ``curate export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunOpt = Annotated[Path, typer.Option("--run", help="run folder (budgeted)")]


def pack_report_table(report):
    from rich.table import Table

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


def pack_command(
    run: RunOpt,
    tokenizer: Annotated[
        Path | None, typer.Option(help="local HF tokenizer dir (default: the one budget used)")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="C: tokens per pack")] = 16384,
    max_tiles: Annotated[int, typer.Option(help="K: tiles per pack")] = 48,
    algorithm: Annotated[
        str, typer.Option(help="curate | internvl (online greedy buffer)")
    ] = "curate",
    seed: Annotated[int, typer.Option(help="tie-breaks and shuffled pack order")] = 0,
    over_cap: Annotated[str, typer.Option(help="reject | truncate samples over a cap")] = "reject",
    flagged: Annotated[
        str, typer.Option(help="exclude | include unreviewed flagged samples")
    ] = "exclude",
    packs_per_shard: Annotated[int, typer.Option(help="packs per manifest shard")] = 1000,
) -> None:
    """Pack kept samples (times their copies) into padding-free sequences: RUN/packs/."""
    from curate.cli import _fail
    from curate.console import console, shard_progress
    from curate.ingest.stage import run_info
    from curate.pack.config import PackConfig
    from curate.pack.stage import run_pack
    from curate.run import RunFolder, RunLockedError

    folder = RunFolder(run)
    info = run_info(folder)
    tokenizer = tokenizer or info.get("tokenizer")
    if tokenizer is None:
        _fail("no tokenizer: pass --tokenizer or run `curate budget` first")
    try:
        cfg = PackConfig(
            max_tokens=max_tokens,
            max_tiles=max_tiles,
            algorithm=algorithm,
            seed=seed,
            over_cap=over_cap,
            flagged=flagged,
            packs_per_shard=packs_per_shard,
        )
    except ValueError as e:
        _fail(f"bad option: {e}")
    try:
        with folder.lock(), shard_progress("tokenize", len(folder.shards("budget"))) as on_shard:
            report = run_pack(
                folder, cfg, tokenizer, image_size=info.get("image_size", 448), on_shard=on_shard
            )
    except (RunLockedError, FileNotFoundError) as e:
        _fail(str(e))
    console.print(pack_report_table(report))


def export_command(
    run: RunOpt,
    out: Annotated[Path, typer.Option(help="output folder")],
    format: Annotated[
        str, typer.Option(help="internvl (meta JSON + JSONL) | hf (save_to_disk)")
    ] = "internvl",
    embed_images: Annotated[bool, typer.Option(help="hf: embed image bytes, not paths")] = False,
    flagged: Annotated[
        str, typer.Option(help="exclude | include unreviewed flagged samples")
    ] = "exclude",
) -> None:
    """Export the kept samples for training elsewhere (InternVL's scripts or HF datasets)."""
    from curate.cli import _fail
    from curate.console import console
    from curate.pack.export import export_hf, export_internvl
    from curate.run import RunFolder

    folder = RunFolder(run)
    if format == "internvl":
        path = export_internvl(folder, out, flagged=flagged)
    elif format == "hf":
        path = export_hf(folder, out, flagged=flagged, embed_images=embed_images)
    else:
        _fail(f"unknown format {format!r}: internvl or hf")
    console.print(f"exported to {path}")
