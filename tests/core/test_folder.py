"""Run-folder bookkeeping through the engine: atomic commits, markers, resume after a crash,
the count invariant, the lock and its stale temp files."""

from __future__ import annotations

import multiprocessing as mp
import sys

import pyarrow as pa
import pytest
from pydantic import BaseModel

import curate.core.engine as engine_module
from curate.core.engine import Engine
from curate.core.folder import CountInvariantError, RunFolder, RunLockedError
from curate.core.io import write_parquet_atomic
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput, ShardOutput, ShardStage

SHARDS = {"a": 5, "b": 5}  # shard -> samples (lines 1..n of dataset "ds")


class ToyConfig(BaseModel):
    keep: int = 3  # lines above this are rejected by rule "bad"
    workers: int = 1


class ToyStage(ShardStage):
    """Keeps the first ``keep`` lines of each shard and rejects the others; records its calls.

    ``lose`` / ``invent`` / ``twice`` break the count invariant; ``crash_on`` raises."""

    name = "t"

    def __init__(self, config: ToyConfig, **faults) -> None:
        super().__init__(config)
        self.calls: list[str] = []
        self.faults = faults

    def process(self, shard: ShardInput) -> ShardOutput:
        self.calls.append(shard.shard)
        if self.faults.get("crash_on") == shard.shard:
            raise RuntimeError("killed mid-stage")
        rows = shard.samples().to_pylist()
        kept = [r for r in rows if r["line"] <= self.config.keep]
        entries = [
            LedgerEntry(r["sample_id"], r["dataset"], r["line"], self.name, "bad")
            for r in rows
            if r["line"] > self.config.keep
        ]
        if self.faults.get("lose"):
            entries = entries[1:]  # a rejected sample neither kept nor in the ledger
        if self.faults.get("invent"):
            kept.append({"sample_id": "nobody", "dataset": "ds", "line": 99})
        if self.faults.get("twice"):
            kept.append(kept[0])
        return ShardOutput(pa.Table.from_pylist(kept), ledger_table(entries))


class ToySource(ShardStage):
    """A source stage (like ingest): says how many lines it read."""

    name = "src"

    def __init__(self, rows_in: int) -> None:
        super().__init__(ToyConfig())
        self.rows_in = rows_in

    def shards(self, run: RunFolder) -> list[str]:
        return ["a"]

    def process(self, shard: ShardInput) -> ShardOutput:
        rows = [{"sample_id": "s1", "dataset": "ds", "line": 1}]
        return ShardOutput(pa.Table.from_pylist(rows), rows_in=self.rows_in)


def _run(tmp_path) -> RunFolder:
    """A run folder with ingested-looking ``samples/`` shards (only the key columns)."""
    run = RunFolder(tmp_path / "run")
    for shard, n in SHARDS.items():
        rows = [{"sample_id": f"{shard}{i}", "dataset": "ds", "line": i} for i in range(1, n + 1)]
        write_parquet_atomic(pa.Table.from_pylist(rows), run.shard_path("samples", shard))
    return run


def _ids(table: pa.Table) -> list[str]:
    return sorted(table["sample_id"].to_pylist())


ALL_IDS = sorted(f"{s}{i}" for s, n in SHARDS.items() for i in range(1, n + 1))


def test_engine_commits_and_skips(tmp_path):
    run = _run(tmp_path)
    stage = ToyStage(ToyConfig())
    s = Engine(run, [stage]).run_stage("t")
    assert (s.rows_in, s.rows_kept, s.rows_rejected, s.by_rule) == (10, 6, 4, {"reject:bad": 4})
    assert s.by_dataset == {"ds": [10, 6, 4, 0]} and s.redone == ["a", "b"]
    assert run.shards("t") == ["a", "b"] and len(run.ledger("t")) == 4
    assert set(run.markers("t")) == {"a", "b"} and run.stats("t")["rows_kept"] == 6
    s2 = Engine(run, [stage]).run_stage("t")
    assert stage.calls == ["a", "b"] and s2.shards_skipped == 2 and s2.rows_in == 10
    changed = ToyStage(ToyConfig(keep=4))
    s3 = Engine(run, [changed]).run_stage("t")
    assert changed.calls == ["a", "b"] and (s3.rows_kept, s3.rows_rejected) == (8, 2)
    assert len(run.ledger("t")) == 2  # the old ledger rows are replaced, not added to


