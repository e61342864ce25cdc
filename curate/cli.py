"""The ``curate`` command line: one short function per command; the stages do the work.

Heavy libraries (torch, vllm, ray) are imported by the commands that need them, so
``curate --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curate.budget.config import BudgetConfig
from curate.filters.cli import filter_command
from curate.ingest.config import IngestConfig
from curate.inspect.cli import report_command
from curate.pack.cli import export_command, pack_command
from curate.review_cli import review_command
from curate.score.cli import score_command
from curate.train.cli import train_command

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Curate InternVL 2.5-style multimodal SFT data: ingest, budget, filter, "
    "score, review, pack, train.",
)
demo_app = typer.Typer(no_args_is_help=True, help="Demo data and tiny local models.")
app.add_typer(demo_app, name="demo")

RunOpt = Annotated[Path, typer.Option("--run", help="run folder (created if missing)")]


def _fail(message: str) -> None:
    from curate.console import console

    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@demo_app.command("make")
def demo_make(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the demo mixture into")],
    seed: Annotated[int, typer.Option(help="random seed (same seed, same files)")] = 0,
    scale: Annotated[int, typer.Option(help="multiply the samples per dataset")] = 1,
    models: Annotated[
        bool, typer.Option(help="also build the tiny tokenizer and judge LLM")
    ] = True,
) -> None:
    """Write a small InternVL-style mixture (meta JSON, JSONL, images, planted bad samples)."""
    from curate.console import console
    from curate.demo.data import make_demo, make_demo_models

    meta = make_demo(out_dir, seed=seed, scale=scale)
    console.print(f"meta JSON: {meta}")
    if models:
        for name, path in make_demo_models(out_dir).items():
            console.print(f"{name}: {path}")


@app.command()
def ingest(
    meta: Annotated[Path, typer.Argument(help="InternVL meta JSON")],
    run: RunOpt,
    shard_lines: Annotated[int, typer.Option(help="annotation lines per shard")] = 50_000,
    workers: Annotated[int, typer.Option(help="processes parsing shards in parallel")] = 1,
) -> None:
    """Read a meta JSON and its JSONL/Parquet annotations into the run folder's samples/."""
    from curate.config import PipelineConfig, StagesConfig
    from curate.ingest.meta import MetaError
    from curate.pipeline import PipelineContext, run_ingest
    from curate.run import RunFolder, RunLockedError

    cfg = IngestConfig(shard_lines=shard_lines, workers=workers)
    ctx = PipelineContext(
        PipelineConfig.model_construct(run=run, meta=meta, stages=StagesConfig(ingest=cfg)),
        RunFolder(run),
    )
    try:
        with ctx.run.lock():
            _print_summary(run_ingest(ctx))
    except (MetaError, RunLockedError) as e:
        _fail(str(e))


def _print_summary(summary) -> None:
    from curate.console import console, rules_table, summary_table

    console.print(summary_table(summary))
    if summary.by_rule:
        console.print(rules_table(summary))


@app.command()
def budget(
    meta: Annotated[Path, typer.Argument(help="InternVL meta JSON")],
    run: RunOpt,
    tokenizer: Annotated[Path, typer.Option(help="local HF tokenizer dir (internvl2_5 template)")],
    max_dynamic_patch: Annotated[int, typer.Option(help="n_max where the meta sets none")] = 12,
    image_size: Annotated[int, typer.Option(help="tile side in pixels")] = 448,
    thumbnail: Annotated[bool, typer.Option(help="thumbnail tile after multi-tile grids")] = True,
    video_frames: Annotated[int, typer.Option(help="frames sampled per video")] = 8,
    repeat_mode: Annotated[str, typer.Option(help="internvl | stable")] = "internvl",
    target_tokens: Annotated[
        int | None,
        typer.Option(help="mixture solver: total training tokens; sets every repeat factor"),
    ] = None,
    weight: Annotated[
        list[str] | None,
        typer.Option(help="mixture solver: DATASET=WEIGHT token share (repeatable)"),
    ] = None,
    shard_lines: Annotated[int, typer.Option(help="annotation lines per shard")] = 50_000,
    workers: Annotated[int, typer.Option(help="processes in parallel")] = 1,
) -> None:
    """Ingest (if not done) and budget every sample: tiles, visual and text tokens, repeats."""
    from curate.config import ModelsConfig, PipelineConfig, StagesConfig
    from curate.ingest.meta import MetaError
    from curate.pipeline import PipelineContext, run_budget_stage, run_ingest
    from curate.run import RunFolder, RunLockedError

    try:
        weights = {k: float(v) for k, v in (w.split("=", 1) for w in weight or [])}
        cfg = BudgetConfig(
            max_dynamic_patch=max_dynamic_patch,
            image_size=image_size,
            use_thumbnail=thumbnail,
            video_frames=video_frames,
            repeat_mode=repeat_mode,
            target_tokens=target_tokens,
            weights=weights or None,
            workers=workers,
        )
    except ValueError as e:
        _fail(f"bad option: {e}")
    stages = StagesConfig(ingest=IngestConfig(shard_lines=shard_lines, workers=workers), budget=cfg)
    config = PipelineConfig.model_construct(
        run=run, meta=meta, stages=stages, models=ModelsConfig(tokenizer=tokenizer)
    )
    ctx = PipelineContext(config, RunFolder(run))
    try:
        with ctx.run.lock():
            _print_summary(run_ingest(ctx))
            run_budget_stage(ctx)
    except (MetaError, RunLockedError, OSError) as e:
        _fail(str(e))


@app.command("run")
def run_command(
    pipeline: Annotated[Path, typer.Argument(help="pipeline YAML (see pipelines/)")],
) -> None:
    """Run every stage a pipeline file configures, in order, skipping finished work."""
    from curate.config import PipelineError, load_pipeline
    from curate.pipeline import run_pipeline
    from curate.run import RunLockedError

    try:
        config = load_pipeline(pipeline)
        run_pipeline(config)
    except (PipelineError, RunLockedError) as e:
        _fail(str(e))


app.command("filter")(filter_command)
app.command("score")(score_command)
app.command("pack")(pack_command)
app.command("export")(export_command)
app.command("review")(review_command)
app.command("report")(report_command)
app.command("train")(train_command)

if __name__ == "__main__":
    app()
