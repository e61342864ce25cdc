"""Pipeline files (YAML), validated with clear errors: unknown keys, wrong types, missing paths.

Relative paths in a pipeline file are resolved against the directory ``curate`` is run from.
Each stage's section is its own pydantic model (``extra="forbid"``), defined beside the stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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

from curate.budget.config import BudgetConfig
from curate.filters.config import FilterConfig
from curate.ingest.config import IngestConfig
from curate.inspect.config import ReportConfig
from curate.pack.config import PackConfig
from curate.score.config import ScoreConfig
from curate.train.config import TrainConfig


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


class ExecutorConfig(Strict):
    """Where shards run (``curate.executors``); the stages and their outputs do not change.

    ``local``: processes on this machine (each stage's ``workers``). ``ray``: every shard is
    a Ray task and the judge runs as vLLM engine actors; the run folder must be on storage
    every node sees at the same path. Ray is only imported for ``kind: ray``.
    """

    kind: Literal["local", "ray"] = Field("local", description="local | ray")
    address: str | None = Field(
        None,
        description='ray: null starts Ray on this machine; "auto" joins the cluster this '
        'machine belongs to (`ray start`); "HOST:6379" a head\'s GCS; "ray://HOST:10001" '
        "Ray Client",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="ray, address null only: CPUs of the local Ray (default: all)"
    )
    num_gpus_per_engine: float | None = Field(
        None,
        ge=0,
        description="score: GPUs per vLLM engine actor (default: the score stage's "
        "tensor_parallel_size); 0 runs the engines on CPUs",
    )
    engines: int | None = Field(
        None,
        ge=1,
        description="score: vLLM engine actors, data parallel over each batch (default: the "
        "cluster's GPUs // num_gpus_per_engine, 1 without GPUs)",
    )
    cpus_per_engine: int = Field(
        1,
        ge=1,
        description="score: CPUs each engine actor holds; on CPU engines also their threads "
        "(Ray sets OMP_NUM_THREADS to it; the thread count changes logprobs in the last bits)",
    )
    cpus_per_task: float = Field(1, gt=0, description="ray: CPUs each shard task holds")
    max_retries: int = Field(
        3, ge=0, description="ray: retries of a shard whose worker died (node lost, OOM-killed)"
    )
    connect_timeout_s: float = Field(
        10, gt=0, description="ray: how long to try the address before giving up"
    )


class StagesConfig(Strict):
    """Stages in the order they run; a stage left out (or null) is not run."""

    ingest: IngestConfig | None = None
    budget: BudgetConfig | None = None
    filter: FilterConfig | None = None
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
        return found


class PipelineError(ValueError):
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
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"pipeline file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a pipeline file is a mapping of settings")
    try:
        return PipelineConfig.model_validate(raw, context={"check_paths": check_paths})
    except ValidationError as e:
        raise PipelineError(_format(e, str(path))) from e
