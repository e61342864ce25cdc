"""Executors: where a stage's shards run. Stage code and bookkeeping are the same for all.

``curate.core.engine.Engine`` hands the unfinished shards and the stage's ``process(shard)`` to an
executor and commits each result on the driver as it arrives (atomic writes, the count
invariant, markers, stats), so resume, the ledger and the stats do not depend on where a shard
ran.

- ``LocalExecutor`` (the default): this process, or ``workers`` processes on this machine.
- ``RayExecutor``: every shard is a Ray task on a cluster (or a Ray started on this machine).
  A task whose worker dies mid-shard (OOM-killed, node lost) is retried ``max_retries``
  times; a shard's result only counts once the driver has committed it, so a retried shard is
  neither lost nor counted twice. Shards are files in the run folder, so the run folder must
  be on storage every node sees at the same path.

The score stage's vLLM engines on Ray are in ``curate.stages.score.ray_engine``. Ray is imported
only when a Ray executor starts.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from curate.core.errors import CurateError

if TYPE_CHECKING:
    from curate.core.stage import ShardOutput as ShardResult


class ExecutorConfig(BaseModel):
    """Where shards run (``curate.core.executors``); the stages and their outputs do not change.

    ``local``: processes on this machine (each stage's ``workers``). ``ray``: every shard is
    a Ray task and the judge runs as vLLM engine actors; the run folder must be on storage
    every node sees at the same path. Ray is only imported for ``kind: ray``.
    """

    model_config = ConfigDict(extra="forbid")

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


ShardOutcome = tuple[str, "ShardResult", float]  # shard, its result, seconds processing it


class ExecutorError(CurateError):
    """The executor cannot run the pipeline (cluster unreachable, Ray missing, no GPUs)."""


def timed(process: Callable[[str], ShardResult], shard: str) -> tuple[ShardResult, float]:
    """``process(shard)`` and the seconds it took (runs wherever the executor puts it)."""
    t0 = time.perf_counter()
    result = process(shard)
    return result, time.perf_counter() - t0


class Executor(Protocol):
    kind: str

    def map_shards(
        self, process: Callable[[str], ShardResult], shards: Sequence[str], *, workers: int = 1
    ) -> Iterator[ShardOutcome]:
        """Yield ``(shard, process(shard), seconds)`` for every shard, in any order."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Shards in this process, or in a pool of ``workers`` processes on this machine."""

    kind = "local"

    def map_shards(
        self, process: Callable[[str], ShardResult], shards: Sequence[str], *, workers: int = 1
    ) -> Iterator[ShardOutcome]:
        if workers > 1 and len(shards) > 1:
            # forkserver, not fork: a forked child of a process that already used polars' or
            # tokenizers' thread pools can hang on a lock held by a thread that did not survive.
            ctx = multiprocessing.get_context("forkserver")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                yield from _bounded(pool, process, shards, in_flight=workers + 1)
        else:
            for shard in shards:
                yield (shard, *timed(process, shard))

    def close(self) -> None:
        pass


def _bounded(
    pool: ProcessPoolExecutor,
    process: Callable[[str], ShardResult],
    shards: Sequence[str],
    in_flight: int,
) -> Iterator[ShardOutcome]:
    """Shards through the pool, at most ``in_flight`` submitted at once, yielded as they
    finish and then forgotten: a finished future holds its result (a whole shard's rows), so
    holding them all would make the driver's memory grow with the run."""
    queue = iter(shards)
    pending: dict = {}

    def submit() -> None:
        while len(pending) < in_flight:
            shard = next(queue, None)
            if shard is None:
                return
            pending[pool.submit(timed, process, shard)] = shard

    submit()
    while pending:
        done, _ = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            shard = pending.pop(fut)
            result, seconds = fut.result()
            submit()
            yield shard, result, seconds


def cluster_endpoint(address: str) -> tuple[str, int]:
    """Host and port of a Ray address: ``ray://HOST:10001`` (client) or ``HOST[:6379]`` (GCS)."""
    if "://" in address:
        parts = urlsplit(address)
        return parts.hostname or "", parts.port or 10001
    host, _, port = address.rpartition(":")
    if not host:
        return address, 6379
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast, with the address, when nothing listens there (Ray itself retries for long)."""
    try:
        host, port = cluster_endpoint(address)
    except ValueError as e:
        raise ExecutorError(
            f"executor.address {address!r} is not HOST:PORT or ray://HOST:PORT"
        ) from e
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ExecutorError(
            f"cannot reach the Ray cluster at {address} ({host}:{port}: {e.strerror or e}). "
            "Start a head node there with `ray start --head`, or set executor.address "
            '("auto" on a node of a running cluster, null for a Ray on this machine).'
        ) from None


class RayExecutor:
    """Each shard a Ray task (``cpus_per_task`` CPUs, ``max_retries`` on worker death).

    Connects on first use: to ``address`` (a running cluster), or starts Ray on this machine
    when ``address`` is null. A Ray already initialised in this process (tests, notebooks)
    is used as it is and left running by ``close``.
    """

    kind = "ray"

    def __init__(self, config: ExecutorConfig | None = None) -> None:
        self.config = config or ExecutorConfig(kind="ray")
        self._owns_ray = False
        self._started = False

    @property
    def where(self) -> str:
        return self.config.address or "a Ray started on this machine"

    def start(self) -> None:
        """Connect to the cluster (or start a local Ray); raises ExecutorError when it cannot."""
        if self._started:
            return
        try:
            import ray
        except ImportError as e:
            raise ExecutorError(
                'executor kind ray needs Ray: pip install "ray[data]" (or curate[ray])'
            ) from e
        if not ray.is_initialized():
            cfg = self.config
            if cfg.address not in (None, "auto", "local"):
                check_reachable(cfg.address, cfg.connect_timeout_s)
            kwargs: dict = {"address": cfg.address, "logging_level": "warning"}
            if cfg.address is None:
                kwargs.update(num_cpus=cfg.num_cpus, include_dashboard=False)
            try:
                ray.init(**kwargs)
            except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
                raise ExecutorError(
                    f"cannot connect to the Ray cluster at {self.where}: {e}"
                ) from e
            self._owns_ray = True
        self._started = True

    def resources(self) -> dict[str, float]:
        """The cluster's total resources (CPU, GPU, memory, ...)."""
        import ray

        self.start()
        return ray.cluster_resources()

    def map_shards(
        self, process: Callable[[str], ShardResult], shards: Sequence[str], *, workers: int = 1
    ) -> Iterator[ShardOutcome]:
        """Submit shards as tasks (at most twice the cluster's task slots in flight, so results
        do not pile up in the object store) and yield them as they finish. ``workers`` is the
        local executor's setting; on Ray the cluster's CPUs decide."""
        if not shards:
            return
        self.start()
        import ray
        from ray.exceptions import RayError, RayTaskError

        cfg = self.config
        task = ray.remote(num_cpus=cfg.cpus_per_task, max_retries=cfg.max_retries)(timed)
        process_ref = ray.put(process)  # shipped once, not with every task
        slots = int(self.resources().get("CPU", 1) / cfg.cpus_per_task)
        limit = max(2, 2 * slots)
        queue = iter(shards)
        pending: dict = {}

        def submit() -> None:
            while len(pending) < limit:
                shard = next(queue, None)
                if shard is None:
                    return
                pending[task.remote(process_ref, shard)] = shard

        try:
            submit()
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(ref)
                try:
                    result, seconds = ray.get(ref)
                except RayTaskError:
                    raise  # the stage's own exception (it is an instance of the original type)
                except RayError as e:
                    raise ExecutorError(
                        f"shard {shard} failed on the Ray cluster at {self.where} "
                        f"(after {cfg.max_retries} retries): {e}"
                    ) from e
                submit()
                yield shard, result, seconds
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        """Shut Ray down if this executor started it (or connected this process to it)."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
        self._started = False


def make_executor(config: ExecutorConfig | None) -> Executor:
    """The executor a pipeline's ``executor:`` block names (Ray connects on first use)."""
    if config is None or config.kind == "local":
        return LocalExecutor()
    return RayExecutor(config)
