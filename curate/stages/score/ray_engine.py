"""The score stage on a Ray cluster: vLLM engines as Ray actors, data parallel over each batch.

One engine actor per ``num_gpus_per_engine`` GPUs (default: the stage's
``tensor_parallel_size``, so tensor parallelism stays inside an engine), as many actors as
``score.data_parallel_size`` asks for, else ``executor.engines``, else as the cluster's GPUs
allow: data parallelism is these engines, each one vLLM replica (vLLM refuses
``data_parallel_size`` in one ``LLM``). ``RayEngine`` has the interface the stage
uses of an engine (``run(requests) -> [RawOutput]``, ``stats``, ``close()``): each batch the
stage sends is cut into contiguous slices, one per actor (requests sharing a prompt stay
together, so each engine's prefix cache still sees them in a row), and the outputs come back
in request order.

Everything else is ``curate.stages.score.stage`` unchanged, on the driver: request building and
ordering, score reading from constrained choices and logprobs, partial results saved after
each batch (an interrupted run re-scores only the missing samples), decisions and ledger.
``RayScorer`` is that stage's ``Scorer`` with its engine made here.

Actors that die (a node lost) are restarted and their batch slice retried
(``max_restarts`` / ``max_task_retries``); vLLM requests are idempotent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from curate.core.errors import CurateError
from curate.stages.score.config import ScoreConfig
from curate.stages.score.engines import EngineRequest, EngineStats
from curate.stages.score.labels import LabelSet, RawOutput
from curate.stages.score.stage import Scorer

if TYPE_CHECKING:  # the pipeline hands its executor in; the stage never makes one
    from curate.core.executors import RayExecutor


class EngineLayoutError(CurateError):
    """The cluster cannot hold the judge engines as configured."""


ENGINE_RESTARTS = 2  # an engine actor (and its slice of a batch) is retried this often


class EngineActor:
    """One vLLM engine in a Ray actor (``ray.remote`` is applied when actors are made)."""

    def __init__(self, cfg: ScoreConfig, model: str, labels: LabelSet) -> None:
        from curate.stages.score.engines import VllmEngine

        self.engine = VllmEngine(cfg, Path(model), labels)

    def info(self) -> dict:
        """Where this engine runs (tests kill leftover engine processes by this pid)."""
        return {
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }

    def run(self, requests: list[EngineRequest]) -> list[RawOutput]:
        return self.engine.run(requests)


def engine_settings(cfg: ScoreConfig) -> ScoreConfig:
    """The settings of each actor's engine: one replica (Ray makes the replicas), and vLLM's
    own worker processes for tensor parallelism inside the actor's GPUs."""
    update: dict = {"data_parallel_size": 1}
    if cfg.tokenizer is not None:
        update["tokenizer"] = cfg.tokenizer.resolve()  # actors may start in another directory
    if cfg.tensor_parallel_size > 1 and "distributed_executor_backend" not in cfg.engine_kwargs:
        update["engine_kwargs"] = {**cfg.engine_kwargs, "distributed_executor_backend": "mp"}
    return cfg.model_copy(update=update)


def engine_layout(cfg: ScoreConfig, executor: RayExecutor) -> tuple[int, float]:
    """How many engine actors, and GPUs per actor, the cluster's resources give."""
    ecfg = executor.config
    gpus_each = (
        cfg.tensor_parallel_size if ecfg.num_gpus_per_engine is None else ecfg.num_gpus_per_engine
    )
    gpus = executor.resources().get("GPU", 0.0)
    if gpus_each > 0 and gpus < gpus_each:
        raise EngineLayoutError(
            f"the Ray cluster at {executor.where} has {gpus:g} GPUs; a vLLM engine needs "
            f"{gpus_each:g} (score.tensor_parallel_size / executor.num_gpus_per_engine). "
            "Add GPU nodes, or set executor.num_gpus_per_engine: 0 to score on CPUs."
        )
    wanted = cfg.data_parallel_size if cfg.data_parallel_size > 1 else ecfg.engines
    if cfg.data_parallel_size > 1 and ecfg.engines not in (None, cfg.data_parallel_size):
        raise EngineLayoutError(
            f"score.data_parallel_size {cfg.data_parallel_size} and executor.engines "
            f"{ecfg.engines} disagree on the number of judge engines: set one of them"
        )
    if wanted is not None:
        if gpus_each > 0 and gpus < wanted * gpus_each:
            raise EngineLayoutError(
                f"the Ray cluster at {executor.where} has {gpus:g} GPUs; {wanted} judge "
                f"engines of {gpus_each:g} GPUs each need {wanted * gpus_each:g}"
            )
        return wanted, gpus_each
    return (max(1, int(gpus // gpus_each)) if gpus_each > 0 else 1), gpus_each


def split_contiguous(n_items: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges of near-equal size covering ``n_items``;
    empty ranges are left out."""
    base, extra = divmod(n_items, parts)
    ranges, start = [], 0
    for k in range(parts):
        stop = start + base + (k < extra)
        if stop > start:
            ranges.append((start, stop))
        start = stop
    return ranges


class RayEngine:
    """A fleet of vLLM engine actors behind the stage's engine interface."""

    def __init__(
        self, cfg: ScoreConfig, model: Path, labels: LabelSet, executor: RayExecutor
    ) -> None:
        import ray

        executor.start()
        self.stats = EngineStats()
        n, gpus_each = engine_layout(cfg, executor)
        actor = ray.remote(
            num_cpus=executor.config.cpus_per_engine,
            num_gpus=gpus_each,
            max_restarts=ENGINE_RESTARTS,
            max_task_retries=ENGINE_RESTARTS,
        )(EngineActor)
        settings = engine_settings(cfg)
        self.actors = [actor.remote(settings, str(model), labels) for _ in range(n)]
        try:
            self.info = ray.get([a.info.remote() for a in self.actors])
        except ray.exceptions.RayError as e:
            self.close()
            raise EngineLayoutError(
                f"a vLLM engine actor did not start on the Ray cluster at {executor.where} "
                f"(is the judge model at {model} on every node?): {e}"
            ) from e
        self.where = executor.where

    def run(self, requests: Sequence[EngineRequest]) -> list[RawOutput]:
        import time

        import ray

        if not requests:
            return []
        t0 = time.perf_counter()
        ranges = split_contiguous(len(requests), len(self.actors))
        refs = [
            actor.run.remote(list(requests[a:b]))
            for actor, (a, b) in zip(self.actors, ranges, strict=False)
        ]
        try:
            parts = ray.get(refs)
        except ray.exceptions.RayActorError as e:
            raise EngineLayoutError(
                f"a vLLM engine actor on the Ray cluster at {self.where} died "
                f"{ENGINE_RESTARTS + 1} times: {e}"
            ) from e
        outputs = [raw for part in parts for raw in part]
        for raw in outputs:
            self.stats.add(raw)
        self.stats.seconds += time.perf_counter() - t0
        return outputs

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class RayScorer(Scorer):
    """The stage's Scorer (same requests, same score reading) with engines on Ray."""

    def __init__(self, cfg: ScoreConfig, model: Path, executor: RayExecutor) -> None:
        super().__init__(cfg, model)
        self.executor = executor

    def _engine(self):
        if self.engine is None:  # made on first use: a finished stage starts no actor
            self.engine = RayEngine(self.cfg, self.model, self.labels, self.executor)
            self._stats = self.engine.stats
        return self.engine


def report_engines(executor: RayExecutor, cfg: ScoreConfig) -> str:
    n, gpus_each = engine_layout(cfg, executor)
    return f"{n} engine actor{'s' * (n != 1)} ({gpus_each:g} GPU each)"
