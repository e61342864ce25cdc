"""Session fixtures: the demo mixture, the tiny local models, and an ingested demo run.

They are built once per test session (about 20 s); tests that write into a run folder copy
``ingested_run`` to their own tmp_path first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# vLLM and torch compile caches shared across tests (and CI steps) in one place.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "curate-inductor"))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from curate.demo.data import make_demo

    out = tmp_path_factory.mktemp("demo")
    make_demo(out, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_models(demo_dir) -> dict[str, Path]:
    from curate.demo.data import make_demo_models

    return make_demo_models(demo_dir, judge=True)


@pytest.fixture(scope="session")
def tokenizer_dir(demo_models) -> Path:
    return demo_models["tokenizer"]


def run_stages(run, *stages, executor=None) -> dict:
    """Bring ``stages`` (engine stage objects, upstream first) up to date in ``run`` through
    the engine, as a pipeline would; returns each one's StageSummary by name.

    Earlier stages of a run folder need not be passed: their markers are read from disk.
    """
    from curate.core.engine import Engine
    from curate.core.folder import RunFolder

    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    known = {s.name: s for s in stages}
    engine = Engine(folder, [*_recorded_stages(folder, known), *stages], executor)
    return {s.name: engine.run_stage(s.name) for s in stages}


def mark_planted(run, stage: str, shard: str) -> None:
    """Record a hand-written ledger or table of ``stage`` as that stage's output (a marker),
    as if the stage had run: the engine reads only the ledgers of stages the run has."""
    from curate.core.io import write_json_atomic

    marker = {"fingerprint": "planted", "inputs": {}, "output": f"planted-{shard}"}
    write_json_atomic(marker, run.marker_path(stage, shard))


def _recorded_stages(run, known: dict) -> list:
    """Stand-ins for stages that ran earlier in ``run`` (only their markers are read)."""
    from curate.core.stage import GlobalStage, ShardStage

    out = []
    done = run.path / "_done"
    for folder in sorted(done.iterdir()) if done.is_dir() else []:
        if folder.name in known:
            continue
        base = GlobalStage if (folder / "all.json").exists() else ShardStage
        table = {"ingest": "samples", "score": "scores", "tokenize": "tokens"}.get(folder.name)
        attrs = {"name": folder.name}
        if table:
            attrs["table"] = table
        out.append(type(f"Recorded_{folder.name}", (base,), attrs)(None))
    return out


@pytest.fixture(scope="session")
def ingested_run(demo_dir, tmp_path_factory) -> Path:
    """A run folder with the demo mixture ingested (read-only: copy it before writing)."""
    from curate.stages.ingest.config import IngestConfig
    from curate.stages.ingest.stage import IngestStage

    run = tmp_path_factory.mktemp("runs") / "ingested"
    run_stages(run, IngestStage(IngestConfig(shard_lines=40), demo_dir / "meta.json"))
    return run


@pytest.fixture(scope="session")
def budgeted_run(ingested_run, tokenizer_dir, tmp_path_factory) -> Path:
    """The ingested demo run, budgeted too (read-only: copy it before writing)."""
    from curate.stages.budget.config import BudgetConfig
    from curate.stages.budget.stage import BudgetStage, RepeatStage

    run = tmp_path_factory.mktemp("runs") / "budgeted"
    shutil.copytree(ingested_run, run)
    cfg = BudgetConfig()
    run_stages(run, BudgetStage(cfg, tokenizer_dir), RepeatStage(cfg))
    return run


@pytest.fixture
def run_copy(tmp_path):
    """Copy a session run folder into this test's tmp_path: ``run_copy(budgeted_run)``."""

    def copy(src: Path) -> Path:
        dst = tmp_path / "run"
        shutil.copytree(src, dst)
        return dst

    return copy
