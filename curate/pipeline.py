"""``curate run PIPELINE``: run the configured stages in order in one run folder.

Each stage skips the shards it already finished, so rerunning a pipeline after a crash (or
after adding a stage) does only the missing work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from curate.config import PipelineConfig
from curate.console import console, rules_table, shard_progress, summary_table
from curate.executors import Executor, LocalExecutor, make_executor
from curate.filters.cli import run_filter_stage
from curate.inspect.cli import run_report_stage
from curate.run import RunFolder, StageSummary
from curate.score.cli import run_score_stage
from curate.train.stage import run_train_stage


@dataclass
class PipelineContext:
    config: PipelineConfig
    run: RunFolder
    executor: Executor = field(default_factory=LocalExecutor)  # where shards run


def run_ingest(ctx: PipelineContext) -> StageSummary:
    from curate.ingest.stage import ingest, plan_size

    cfg = ctx.config.stages.ingest
    with shard_progress("ingest", plan_size(ctx.config.meta, cfg.shard_lines)) as on_shard:
        return ingest(str(ctx.config.meta), ctx.run, cfg, on_shard=on_shard, executor=ctx.executor)


def run_budget_stage(ctx: PipelineContext) -> StageSummary:
    from curate.budget.stage import run_budget
    from curate.console import budget_rich_table
    from curate.io import read_json

    if ctx.config.models.tokenizer is None:
        raise ValueError("the budget stage needs models.tokenizer in the pipeline file")
    with shard_progress("budget", len(ctx.run.shards("samples"))) as on_shard:
        summary = run_budget(
            ctx.run,
            ctx.config.stages.budget,
            ctx.config.models.tokenizer,
            on_shard=on_shard,
            executor=ctx.executor,
        )
    console.print(budget_rich_table(read_json(ctx.run.path / "stats" / "budget_table.json")))
    return summary


def run_pack_stage(ctx: PipelineContext) -> StageSummary:
    from curate.pack.cli import pack_report_table
    from curate.pack.stage import run_pack

    cfg = ctx.config.stages.pack
    with shard_progress("tokenize", len(ctx.run.shards("budget"))) as on_shard:
        report = run_pack(
            ctx.run,
            cfg,
            ctx.config.models.tokenizer,
            image_size=_image_size(ctx),
            on_shard=on_shard,
        )
    console.print(pack_report_table(report))
    return StageSummary(
        "pack",
        rows_in=report.samples_in,
        rows_kept=report.samples_packed,
        rows_rejected=report.samples_rejected,
    )


def run_score(ctx: PipelineContext) -> StageSummary:
    """The score stage: one vLLM engine here, or engine actors on the Ray cluster."""
    if ctx.executor.kind == "ray":
        from curate.score.ray_engine import run_score_stage_ray

        return run_score_stage_ray(ctx)
    return run_score_stage(ctx)


def _image_size(ctx: PipelineContext) -> int:
    budget = ctx.config.stages.budget
    return budget.image_size if budget else 448


# Stage name -> runner, in pipeline order.
STAGE_RUNNERS: dict[str, Callable[[PipelineContext], StageSummary]] = {
    "ingest": run_ingest,
    "budget": run_budget_stage,
    "filter": run_filter_stage,
    "score": run_score,
    "pack": run_pack_stage,
    "train": run_train_stage,
    "report": run_report_stage,
}


# Stages whose summary is rows in / kept / rejected per dataset.
SHARD_TABLE_STAGES = ("ingest", "filter", "score")


def prepare_demo(config: PipelineConfig) -> None:
    from curate.demo.data import make_demo, make_demo_models

    demo = config.demo
    if not (demo.dir / "meta.json").exists():
        console.print(f"building demo data in {demo.dir}")
        make_demo(demo.dir, seed=demo.seed, scale=demo.scale)
    make_demo_models(demo.dir, judge=True)


def run_pipeline(config: PipelineConfig) -> dict[str, StageSummary]:
    """Run every configured stage in order; returns each stage's summary."""
    if config.demo is not None:
        prepare_demo(config)
    executor = make_executor(config.executor)
    if executor.kind == "ray":
        # Tasks run in other processes and on other machines: no path may depend on this
        # directory. (Outputs do not change: stages record resolved paths already.)
        config = absolute_paths(config)
        executor.start()  # an unreachable cluster fails here, before any work
    ctx = PipelineContext(config, RunFolder(config.run), executor)
    summaries = {}
    try:
        with ctx.run.lock():
            for name, runner in STAGE_RUNNERS.items():
                if getattr(config.stages, name, None) is None:
                    continue
                summaries[name] = summary = runner(ctx)
                if name in SHARD_TABLE_STAGES:  # the others print their own report
                    console.print(summary_table(summary))
                if summary.by_rule:
                    console.print(rules_table(summary))
    finally:
        executor.close()
    return summaries


def absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """The pipeline with its run folder, meta file and model paths made absolute."""
    models = {k: v.resolve() for k, v in config.models if v is not None}
    return config.model_copy(
        update={
            "run": config.run.resolve(),
            "meta": config.meta.resolve(),
            "models": config.models.model_copy(update=models),
        }
    )
