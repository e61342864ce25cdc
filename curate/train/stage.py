"""The train stage as the pipeline and the CLI run it (torch is imported only when training)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from curate.run import StageSummary
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
    t0 = time.perf_counter()
    result = run_training(cfg, ctx.run.path)
    print_result(result)
    packs = result.steps  # one summary row per optimizer step trained
    return StageSummary(
        stage="train", rows_in=packs, rows_kept=packs, seconds=time.perf_counter() - t0
    )
