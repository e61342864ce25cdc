"""The local executor: every shard once, and never more than a bounded number in flight (a
finished shard's rows are dropped once consumed, so the driver's memory stays flat)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from curate.core.executors import LocalExecutor, _bounded


def _square(shard: str) -> int:
    return int(shard) ** 2


def test_every_shard_once_in_a_pool():
    shards = [str(i) for i in range(9)]
    got = {s: r for s, r, _ in LocalExecutor().map_shards(_square, shards, workers=2)}
    assert got == {s: int(s) ** 2 for s in shards}


def test_submissions_stay_bounded_by_what_was_consumed():
    submitted = []

    class Counting(ThreadPoolExecutor):
        def submit(self, fn, *args):
            submitted.append(args[-1])
            return super().submit(fn, *args)

    with Counting(max_workers=2) as pool:
        outcomes = _bounded(pool, _square, [str(i) for i in range(20)], in_flight=3)
        consumed = 0
        for _ in outcomes:
            consumed += 1
            assert len(submitted) <= consumed + 3
    assert consumed == 20 and sorted(submitted, key=int) == [str(i) for i in range(20)]
