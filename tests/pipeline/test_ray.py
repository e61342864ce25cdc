"""Scale-out on Ray: the same pipeline on a Ray cluster gives the same run folder.

A local Ray (``ray.init(num_cpus=4)`` on this 2-core machine: more task slots than cores, as
Ray on a small CPU machine needs) stands in for a cluster, and the judge runs as one vLLM
engine actor on the CPU (``num_gpus_per_engine: 0``). Outputs are compared by digest: every
Parquet file's sorted rows, every marker and stats file without its timings; label
probabilities, which vLLM does not reproduce to the last bit even between two local runs,
to 1e-6. The score stage on Ray is the pipeline's ``RayScorer`` (vLLM engine actors).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
import xxhash

from curate.core.engine import Engine
from curate.core.executors import (
    ExecutorConfig,
    ExecutorError,
    RayExecutor,
    check_reachable,
    cluster_endpoint,
)
from curate.core.folder import RunFolder
from curate.core.stage import ShardInput, ShardOutput
from curate.pipeline.config import PipelineConfig, load_pipeline
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.stage import IngestStage
from curate.stages.score.ray_engine import split_contiguous

ROOT = Path(__file__).resolve().parents[2]
# The local engine computes with one thread per core; the engine actor gets as many CPUs (Ray
# sets its OMP_NUM_THREADS from them), else logprobs differ in the last bits.
THREADS = os.cpu_count() or 1
TIMINGS = {"seconds", "engine_seconds", "samples_per_s", "shards_skipped"}
# Hashes of files inside markers: the files themselves are compared (label probabilities to
# PROB_TOL, so the hashes of score outputs, and of what reads them, may differ in the bits).
FILE_HASHES = {"fingerprint", "output", "files"}
# Where and how a pipeline ran, not what it made (run.json records the pipeline).
WHERE = {"run", "executor"}


# -- digests of a run folder -------------------------------------------------------------------
def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _bytes_hex(obj):
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(type(obj))


def table_digest(path: Path) -> str:
    """xxh3 of a Parquet file's rows, sorted (row order is not part of a table's meaning)."""
    rows = pq.read_table(path).to_pylist()
    lines = sorted(orjson.dumps(r, default=_bytes_hex, option=orjson.OPT_SORT_KEYS) for r in rows)
    return f"{len(rows)}:{xxhash.xxh3_64_hexdigest(b''.join(line + b'|' for line in lines))}"


def _marker(data: dict) -> dict:
    """A marker without file hashes: its settings hash and the names of its inputs stay."""
    out = {k: v for k, v in data.items() if k not in FILE_HASHES}
    if "inputs" in out:
        out["inputs"] = {k: v if k == "settings" else "" for k, v in out["inputs"].items()}
    if "files" in data:
        out["files"] = sorted(data["files"])
    return out


def run_digest(run: Path) -> dict[str, str]:
    """Every output of a run folder by relative path: tables by sorted rows, JSON (markers,
    stats, run.json) without timings, file hashes and where the run folder was."""
    out = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if not p.is_file() or p.name.startswith(".") or rel.startswith("report"):
            continue
        if p.suffix == ".parquet":
            out[rel] = table_digest(p)
        elif p.suffix == ".json":
            data = _plain(orjson.loads(p.read_bytes()))
            if rel.startswith("_done/"):
                data = _marker(data)
            elif rel == "run.json" and "pipeline" in data:
                data["pipeline"] = {k: v for k, v in data["pipeline"].items() if k not in WHERE}
            out[rel] = xxhash.xxh3_64_hexdigest(orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
    return out


# -- a local Ray, torn down with everything it started ------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, out, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray on this machine with 4 task slots; teardown shuts it down and then SIGKILLs, by
    PID, whatever it started that is still alive (engine actors, VLLM::Worker processes)."""
    ray = pytest.importorskip("ray")
    before = _descendants(os.getpid())
    ray.init(num_cpus=max(4, THREADS), include_dashboard=False, logging_level="warning")
    yield ray
    started = {pid: _start_time(pid) for pid in _descendants(os.getpid()) - before}
    ray.shutdown()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_start_time(p) == t for p, t in started.items()):
        time.sleep(0.2)
    for pid, t in started.items():
        if t is not None and _start_time(pid) == t:  # the same process, not a reused PID
            os.kill(pid, signal.SIGKILL)


