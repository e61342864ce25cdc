"""The train stage as the pipeline and the CLI run it (torch is imported only when training)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from curate.console import console
from curate.io import read_json, write_json_atomic
from curate.run import StageSummary, settings_fingerprint
from curate.train.config import TrainConfig


def run_training(cfg: TrainConfig, run_dir: Path | None):
    """Train; returns loop.TrainResult."""
    from curate.train.loop import train

    return train(cfg, Path(run_dir) if run_dir is not None else None)


def print_result(result) -> None:
    """Summary table of a finished training call (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from rich.table import Table

    from curate.console import console

    rows = (
        [
            json.loads(ln)
            for ln in (result.out / "metrics.jsonl").read_text().splitlines()
            if ln.strip()
        ]
        if (result.out / "metrics.jsonl").exists()
        else []
    )
    t = Table(title=f"train: {result.steps} optimizer steps")
    for col in ("first loss", "last loss", "tokens", "tiles", "tokens/s", "tiles/s"):
        t.add_column(col, justify="right")
    if rows:
        secs = sum(r["tokens"] / r["tokens_per_s"] for r in rows if r["tokens_per_s"])
        tokens, tiles = sum(r["tokens"] for r in rows), sum(r["tiles"] for r in rows)
        t.add_row(
            f"{rows[0]['loss']:.4f}",
            f"{rows[-1]['loss']:.4f}",
            f"{tokens:,}",
            f"{tiles:,}",
            f"{tokens / secs:,.0f}",
            f"{tiles / secs:,.1f}",
        )
    console.print(t)
    console.print(f"checkpoint: {result.checkpoint}")
    console.print(f"metrics: {result.out / 'metrics.jsonl'}  plot: {result.out / 'loss.png'}")


def run_train_stage(ctx) -> StageSummary:
    """Pipeline runner: ``stages.train`` of the pipeline file, in its run folder."""
    cfg = ctx.config.stages.train
    if cfg.tokenizer is None and cfg.model is None and cfg.llm is None:
        if ctx.config.models.tokenizer is None:
            raise ValueError("the train stage needs models.tokenizer (or train.tokenizer)")
        cfg = cfg.model_copy(update={"tokenizer": ctx.config.models.tokenizer})
    # A rerun of the pipeline skips training that finished with the same settings and packs.
    marker = ctx.run.marker_path("train", "all")
    fingerprint = train_fingerprint(cfg, ctx.run.path)
    if marker.exists() and read_json(marker).get("fingerprint") == fingerprint:
        done = read_json(marker)
        console.print(f"train: already done ({done['steps']} steps): {done['checkpoint']}")
        return StageSummary(stage="train", rows_in=done["steps"], rows_kept=done["steps"])
    t0 = time.perf_counter()
    result = run_training(cfg, ctx.run.path)
    print_result(result)
    steps = result.steps  # one summary row per optimizer step trained
    write_json_atomic(
        {"fingerprint": fingerprint, "steps": steps, "checkpoint": str(result.checkpoint)}, marker
    )
    return StageSummary(
        stage="train", rows_in=steps, rows_kept=steps, seconds=time.perf_counter() - t0
    )


def train_fingerprint(cfg: TrainConfig, run_dir: Path) -> str:
    """The training settings and the identity of the packs they train on."""
    packs = Path(cfg.packs or run_dir / "packs")
    files = sorted((p.name, p.stat().st_size) for p in packs.glob("*.parquet"))
    stats = run_dir / "stats" / "pack.json"
    return settings_fingerprint(cfg, files, stats.read_bytes() if stats.exists() else b"")
