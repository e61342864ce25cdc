"""What ``curate train`` prints, and training under torchrun (one process per GPU).

Multi-GPU: ``torchrun --nproc-per-node 8 -m -- curate.cli.train --run RUN [--config P]`` (the
``--`` keeps torchrun from reading ``--run``). Every rank trains; the run folder's lock and the
engine's bookkeeping are not used there (ranks coordinate through torch.distributed, and a
second rank would be refused the lock): run ``curate pack`` first. ``curate run`` does not see
a torchrun training as done: leave ``train`` out of the pipeline file you rerun.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def train_ranks(run: Path, config: Path | None, sets: list[str] | None) -> None:
    """This rank's part of a distributed training run on ``RUN/packs``."""
    from curate.pipeline.config import config_for_run
    from curate.pipeline.run import build_stages
    from curate.stages.train.stage import run_training

    cfg = config_for_run(run, config, section="train", sets=sets)
    stage = next(s for s in build_stages(cfg) if s.name == "train")
    result = run_training(stage.config, run)
    print_result(
        {
            "optimizer_steps": result.steps,
            "checkpoint": str(result.checkpoint),
            "out": str(result.out),
        }
    )


def print_result(report: dict) -> None:
    """Summary table of a finished training (rank 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0 or not report:
        return
    from rich.table import Table

    from curate.cli.console import console

    out = Path(report["out"])
    metrics = out / "metrics.jsonl"
    rows = (
        [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        if metrics.exists()
        else []
    )
    t = Table(title=f"train: {report['optimizer_steps']} optimizer steps")
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
            f"{tokens / secs:,.0f}" if secs else "-",
            f"{tiles / secs:,.1f}" if secs else "-",
        )
    console.print(t)
    console.print(f"checkpoint: {report['checkpoint']}")
    console.print(f"metrics: {metrics}  plot: {out / 'loss.png'}")


def torchrun_main(
    run: Annotated[Path, typer.Option("--run", help="run folder with packs/")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline YAML")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="KEY=VALUE of stages.train")
    ] = None,
) -> None:
    """Train on RUN/packs in every rank of a torchrun job."""
    from curate.cli.console import user_errors

    with user_errors():
        train_ranks(run, config, set_)


if __name__ == "__main__":
    typer.run(torchrun_main)
