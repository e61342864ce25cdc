"""The progress bar counts shards already done before this run as finished."""

from __future__ import annotations

from curate.cli.console import EngineProgress
from curate.core.engine import Engine
from curate.core.folder import RunFolder
from tests.conftest import _recorded_stages
from tests.core.test_respects import KeepAll


def _run_with_events(run: RunFolder) -> list:
    events = []
    stage = KeepAll(None)
    engine = Engine(run, [*_recorded_stages(run, {"keepall": stage}), stage], None, events.append)
    engine.run_stage("keepall")
    return events


def test_bar_counts_shards_already_done(ingested_run, run_copy):
    run = RunFolder(run_copy(ingested_run))
    first = _run_with_events(run)
    shards = first[0].total
    assert shards >= 3 and first[0].done == 0
    run.marker_path("keepall", run.shards("samples")[0]).unlink()  # one shard to redo
    events = _run_with_events(run)
    start = events[0]
    assert (start.kind, start.total, start.done) == ("start", 1, shards - 1)
    bar = EngineProgress()
    for e in events[:-1]:  # before "end" stops the bar
        bar(e)
    task = bar.progress.tasks[0]
    assert task.total == shards and task.completed == shards
    bar.stop()
