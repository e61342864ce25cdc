"""Run-folder bookkeeping: atomic commits, markers, count invariant, lock, fingerprints."""

from __future__ import annotations

import multiprocessing as mp

import pyarrow as pa
import pytest

from curate.core.io import write_parquet_atomic
from curate.core.records import LedgerEntry, ledger_table
from curate.core.folder import CountInvariantError, RunFolder, RunLockedError, ShardResult, run_shards


def _result(n_in: int, n_kept: int) -> ShardResult:
    entries = [LedgerEntry(f"id{i}", "ds", i, "t", "bad") for i in range(n_in - n_kept)]
    return ShardResult(
        {"out": pa.table({"x": list(range(n_kept))})},
        ledger_table(entries),
        n_in,
        n_kept,
        n_in - n_kept,
        rows_by_dataset={"ds": [n_in, n_kept, n_in - n_kept]},
    )


def test_run_shards_commits_and_skips(tmp_path):
    run = RunFolder(tmp_path)
    calls = []

    def process(shard):
        calls.append(shard)
        return _result(5, 3)

    s = run_shards(run, "t", ["a", "b"], process)
    assert (s.rows_in, s.rows_kept, s.rows_rejected, s.by_rule) == (10, 6, 4, {"reject:bad": 4})
    assert run.shards("out") == ["a", "b"] and len(run.ledger("t")) == 4
    s2 = run_shards(run, "t", ["a", "b"], process)
    assert calls == ["a", "b"] and s2.shards_skipped == 2 and s2.rows_in == 10
    run_shards(run, "t", ["a", "b"], process, fingerprint="new settings")
    assert calls == ["a", "b", "a", "b"]


def test_count_invariant_enforced(tmp_path):
    bad = _result(5, 3)
    bad.rows_rejected = 1  # a row vanished
    with pytest.raises(CountInvariantError):
        run_shards(RunFolder(tmp_path), "t", ["a"], lambda s: bad)
    assert not RunFolder(tmp_path).is_done("t", "a")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.parquet"
    with pytest.raises(Exception):  # noqa: B017 (any failure inside the writer)
        write_parquet_atomic("not a table", target)  # type: ignore[arg-type]
    assert not target.exists() and list(tmp_path.iterdir()) == []


def _hold_lock(path, ready, release):
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
            pytest.raises(RunLockedError, match="in use by another curate process"),
            RunFolder(tmp_path).lock(),
        ):
            pass
    finally:
        release.set()
        p.join(10)
    with RunFolder(tmp_path).lock():  # free again once the first process is done
        pass