# -- settings ------------------------------------------------------------------------------------
def test_executor_block_defaults_to_local_and_takes_the_short_form(tmp_path):
    assert PipelineConfig.model_fields["executor"].default_factory().kind == "local"
    p = tmp_path / "p.yaml"
    p.write_text("run: r\nmeta: m.json\nexecutor: ray\nstages: {}\n")
    assert load_pipeline(p, check_paths=False).executor.kind == "ray"
    p.write_text(
        "run: r\nmeta: m.json\nstages: {}\n"
        "executor: {kind: ray, address: auto, num_gpus_per_engine: 0.5, engines: 8}\n"
    )
    cfg = load_pipeline(p, check_paths=False).executor
    assert (cfg.address, cfg.num_gpus_per_engine, cfg.engines) == ("auto", 0.5, 8)


def test_local_runs_never_import_ray():
    code = (
        "import sys, curate.cli.main, curate.pipeline.run, curate.core.executors; "
        "curate.core.executors.make_executor(None); assert 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_addresses_and_batch_slices():
    assert cluster_endpoint("ray://head:10001") == ("head", 10001)
    assert cluster_endpoint("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert cluster_endpoint("head") == ("head", 6379)
    assert split_contiguous(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_contiguous(2, 4) == [(0, 1), (1, 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_is_a_clear_error(demo_dir, tmp_path):
    pytest.importorskip("ray")
    port = _free_port()  # nothing listens here
    with pytest.raises(ExecutorError, match=f"ray://127.0.0.1:{port}"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout_s=2)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"run: {tmp_path / 'run'}\nmeta: {demo_dir / 'meta.json'}\n"
        f"executor: {{kind: ray, address: '127.0.0.1:{port}', connect_timeout_s: 2}}\n"
        "stages: {ingest: {shard_lines: 40}}\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "curate.cli.main", "run", str(pipeline)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in out
    assert "Traceback" not in out
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "samples").exists()  # failed before any work


# -- the demo pipeline, local and on Ray ---------------------------------------------------------
# Image, multi-image, video and text datasets of the demo, 97 lines: every stage sees every kind
# of sample and several shards per dataset, in a third of the time of the whole demo.
SUBSET = ("chart_qa", "multi_image_compare", "video_caption", "code_text", "science_text")
# vLLM on the CPU does not give bit-identical logprobs from one run to the next, even two
# local runs (measured: float32 label probabilities of long prompts move by ~3e-8). Scores,
# decisions and everything else must match exactly; probabilities to this tolerance.
PROB_TOL = 1e-6


def _subset_meta(demo_dir: Path, out: Path) -> Path:
    meta = orjson.loads((demo_dir / "meta.json").read_bytes())
    subset = {
        name: {
            **meta[name],
            "root": str(demo_dir / meta[name]["root"]),
            "annotation": str(demo_dir / meta[name]["annotation"]),
        }
        for name in SUBSET
    }
    out.write_bytes(orjson.dumps(subset))
    return out


def _pipeline(meta: Path, models: dict, run: Path, executor: dict) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "run": run,
            "meta": meta,
            "executor": executor,
            "models": {"tokenizer": models["tokenizer"], "judge": models["judge"]},
            "stages": {
                "ingest": {"shard_lines": 20},
                "budget": {"repeat_mode": "stable", "seed": 3},
                "filter": {"workers": 1},
                "score": {
                    "dtype": "float32",
                    "max_model_len": 2048,
                    "kv_cache_memory_bytes": 64 << 20,
                    "batch_size": 32,
                },
                "pack": {"max_tokens": 8192, "max_tiles": 40, "packs_per_shard": 8},
            },
        }
    )


def _is_float(value) -> bool:
    return isinstance(value, float) or (
        isinstance(value, list) and any(isinstance(v, float) for v in value)
    )


def assert_tables_close(want: Path, got: Path) -> None:
    """Same rows, float values (label probabilities, expected scores) within PROB_TOL."""

    def rows(path: Path) -> list[tuple[bytes, dict]]:
        out = []
        for r in pq.read_table(path).to_pylist():
            exact = {k: v for k, v in r.items() if not _is_float(v)}
            floats = {k: v for k, v in r.items() if _is_float(v)}
            out.append((orjson.dumps(exact, option=orjson.OPT_SORT_KEYS), floats))
        return sorted(out, key=lambda kv: kv[0])

    a, b = rows(want), rows(got)
    assert [k for k, _ in a] == [k for k, _ in b], got
    for (_, fa), (_, fb) in zip(a, b, strict=True):
        assert fa.keys() == fb.keys()
        for k in fa:
            va = fa[k] if isinstance(fa[k], list) else [fa[k]]
            vb = fb[k] if isinstance(fb[k], list) else [fb[k]]
            assert vb == pytest.approx(va, abs=PROB_TOL), (got, k)


def run_pipeline(config: PipelineConfig, scorer: type) -> dict:
    """Every stage of a pipeline brought up to date (as `curate run`); their summaries.

    ``scorer``: the judge the pipeline's score stage must make (Scorer, or RayScorer on Ray)."""
    from curate.pipeline.run import open_pipeline

    pipeline = open_pipeline(config)
    try:
        make = pipeline.engine.stages["score"].make_scorer
        assert getattr(make, "func", make) is scorer
        return pipeline.run_stages()
    finally:
        pipeline.close()


def test_the_score_stage_on_ray_uses_the_ray_scorer(demo_dir, demo_models, tmp_path):
    from curate.pipeline.run import build_stages
    from curate.stages.score.ray_engine import RayScorer
    from curate.stages.score.stage import Scorer

    meta = _subset_meta(demo_dir, tmp_path / "meta.json")
    for kind, scorer in (("local", Scorer), ("ray", RayScorer)):
        executor = RayExecutor(ExecutorConfig(kind="ray")) if kind == "ray" else None
        config = _pipeline(meta, demo_models, tmp_path / kind, {"kind": kind})
        (score,) = [s for s in build_stages(config, executor) if s.name == "score"]
        made = getattr(score.make_scorer, "func", score.make_scorer)
        assert made is scorer, kind
        if executor is not None:
            assert score.make_scorer.keywords == {"executor": executor}


@pytest.mark.slow
def test_ray_pipeline_equals_local(ray_cluster, demo_dir, demo_models, tmp_path):
    from curate.stages.score.ray_engine import RayScorer
    from curate.stages.score.stage import Scorer

    meta = _subset_meta(demo_dir, tmp_path / "meta.json")
    on_ray = {"kind": "ray", "num_gpus_per_engine": 0, "cpus_per_engine": THREADS}
    local_cfg = _pipeline(meta, demo_models, tmp_path / "local", {"kind": "local"})
    local = run_pipeline(local_cfg, Scorer)
    remote = run_pipeline(_pipeline(meta, demo_models, tmp_path / "ray", on_ray), RayScorer)
    assert ray_cluster.is_initialized()  # a Ray it did not start is left running

    want, got = run_digest(tmp_path / "local"), run_digest(tmp_path / "ray")
    for folder in ("samples/", "budget/", "filter/", "scores/", "ledger/", "packs/", "tokens/"):
        assert any(k.startswith(folder) for k in want), folder
    assert {
        "repeat/copies.parquet",
        "repeat/budget_table.json",
        "stats/score.json",
        "ledger/score/chart_qa-00000.parquet",
        "_done/score/chart_qa-00000.json",
        "_done/pack/all.json",
        "pack/all.parquet",
    } <= set(want)
    with_probs = ("scores/", "_cache/")
    assert {k: v for k, v in got.items() if not k.startswith(with_probs)} == {
        k: v for k, v in want.items() if not k.startswith(with_probs)
    }

    # Which shard decodes an image first (and so writes it into a filter cache part file) is up
    # to the timing of parallel shards; those files' names are not part of a run's result.
    def cached(files):
        return sorted(
            k
            for k in files
            if k.startswith(with_probs) and not re.match(r"_cache/filter/.*/(part|base)-", k)
        )

    assert cached(got) == cached(want)
    for k in cached(want):
        if k.endswith(".parquet"):
            assert_tables_close(tmp_path / "local" / k, tmp_path / "ray" / k)
    # upstream of the judge, the very same files: every marker's output hash is equal
    for stage in ("ingest", "budget", "repeat", "duplicates", "filter", "tokenize"):
        outputs = [
            {k: m["output"] for k, m in RunFolder(tmp_path / where).markers(stage).items()}
            for where in ("local", "ray")
        ]
        assert outputs[0] and outputs[0] == outputs[1], stage
    assert list(local) == list(remote)
    for stage, summary in local.items():
        counts = (summary.rows_in, summary.rows_kept, summary.rows_rejected, summary.by_rule)
        other = remote[stage]
        assert counts == (other.rows_in, other.rows_kept, other.rows_rejected, other.by_rule)
        assert summary.redone == other.redone and summary.report == other.report, stage
    scores = pq.read_table(tmp_path / "ray" / "scores").to_pylist()
    assert len(scores) > 50 and all(r["quality_score"] in range(11) for r in scores)


# -- a worker killed mid-shard ---------------------------------------------------------------------
class KillOnceIngest(IngestStage):
    """Ingest, but the first attempt at shard ``victim`` SIGKILLs its own worker after doing
    the work and before returning it; every attempt is logged in ``marker_dir``."""

    def __init__(self, config: IngestConfig, meta: str, marker_dir: str, victim: str) -> None:
        super().__init__(config, meta)
        self.marker_dir = marker_dir
        self.victim = victim

    def process(self, shard: ShardInput) -> ShardOutput:
        result = super().process(shard)
        with open(Path(self.marker_dir) / "attempts.txt", "a") as f:
            f.write(shard.shard + "\n")
        if shard.shard == self.victim:
            killed = Path(self.marker_dir) / "killed"
            try:
                os.close(os.open(killed, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return result  # the retry: finish normally
            os.kill(os.getpid(), signal.SIGKILL)
        return result


@pytest.mark.slow
def test_worker_killed_mid_shard_is_retried_without_losing_rows(
    ray_cluster, demo_dir, ingested_run, tmp_path
):
    meta = str(demo_dir / "meta.json")
    cfg = IngestConfig(shard_lines=40)  # as the session's ingested_run
    shards = IngestStage(cfg, meta).shards(RunFolder(tmp_path))
    victim = sorted(shards)[3]
    stage = KillOnceIngest(cfg, meta, str(tmp_path), victim)
    run = RunFolder(tmp_path / "run")
    executor = RayExecutor(ExecutorConfig(kind="ray", max_retries=2))
    with run.lock():
        summary = Engine(run, [stage], executor).run_stage("ingest")
    executor.close()
    assert ray_cluster.is_initialized()  # a Ray it did not start is left running

    attempts = (tmp_path / "attempts.txt").read_text().split()
    assert attempts.count(victim) == 2 and len(attempts) == len(shards) + 1
    assert sorted(summary.redone) == sorted(shards) and len(run.markers("ingest")) == len(shards)
    assert summary.rows_in == sum(d["lines"] for d in run.datasets().values())
    assert summary.rows_in == summary.rows_kept + summary.rows_rejected
    ids = run.read("samples").column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == summary.rows_kept  # none lost, none twice
    want = {
        k: v for k, v in run_digest(ingested_run).items() if k.startswith(("samples", "ledger"))
    }
    got = {k: v for k, v in run_digest(run.path).items() if k.startswith(("samples", "ledger"))}
    assert got == want  # the same shards as the local executor made
    local = RunFolder(ingested_run)
    assert run.stats("ingest")["by_dataset"] == local.stats("ingest")["by_dataset"]
    # the same markers: a later local command finds every shard done
    assert {k: m["output"] for k, m in run.markers("ingest").items()} == {
        k: m["output"] for k, m in local.markers("ingest").items()
    }
