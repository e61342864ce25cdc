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


@pytest.fixture(scope="session")
def ingested_run(demo_dir, tmp_path_factory) -> Path:
    """A run folder with the demo mixture ingested (read-only: copy it before writing)."""
    from curate.stages.ingest.config import IngestConfig
    from curate.stages.ingest.stage import ingest
    from curate.core.folder import RunFolder

    run = tmp_path_factory.mktemp("runs") / "ingested"
    ingest(str(demo_dir / "meta.json"), RunFolder(run), IngestConfig(shard_lines=40))
    return run


@pytest.fixture(scope="session")
def budgeted_run(ingested_run, tokenizer_dir, tmp_path_factory) -> Path:
    """The ingested demo run, budgeted too (read-only: copy it before writing)."""
    from curate.stages.budget.config import BudgetConfig
    from curate.stages.budget.stage import run_budget
    from curate.core.folder import RunFolder

    run = tmp_path_factory.mktemp("runs") / "budgeted"
    shutil.copytree(ingested_run, run)
    run_budget(RunFolder(run), BudgetConfig(), tokenizer_dir)
    return run


@pytest.fixture
def run_copy(tmp_path):
    """Copy a session run folder into this test's tmp_path: ``run_copy(budgeted_run)``."""

    def copy(src: Path) -> Path:
        dst = tmp_path / "run"
        shutil.copytree(src, dst)
        return dst

    return copy
