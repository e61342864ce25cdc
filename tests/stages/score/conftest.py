"""Fixtures of the score tests: a small filtered run, one vLLM engine and one server for the
engine tests.

The engine (vLLM on the CPU, the tiny random judge) is made once and shared: starting it and
compiling its kernels takes most of the time these tests need.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The three shards of the demo the engine tests score (~75 samples, three prompts).
SMALL_SHARDS = ("chart_qa-00000", "code_text-00000", "science_text-00000")


def score_config(**overrides):
    from curate.stages.score.config import ScoreConfig

    settings = dict(
        dtype="float32", max_model_len=2048, kv_cache_memory_bytes=64 << 20, batch_size=64
    )
    settings.update(overrides)
    return ScoreConfig(**settings)


@pytest.fixture(scope="session")
def judge(demo_models) -> Path:
    return demo_models["judge"]


def keep_shards(run: Path, keep) -> None:
    """Cut an ingested run folder to the ``keep`` shards (samples and their ingest markers)."""
    for p in (run / "samples").glob("*.parquet"):
        if p.stem not in keep:
            p.unlink()
    for p in (run / "_done" / "ingest").glob("*.json"):
        if p.stem not in keep:
            p.unlink()


def filter_run(run: Path) -> None:
    """Run the filter section (duplicates, then the rules) with default settings: the score
    stage reads its results."""
    from curate.stages.filters.config import FilterConfig
    from curate.stages.filters.dedup import DuplicatesStage
    from curate.stages.filters.stage import FilterStage
    from tests.conftest import run_stages

    cfg = FilterConfig()
    run_stages(run, DuplicatesStage(cfg), FilterStage(cfg))


@pytest.fixture(scope="session")
def small_run(ingested_run, tmp_path_factory) -> Path:
    """The ingested demo run cut to three shards and filtered (read-only: copy it before
    writing)."""
    run = tmp_path_factory.mktemp("runs") / "small"
    shutil.copytree(ingested_run, run)
    keep_shards(run, SMALL_SHARDS)
    filter_run(run)
    return run


@pytest.fixture(scope="module")
def scorer(judge):
    """One offline vLLM engine for the engine tests (in process, float32, small KV cache).
    Module scope: closing it gives torch its thread settings back before other tests fork
    DataLoader workers (see VllmEngine.close)."""
    from curate.stages.score.stage import Scorer

    s = Scorer(score_config(), judge)
    s._engine()
    yield s
    s.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A vLLM OpenAI-compatible server started by module path, in its own process group."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--enforce-eager",
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
            "--served-model-name",
            "judge",
        ]
        self.log = log
        self._log_file = open(log, "wb")  # noqa: SIM115 (open while the server runs)
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 180) -> str:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vLLM server not healthy after {timeout_s} s")

    def stop(self) -> None:
        """SIGTERM the server's process group (its engine process too), SIGKILL leftovers."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children left behind, if any
        self._log_file.close()


@pytest.fixture(scope="module")
def judge_server_started(judge, tmp_path_factory):
    """Starts the server (about 30 s to healthy); tests that need it use ``judge_server``."""
    server = Server(judge, tmp_path_factory.mktemp("server") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def judge_server(judge_server_started) -> str:
    return judge_server_started.wait_ready()


def planted_filter(run: Path, reject, suspect) -> None:
    """Stand in for the filter stage in ``run`` (through the engine): the samples at position
    ``i`` of their shard with ``reject(i)`` are rejected, those with ``suspect(i)`` are
    repetition suspects."""
    import pyarrow as pa

    from curate.core.records import LedgerEntry, ledger_table
    from curate.core.stage import ShardOutput, ShardStage
    from tests.conftest import run_stages

    class PlantedFilter(ShardStage):
        name = "filter"
        reads = ("ingest",)

        def settings(self) -> dict:
            return {"planted": True}

        def process(self, shard):
            rows = shard.table("samples", ["sample_id", "dataset", "line"]).to_pylist()
            entries = []
            for i, r in enumerate(rows):
                r["decision"] = "reject" if reject(i) else "keep"
                r["repetition_suspect"] = bool(suspect(i))
                if reject(i):
                    entries.append(
                        LedgerEntry(r["sample_id"], r["dataset"], r["line"], "filter", "planted")
                    )
            return ShardOutput(pa.Table.from_pylist(rows), ledger_table(entries))

    run_stages(run, PlantedFilter(None))
