"""The review app's run: the planted demo run (tests/stages/report/conftest.py) with the
judge's 11 label probabilities added to its scores, so the sample view has its bar chart.

Planted (ids in ``ids``): ``flagged`` (duplicate_lines, doc_ocr), ``zero`` (zero_run,
math_text), ``many`` (eight many_rule flags, chart_qa) awaiting review; ``hostile`` (char_run)
and ``low`` (quality_below_threshold) rejected.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from tests.stages.report.conftest import planted_run  # noqa: F401 - a session fixture


def label_probs(score: int) -> list[float]:
    """A judge-like distribution over the labels 0..10, peaked at ``score``."""
    weights = [0.5 ** abs(k - score) for k in range(11)]
    total = sum(weights)
    return [w / total for w in weights]


def add_probs(run: RunFolder) -> None:
    """Give every score row its quality_probs (as the score stage writes them)."""
    for shard in run.shards("scores"):
        rows = run.read("scores", [shard]).to_pylist()
        for r in rows:
            r["quality_probs"] = label_probs(int(r["quality_score"]))
        table = pa.Table.from_pylist(rows)
        write_parquet_atomic(table, run.shard_path("scores", shard))


@pytest.fixture(scope="session")
def review_run(planted_run, tmp_path_factory) -> tuple[Path, dict]:  # noqa: F811
    """The planted run with judge probabilities (read-only: copy it before writing)."""
    src, ids = planted_run
    path = tmp_path_factory.mktemp("review") / "run"
    shutil.copytree(src, path)
    add_probs(RunFolder(path))
    return path, ids


@pytest.fixture
def review_copy(review_run, run_copy) -> tuple[RunFolder, dict]:
    """A copy of ``review_run`` this test may write to."""
    path, ids = review_run
    return RunFolder(run_copy(path)), ids