def test_resume_after_crash_between_rows_and_marker(tmp_path, monkeypatch):
    """A process killed after a shard's rows are written but before its marker: the shard is
    redone, its rows replaced (not added to), and no row is lost."""
    run = _run(tmp_path)
    real = engine_module.write_json_atomic

    def die_at_marker_b(obj, path):
        if path == run.marker_path("t", "b"):
            raise KeyboardInterrupt("killed")
        real(obj, path)

    monkeypatch.setattr(engine_module, "write_json_atomic", die_at_marker_b)
    with pytest.raises(KeyboardInterrupt):
        Engine(run, [ToyStage(ToyConfig())]).run_stage("t")
    monkeypatch.undo()
    assert run.shards("t") == ["a", "b"] and set(run.markers("t")) == {"a"}

    stage = ToyStage(ToyConfig())
    s = Engine(run, [stage]).run_stage("t")
    assert stage.calls == ["b"] and s.redone == ["b"] and s.shards_skipped == 1
    assert (s.rows_in, s.rows_kept, s.rows_rejected) == (10, 6, 4)
    kept, ledger = run.read("t"), run.ledger("t")
    assert len(kept) == 6 and len(set(kept["sample_id"].to_pylist())) == 6  # none twice
    assert len(ledger) == 4
    assert sorted(_ids(kept) + _ids(ledger)) == ALL_IDS  # none lost


def test_resume_after_crash_in_a_redo(tmp_path):
    """A redo killed half way: the finished shards keep their new output, the unfinished one is
    not done (its old marker is gone first), and the next run redoes only it."""
    run = _run(tmp_path)
    Engine(run, [ToyStage(ToyConfig())]).run_stage("t")
    with pytest.raises(RuntimeError, match="killed mid-stage"):
        Engine(run, [ToyStage(ToyConfig(keep=4), crash_on="b")]).run_stage("t")
    assert set(run.markers("t")) == {"a"}  # b's stale marker is not left claiming b is done
    stage = ToyStage(ToyConfig(keep=4))
    s = Engine(run, [stage]).run_stage("t")
    assert stage.calls == ["b"] and (s.rows_kept, s.rows_rejected) == (8, 2)
    assert sorted(_ids(run.read("t")) + _ids(run.ledger("t"))) == ALL_IDS


@pytest.mark.parametrize(
    "fault, message",
    [
        ("lose", "neither kept nor rejected"),
        ("invent", "not in the input"),
        ("twice", "written twice"),
    ],
)
def test_count_invariant_enforced(tmp_path, fault, message):
    run = _run(tmp_path)
    with pytest.raises(CountInvariantError, match=message):
        Engine(run, [ToyStage(ToyConfig(), **{fault: True})]).run_stage("t")
    # Nothing of the bad shard is committed: no marker, no rows, no ledger.
    assert run.marker("t", "a") is None
    assert not run.shard_path("t", "a").exists() and not run.ledger_path("t", "a").exists()


def test_count_invariant_of_a_source_stage(tmp_path):
    run = RunFolder(tmp_path / "run")
    with pytest.raises(CountInvariantError, match="rows in 2 != kept 1 \\+ rejected 0"):
        Engine(run, [ToySource(rows_in=2)]).run_stage("src")
    assert run.marker("src", "a") is None
    assert Engine(run, [ToySource(rows_in=1)]).run_stage("src").rows_kept == 1


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.parquet"
    with pytest.raises(Exception):  # noqa: B017 (any failure inside the writer)
        write_parquet_atomic("not a table", target)  # type: ignore[arg-type]
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_stale_temp_files_removed_under_the_lock(tmp_path):
    run = _run(tmp_path)
    stale = [
        run.path / "samples" / ".a.parquet.x1y2.tmp",
        run.path / "_done" / "t" / ".a.json.abc.tmp",
        run.path / ".run.json.q.tmp",
    ]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half written")
    keep = run.path / "samples" / "notes.tmp"  # not one of ours: not hidden
    keep.write_bytes(b"x")
    with run.lock():
        assert not any(p.exists() for p in stale)
    assert keep.exists() and run.shards("samples") == ["a", "b"]


def _hold_lock(path, ready, release):
    sys.argv = ["curate", "filter", "--run", path]  # the holder's command line
    with RunFolder(path).lock():
        ready.set()
        release.wait(10)


def test_second_process_is_refused(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(20)
        with (
            pytest.raises(RunLockedError, match="in use by another curate process") as e,
            RunFolder(tmp_path).lock(),
        ):
            pass
        assert f"(pid {p.pid}: curate filter --run {tmp_path})" in str(e.value)
    finally:
        release.set()
        p.join(10)
    with RunFolder(tmp_path).lock():  # free again once the first process is done
        pass
