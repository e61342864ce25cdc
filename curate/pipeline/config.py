"""Pipeline files (YAML), validated with clear errors: unknown keys, wrong types, missing paths.

Relative paths in a pipeline file are resolved against the directory ``curate`` is run from.
Each stage's section is its own pydantic model (``extra="forbid"``), defined beside the stage.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from curate.core.errors import CurateError
from curate.core.executors import ExecutorConfig
from curate.stages.budget.config import BudgetConfig
from curate.stages.decontaminate.config import DecontaminateConfig
from curate.stages.filters.config import FilterConfig
from curate.stages.ingest.config import IngestConfig
from curate.stages.neardup.config import NearDupConfig
from curate.stages.pack.config import PackConfig
from curate.stages.report.config import ReportConfig
from curate.stages.score.config import ScoreConfig
from curate.stages.train.config import TrainConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoConfig(Strict):
    """Build the demo mixture and tiny models into ``dir`` first, when they are missing."""

    dir: Path
    seed: int = 0
    scale: int = Field(1, ge=1, description="multiplies the number of samples per dataset")


class ModelsConfig(Strict):
    tokenizer: Path | None = Field(
        None, description="local HF tokenizer dir (internvl2_5 template)"
    )
    judge: Path | None = Field(None, description="local HF LLM dir that scores samples")


class StagesConfig(Strict):
    """Stages in the order they run; a stage left out (or null) is not run."""

    ingest: IngestConfig | None = None
    budget: BudgetConfig | None = None
    filter: FilterConfig | None = None
    decontaminate: DecontaminateConfig | None = None
    neardup: NearDupConfig | None = None
    score: ScoreConfig | None = None
    pack: PackConfig | None = None
    train: TrainConfig | None = None
    report: ReportConfig | None = None


class PipelineConfig(Strict):
    run: Path = Field(description="run folder every stage reads and writes")
    meta: Path = Field(description="InternVL meta JSON naming the datasets")
    executor: ExecutorConfig = Field(
        default_factory=ExecutorConfig, description="where shards run: local (default) or ray"
    )
    demo: DemoConfig | None = None
    models: ModelsConfig = ModelsConfig()
    stages: StagesConfig

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_kind(cls, value: object) -> object:
        # `executor: local` (the old form) and `executor: ray` name the kind alone.
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _paths_exist(self, info: ValidationInfo) -> PipelineConfig:
        # The demo section creates the meta file and models; otherwise they must already exist.
        check = (info.context or {}).get("check_paths", True)
        if self.demo is None and check:
            missing = [f"{name}: {p}" for name, p in self.paths_to_check() if not p.exists()]
            if missing:
                raise ValueError("missing paths: " + "; ".join(missing))
        return self

    def paths_to_check(self) -> list[tuple[str, Path]]:
        found = [("meta", self.meta)]
        found += [(f"models.{k}", v) for k, v in self.models if v is not None]
        if self.stages.decontaminate is not None:
            found += [
                (f"stages.decontaminate.benchmarks.{b.name}", b.path)
                for b in self.stages.decontaminate.benchmarks
            ]
        return found


class PipelineError(CurateError):
    """A pipeline file that cannot be run; the message names every problem."""


def _format(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid pipeline file"]
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_pipeline(path: str | Path, *, check_paths: bool = True) -> PipelineConfig:
    """Read and validate a pipeline YAML file; raises PipelineError with every problem listed.

    ``check_paths=False`` validates the settings alone (for a file prepared on another machine).
    """
    return validate(_read_yaml(Path(path)), str(path), check_paths=check_paths)


def apply_sets(raw: dict, sets: list[str], prefix: str = "") -> dict:
    """``KEY=VALUE`` overrides (dotted keys under ``prefix``; values read as YAML) applied
    to a pipeline mapping: ``--set rules.char_run.threshold=120`` under ``stages.filter``."""
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"--set wants KEY=VALUE, got {item!r}")
        path = [p for p in f"{prefix}.{key.strip()}".split(".") if p]
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise PipelineError(f"--set {item}: {part} is not a section")
            node = child
        try:
            node[path[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise PipelineError(f"--set {item}: value is not valid YAML: {e}") from e
    return raw


def validate(raw: dict, source: str, *, check_paths: bool = True) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw, context={"check_paths": check_paths})
    except ValidationError as e:
        raise PipelineError(_format(e, source)) from e


def config_for_run(
    run: Path,
    config: Path | None,
    *,
    section: str | None = None,
    sets: list[str] | None = None,
    defaults: dict | None = None,
    overrides: dict | None = None,
) -> PipelineConfig:
    """The pipeline a single command runs with: ``--config`` (else the one the run folder
    last ran with), ``defaults`` for what neither gives, ``overrides`` over both (the meta of
    `curate ingest`, `--judge`), then ``--set`` overrides of ``section``; the run folder is
    always ``run``."""
    if config is not None:
        source = str(config)
        raw = _read_yaml(config)
    else:
        source = f"{run}/run.json"
        recorded = _recorded(run)
        raw = recorded or {}
    raw = _merge(_merge(defaults or {}, raw), overrides or {})
    raw["run"] = str(run)
    if section is not None:
        raw.setdefault("stages", {})
        if raw["stages"].get(section) is None:
            raw["stages"][section] = {}
    raw = apply_sets(raw, sets or [], f"stages.{section}" if section else "")
    if sets:
        source += " with --set " + " ".join(sets)
    if "meta" not in raw:
        raise PipelineError(
            f"{run} has not been ingested and no --config names a meta JSON: "
            "run `curate ingest META --run RUN` or pass --config PIPELINE.yaml"
        )
    return validate(raw, source)


def _read_yaml(path: Path) -> dict:
    if not Path(path).is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a pipeline file is a mapping of settings")
    return raw


def _recorded(run: Path) -> dict | None:
    import orjson

    info = Path(run) / "run.json"
    if not info.exists():
        return None
    recorded = orjson.loads(info.read_bytes()).get("pipeline")
    if recorded is not None:
        recorded.pop("demo", None)  # the demo data exists once a run was made from it
    return recorded


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
