"""``curate score``: LLM quality scores and the LLM repetition check over a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RunOpt = Annotated[Path, typer.Option("--run", help="run folder (ingested; filtered or not)")]


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


def score_with_progress(folder, cfg, model, *, print_summary: bool = True):
    """Run the stage with a progress bar (requests, samples/s, prefix-cache hit rate), then
    print the stage summary and the score distribution per domain."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from curate.console import console, rules_table, summary_table
    from curate.score.stage import count_requests, score_distribution, score_run

    total = count_requests(folder, cfg, folder.shards("samples"), model)
    columns = (
        TextColumn("[bold]score"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("requests, {task.fields[rate]} samples/s, cache hit {task.fields[hit]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("score", total=total, rate="-", hit="-")
        seen = {"samples": 0, "t0": time.perf_counter()}

        def on_chunk(jobs, stats) -> None:
            seen["samples"] += sum(j.check == "quality" for j in jobs)
            rate = seen["samples"] / max(time.perf_counter() - seen["t0"], 1e-9)
            hit = stats.cache_hit_rate
            progress.update(
                task,
                advance=len(jobs),
                rate=f"{rate:.1f}",
                hit="-" if hit is None else f"{hit:.1%}",
            )

        summary, report = score_run(folder, cfg, model, on_chunk=on_chunk)
    if print_summary:  # (the pipeline prints it for every stage itself)
        console.print(summary_table(summary))
        if summary.by_rule:
            console.print(rules_table(summary))
    console.print(distribution_table(score_distribution(folder)))
    hit = "n/a" if report.cache_hit_rate is None else f"{report.cache_hit_rate:.1%}"
    console.print(
        f"score: {report.samples} samples, {report.requests} requests in "
        f"{report.seconds:.1f} s ({report.samples_per_s:.1f} samples/s), "
        f"prefix-cache hit rate {hit}"
    )
    return summary


def run_score_stage(ctx):
    """Pipeline runner: ``stages.score`` with ``models.judge`` as the default judge."""
    cfg = ctx.config.stages.score
    model = cfg.model or ctx.config.models.judge
    if model is None:
        raise ValueError("the score stage needs score.model or models.judge in the pipeline file")
    return score_with_progress(ctx.run, cfg, model, print_summary=False)


def score_command(
    run: RunOpt,
    model: Annotated[Path, typer.Option(help="local HF judge LLM dir (also its tokenizer)")],
    engine: Annotated[
        str, typer.Option(help="vllm (offline, in process) | openai (a server)")
    ] = "vllm",
    server_url: Annotated[
        str, typer.Option(help="OpenAI-compatible base URL (engine openai)")
    ] = "http://127.0.0.1:8000/v1",
    served_model_name: Annotated[
        str | None, typer.Option(help="model name on the server (default: the first it lists)")
    ] = None,
    prompts_dir: Annotated[
        Path | None,
        typer.Option(help="folder of extra prompt files NAME.md (override built-ins by name)"),
    ] = None,
    domain_prompt: Annotated[
        list[str] | None, typer.Option(help="DOMAIN_OR_DATASET=PROMPT (repeatable)")
    ] = None,
    quality_threshold: Annotated[float, typer.Option(help="quality below this: reject")] = 7,
    repetition_threshold: Annotated[
        float, typer.Option(help="repetition score below this: review")
    ] = 3,
    threshold: Annotated[
        list[str] | None,
        typer.Option(help="per-domain quality threshold DOMAIN=VALUE (repeatable)"),
    ] = None,
    repetition_scope: Annotated[
        str, typer.Option(help="suspects (flagged by the filters) | all")
    ] = "suspects",
    batch_size: Annotated[
        int, typer.Option(help="requests per engine call (saved after each)")
    ] = 512,
    max_model_len: Annotated[int, typer.Option(help="judge context length")] = 4096,
    dtype: Annotated[str, typer.Option(help="vLLM dtype (float32 on CPU)")] = "auto",
    tensor_parallel_size: Annotated[int, typer.Option(help="vLLM tensor parallel GPUs")] = 1,
    concurrency: Annotated[int, typer.Option(help="requests in flight (engine openai)")] = 16,
) -> None:
    """Score every sample with a domain prompt (0-10, below threshold rejected) and check
    repetition suspects with the repetition prompt (below threshold: review)."""
    from curate.cli import _fail
    from curate.run import RunFolder, RunLockedError
    from curate.score.config import ScoreConfig
    from curate.score.engines import EngineError
    from curate.score.prompts import PromptError
    from curate.score.stage import ScoreStageError

    try:
        cfg = ScoreConfig(
            model=model,
            engine=engine,
            server_url=server_url,
            served_model_name=served_model_name,
            prompts_dir=prompts_dir,
            domain_prompts=dict(_pairs(domain_prompt)),
            quality_threshold=quality_threshold,
            repetition_threshold=repetition_threshold,
            quality_thresholds={k: float(v) for k, v in _pairs(threshold)},
            repetition_scope=repetition_scope,
            batch_size=batch_size,
            max_model_len=max_model_len,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            concurrency=concurrency,
        )
    except ValueError as e:
        _fail(f"bad option: {e}")
    folder = RunFolder(run)
    try:
        with folder.lock():
            score_with_progress(folder, cfg, model)
    except (RunLockedError, ScoreStageError, EngineError, PromptError) as e:
        _fail(str(e))


def _pairs(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out
