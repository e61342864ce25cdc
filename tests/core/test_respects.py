"""A stage's input leaves out what a respected earlier stage rejected — but only a stage of
this pipeline: an old ledger of a stage since removed from the pipeline file removes nothing."""

from __future__ import annotations

from curate.core.folder import RunFolder
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput, ShardOutput, ShardStage
from tests.conftest import run_stages


class KeepAll(ShardStage):
    """Keeps every sample of its input (so its rows are its input)."""

    name = "keepall"
    reads = ("ingest",)
    respects = ("filter",)

    def settings(self) -> dict:
        return {}

    def process(self, shard: ShardInput) -> ShardOutput:
        return ShardOutput(shard.samples(["sample_id", "dataset", "line"]))


class Filter(ShardStage):
    """A filter that rejects the first sample of every shard."""

    name = "filter"
    reads = ("ingest",)

    def settings(self) -> dict:
        return {}

    def process(self, shard: ShardInput) -> ShardOutput:
        rows = shard.table("samples", ["sample_id", "dataset", "line"])
        first = rows.slice(0, 1).to_pylist()[0]
        ledger = ledger_table(
            [LedgerEntry(first["sample_id"], first["dataset"], first["line"], "filter", "x")]
        )
        return ShardOutput(rows.slice(1), ledger)


def _ids(run: RunFolder, table: str) -> set[str]:
    return set(run.read(table, columns=["sample_id"])["sample_id"].to_pylist())


def test_respected_stage_only_when_in_the_pipeline(ingested_run, run_copy):
    run = RunFolder(run_copy(ingested_run))
    run_stages(run, Filter(None), KeepAll(None))
    rejected = set(run.ledger("filter")["sample_id"].to_pylist())
    assert rejected and _ids(run, "keepall") == _ids(run, "samples") - rejected

    # The filter section is dropped from the pipeline; its old ledger stays on disk.
    assert run.ledger_path("filter", run.shards("samples")[0]).exists()
    (run.path / "_done" / "filter").rename(run.path / "old_filter_markers")
    run_stages(run, KeepAll(None))
    assert _ids(run, "keepall") == _ids(run, "samples")
