"""The ``curate`` command line: thin commands over the pipeline; the engine does the work.

Every command that touches a run folder takes ``--run RUN`` and holds the run's lock. Stage
commands take their settings from ``--config PIPELINE.yaml`` (else the pipeline the run last
ran with) and ``--set KEY=VALUE`` overrides of their section; ``--help`` lists the section's
settings from its config model, so there is one place that defines them.

Heavy libraries (torch, vllm, ray) are imported by the stages that need them, so
``curate --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from curate.cli.console import fail, user_errors
from curate.cli.pack import export_command
from curate.cli.review import review_command
from curate.cli.settings_help import section_help

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
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", help="pipeline YAML (default: the pipeline this run folder last ran with)"
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="KEY=VALUE setting of this stage's section (repeatable)"),
]


def run_section(
    section: str,
    run: Path,
    config: Path | None,
    sets: list[str] | None,
    defaults: dict | None = None,
    overrides: dict | None = None,
) -> None:
    """One command: its section's stages, on up-to-date earlier stages, under the lock."""
    from curate.cli.console import EngineProgress
    from curate.cli.show import show_summaries
    from curate.core.folder import RunFolder
    from curate.pipeline.config import config_for_run
    from curate.pipeline.run import open_pipeline

    with user_errors():
        if section != "ingest" and config is None and not (run / "run.json").exists():
            fail(f"{run} is not a run folder (no run.json): give --config or run `curate ingest`")
        cfg = config_for_run(
            run, config, section=section, sets=sets, defaults=defaults, overrides=overrides
        )
    with user_errors(), RunFolder(run).lock():
        with EngineProgress() as progress:
            pipeline = open_pipeline(cfg, progress)
            try:
                summaries = pipeline.run_section(section)
            finally:
                pipeline.close()
        show_summaries(pipeline, summaries)


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
    from curate.cli.console import console
    from curate.demo.data import make_demo, make_demo_models

    meta = make_demo(out_dir, seed=seed, scale=scale)
    console.print(f"meta JSON: {meta}")
    if models:
        for name, path in make_demo_models(out_dir).items():
            console.print(f"{name}: {path}")


@app.command(epilog=section_help("ingest"))
def ingest(
    meta: Annotated[Path, typer.Argument(help="InternVL meta JSON")],
    run: RunOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Read a meta JSON and its JSONL/Parquet annotations into the run folder's samples/."""
    run_section("ingest", run, config, set_, overrides={"meta": str(meta)})


@app.command(epilog=section_help("budget"))
def budget(
    run: RunOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="local HF tokenizer dir (models.tokenizer)")
    ] = None,
) -> None:
    """Tiles, visual and text tokens per sample, then repeat copies and the budget table."""
    run_section("budget", run, config, set_, overrides=_models(tokenizer=tokenizer))


@app.command("filter", epilog=section_help("filter"))
def filter_(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Exact duplicates, heuristic rules and repetition detectors; every failed rule goes to
    the ledger."""
    run_section("filter", run, config, set_)


@app.command(epilog=section_help("score"))
def score(
    run: RunOpt,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    judge: Annotated[
        Path | None, typer.Option(help="local HF judge LLM dir (models.judge)")
    ] = None,
) -> None:
    """LLM quality score (0-10, below threshold rejected) of what the filters kept, and the
    LLM repetition check of repetition suspects (below threshold: review)."""
    run_section("score", run, config, set_, overrides=_models(judge=judge))


@app.command(epilog=section_help("pack"))
def pack(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Tokenise, take the samples every earlier stage and review kept, and bin-pack them into
    padding-free sequences: RUN/packs/."""
    run_section("pack", run, config, set_)


@app.command(epilog=section_help("train"))
def train(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Train InternVL on the run's packs (stages 1, 1.5, 2): checkpoints, metrics, loss plot.

    Multi-GPU: ``torchrun --nproc-per-node 8 -m -- curate.cli.train --run RUN``.
    """
    from curate.cli.train import train_ranks, under_torchrun

    if under_torchrun():
        with user_errors():
            train_ranks(run, config, set_)
        return
    run_section("train", run, config, set_)


@app.command(epilog=section_help("report"))
def report(run: RunOpt, config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """One self-contained HTML report: counts, plots, rejected samples per rule."""
    run_section("report", run, config, set_)


@app.command("run")
def run_command(
    pipeline: Annotated[Path, typer.Argument(help="pipeline YAML (see pipelines/)")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be redone, and stop")
    ] = False,
) -> None:
    """Bring every stage of a pipeline up to date: redo exactly what changed since last time."""
    from curate.cli.console import EngineProgress, console
    from curate.cli.show import plan_table, show_summaries
    from curate.core.folder import RunFolder
    from curate.pipeline.config import load_pipeline
    from curate.pipeline.run import open_pipeline

    with user_errors():
        config = load_pipeline(pipeline)
        with RunFolder(config.run).lock(), EngineProgress() as progress:
            p = open_pipeline(config, progress)
            try:
                console.print(plan_table(p.plan(), title="what this run redoes"))
                if dry_run:
                    return
                summaries = p.run_stages()
            finally:
                p.close()
        show_summaries(p, summaries)


@app.command()
def status(
    run: Annotated[Path, typer.Argument(help="run folder")],
    config: ConfigOpt = None,
) -> None:
    """Per stage: done, stale (and why) or missing, with counts; changes nothing."""
    from curate.cli.console import console
    from curate.cli.show import plan_table
    from curate.core.folder import RunFolder
    from curate.pipeline.config import config_for_run
    from curate.pipeline.run import Pipeline

    with user_errors():
        if not (run / "run.json").exists() and config is None:
            fail(f"{run} is not a run folder (no run.json)")
        with RunFolder(run).lock():
            p = Pipeline(config_for_run(run, config))
            console.print(plan_table(p.plan(), title=f"status of {run}", run=p.run))


def _models(**models: Path | None) -> dict:
    # --judge / --tokenizer are models.* settings, outside the stage's own section.
    return {"models": {k: str(v) for k, v in models.items() if v is not None}}


app.command("export")(export_command)
app.command("review")(review_command)

if __name__ == "__main__":
    app()
