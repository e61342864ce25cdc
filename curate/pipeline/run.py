"""A pipeline file made into stages, run by the engine in one run folder.

Each section of ``stages:`` becomes one or two engine stages, in this order::

    ingest  -> ingest
    budget  -> budget, repeat          (tiles and tokens per shard; then repeat copies)
    filter  -> duplicates, filter      (exact duplicates over the run; then rules per shard)
    decontaminate -> signatures, decontaminate   (pHashes per shard; benchmark matches)
    neardup -> signatures, neardup_groups, neardup
                                       (MinHash + pHash per shard; clusters over the run,
                                        out of core; near_duplicate rows per shard)
    score   -> score
    pack    -> tokenize, pack
    train   -> train
    report  -> report

Ingest is always part of a pipeline (every stage reads its samples). A single command
(``curate filter``) runs its section's stages after checking that every stage before them is
up to date; ``curate run`` brings every stage up to date in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from curate.core.engine import Engine, Event, StageOrderError, StagePlan, StageSummary
from curate.core.executors import Executor, LocalExecutor, make_executor
from curate.core.folder import RunFolder
from curate.core.stage import Stage
from curate.pipeline.config import PipelineConfig, PipelineError
from curate.stages.budget.stage import BudgetStage, RepeatStage
from curate.stages.decontaminate.stage import DecontaminateStage
from curate.stages.filters.dedup import DuplicatesStage
from curate.stages.filters.stage import FilterStage
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.stage import IngestStage
from curate.stages.neardup.groups import NearDupGroupsStage
from curate.stages.neardup.signatures import SignaturesStage
from curate.stages.neardup.stage import NearDupStage
from curate.stages.pack.stage import PackStage
from curate.stages.pack.tokenize import TokenizeStage
from curate.stages.report.stage import ReportStage
from curate.stages.score.stage import ScoreStage
from curate.stages.train.stage import TrainStage

SECTIONS = {
    "ingest": ("ingest",),
    "budget": ("budget", "repeat"),
    "filter": ("duplicates", "filter"),
    "decontaminate": ("signatures", "decontaminate"),
    "neardup": ("signatures", "neardup_groups", "neardup"),
    "score": ("score",),
    "pack": ("tokenize", "pack"),
    "train": ("train",),
    "report": ("report",),
}


def _needs(value, what: str):
    if value is None:
        raise PipelineError(f"{what} is not set in the pipeline file")
    return value


def build_stages(config: PipelineConfig, executor: Executor | None = None) -> list[Stage]:
    """The engine stages a pipeline's sections make, in order."""
    s, models = config.stages, config.models
    stages: list[Stage] = [IngestStage(s.ingest or IngestConfig(), config.meta)]
    if s.budget is not None:
        tokenizer = _needs(models.tokenizer, "models.tokenizer (the budget stage counts tokens)")
        stages += [BudgetStage(s.budget, tokenizer), RepeatStage(s.budget)]
    if s.filter is not None:
        stages += [DuplicatesStage(s.filter), FilterStage(s.filter)]
    stages += _contamination_stages(config)
    # What removes a sample before the judge sees it (none of these need the judge).
    removed = tuple(n for n in ("filter", "decontaminate", "neardup") if getattr(s, n) is not None)
    if s.score is not None:
        judge = _needs(s.score.model or models.judge, "score.model or models.judge")
        score = ScoreStage(s.score, judge, _scorer_factory(executor))
        if removed != ("filter",):
            # Contaminated samples (and near-duplicates set to reject) are not worth a judge
            # call: the judge takes what every step before it kept.
            score.respects = removed
        stages.append(score)
    if s.pack is not None:
        _needs(s.budget, "stages.budget (pack packs the budget's grids)")
        tokenizer = _needs(models.tokenizer, "models.tokenizer")
        judged = (*removed, *(("score",) if s.score is not None else ()))
        decoded = s.filter is not None and s.filter.decode_images  # else tokenize decodes
        stages += [
            TokenizeStage(s.pack, tokenizer, s.budget.image_size, verify_images=not decoded),
            PackStage(s.pack, tokenizer, judged, ("score",) if s.score is not None else ()),
        ]
    if s.train is not None:
        if s.train.packs is None:  # else it trains on packs made elsewhere
            _needs(s.pack, "stages.pack (train trains on the packs)")
        stages.append(TrainStage(_train_config(config)))
    if s.report is not None:
        stages.append(ReportStage(s.report, tuple(st.name for st in stages)))
    return stages


def _contamination_stages(config: PipelineConfig) -> list[Stage]:
    """signatures (shared), decontaminate, then the near-duplicate steps.

    Decontamination runs first so that no contaminated sample is kept as the representative
    of a near-duplicate cluster (its copies would all be lost with it)."""
    s = config.stages
    if s.decontaminate is None and s.neardup is None:
        return []
    frames = s.decontaminate.video_frames if s.decontaminate is not None else 8
    stages: list[Stage] = [SignaturesStage(s.neardup, video_frames=frames)]
    if s.decontaminate is not None:
        stages.append(DecontaminateStage(s.decontaminate))
    if s.neardup is not None:
        excluded = ("decontaminate",) if s.decontaminate is not None else ()
        stages += [
            NearDupGroupsStage(s.neardup, excluded),
            NearDupStage(s.neardup, ("filter", *excluded)),
        ]
    return stages


def _scorer_factory(executor: Executor | None):
    if executor is not None and executor.kind == "ray":
        from curate.stages.score.ray_engine import RayScorer

        return partial(RayScorer, executor=executor)
    from curate.stages.score.stage import Scorer

    return Scorer


def _train_config(config: PipelineConfig):
    cfg = config.stages.train
    if cfg.tokenizer is None and cfg.model is None and cfg.llm is None:
        tokenizer = _needs(config.models.tokenizer, "models.tokenizer (or train.tokenizer)")
        cfg = cfg.model_copy(update={"tokenizer": tokenizer})
    return cfg


@dataclass
class PlannedStage:
    """What a run would do to one stage: its engine plan, or the stage it waits for."""

    plan: StagePlan
    waits_for: str = ""  # an earlier stage with work to do: this one's inputs may change


class Pipeline:
    """The stages of a pipeline file in its run folder (the caller holds the run's lock)."""

    def __init__(
        self,
        config: PipelineConfig,
        on_event: Callable[[Event], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.config = config
        self.run = RunFolder(config.run)
        self.executor = executor or LocalExecutor()
        self.stages = build_stages(config, self.executor)
        self.engine = Engine(self.run, self.stages, self.executor, on_event)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def plan(self, names: list[str] | None = None) -> list[PlannedStage]:
        """What bringing ``names`` (default: every stage) up to date would redo, and why."""
        planned, pending = [], []
        for name in names or self.names:
            ancestors = _ancestors(self, name)
            waits = next((u for u in pending if u in ancestors), "")
            plan = self.engine.plan(name)
            planned.append(PlannedStage(plan, waits))
            if plan.todo or plan.remove or plan.blocked or waits:
                pending.append(name)
        return planned

    def check_upstream(self, names: list[str]) -> None:
        """Refuse to run ``names`` on stale or missing earlier stages (single commands)."""
        first = self.names.index(names[0])
        if first == 0:
            return
        for planned in self.plan(self.names[:first]):
            plan = planned.plan
            if plan.blocked:
                raise StageOrderError(plan.blocked)
            if plan.todo or plan.remove:
                why = plan.todo[0].why if plan.todo else "shards removed upstream"
                raise StageOrderError(
                    f"{plan.stage} is not up to date ({len(plan.todo)} units to redo: {why}); "
                    f"run `curate run PIPELINE` (or that stage's command) first"
                )

    def run_stages(self, names: list[str] | None = None) -> dict[str, StageSummary]:
        """Bring stages up to date in pipeline order; returns each one's totals."""
        summaries = {}
        for name in names or self.names:
            stage = self.engine.stages[name]
            try:
                summaries[name] = self.engine.run_stage(name)
            finally:
                if hasattr(stage, "close"):  # the judge's engine: gone before training forks
                    stage.close()
        # Recorded once it worked (a failed --set must not stick to the run), with absolute
        # paths: a later command may run from another directory.
        self.run.record_info(pipeline=absolute_paths(self.config).model_dump(mode="json"))
        return summaries

    def close(self) -> None:
        self.executor.close()

    def run_section(self, section: str) -> dict[str, StageSummary]:
        """One command's stages (``filter`` -> duplicates, filter), on up-to-date inputs."""
        names = [n for n in SECTIONS[section] if n in self.names]
        if not names:
            raise PipelineError(f"the pipeline has no {section} section")
        self.check_upstream(names)
        return self.run_stages(names)


def _ancestors(pipeline: Pipeline, name: str) -> set[str]:
    stage = pipeline.engine.stages[name]
    direct = {*stage.reads, *stage.respects, *getattr(stage, "requires", ())}
    found = set(direct)
    for d in direct:
        if d in pipeline.engine.stages:
            found |= _ancestors(pipeline, d)
    return found


def prepare_demo(config: PipelineConfig) -> bool:
    """Build the demo mixture and tiny models when missing; True when it built the data."""
    from curate.demo.data import make_demo, make_demo_models

    demo = config.demo
    built = not (demo.dir / "meta.json").exists()
    if built:
        make_demo(demo.dir, seed=demo.seed, scale=demo.scale)
    make_demo_models(demo.dir, judge=True)
    return built


def open_pipeline(
    config: PipelineConfig, on_event: Callable[[Event], None] | None = None
) -> Pipeline:
    """A pipeline with its executor started (an unreachable cluster fails here, before work)."""
    if config.demo is not None:
        prepare_demo(config)
    executor = make_executor(config.executor)
    if executor.kind == "ray":
        # Tasks run in other processes and on other machines: no path may depend on this
        # directory. (Outputs do not change: stages record resolved paths already.)
        config = absolute_paths(config)
        executor.start()
    return Pipeline(config, on_event, executor)


def absolute_paths(config: PipelineConfig) -> PipelineConfig:
    """The pipeline with every path in it (run, meta, models, stage settings) made absolute."""
    return _resolve_paths(config)


def _resolve_paths(model):
    from pathlib import Path

    from pydantic import BaseModel

    update = {}
    for name, value in model:
        if isinstance(value, Path):
            update[name] = value.resolve()
        elif isinstance(value, BaseModel):
            update[name] = _resolve_paths(value)
    return model.model_copy(update=update)
