"""Benchmark decontamination, shard by shard: ``decontaminate/`` rows + ``ledger/decontaminate``.

A training sample is contaminated when one of its images is within ``image_distance`` pHash
bits of a benchmark image, or one of its user turns shares a span of ``ngram`` words with a
benchmark question (see ``index``); it gets one ``benchmark_contamination`` ledger row per
benchmark it matches (default severity reject), naming the benchmark, the item id, and how
(image distance, or the shared words). ``decontaminate/<shard>.parquet`` keeps one row per
sample with every match, which the report's per-benchmark table counts.

The benchmarks are read and indexed once per command, on the driver, and shipped with the
stage to the workers; the training images' pHashes come from the ``signatures`` step, so no
training image is decoded twice. Which benchmark files exist, with their sizes and times, is
an input: a changed benchmark redoes every shard.
"""

from __future__ import annotations

import os

import orjson
import pyarrow as pa
import xxhash

from curate.core.folder import RunFolder
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput, ShardOutput, ShardStage
from curate.stages.decontaminate.benchmarks import benchmark_files, load_benchmarks
from curate.stages.decontaminate.config import DecontaminateConfig
from curate.stages.decontaminate.index import BenchmarkIndex

STAGE = "decontaminate"
RULE = "benchmark_contamination"
MATCH_TYPE = pa.struct(
    [
        ("benchmark", pa.string()),
        ("item", pa.string()),
        ("by", pa.string()),  # image | text
        ("distance", pa.int64()),  # image: pHash bits; text: null
        ("span", pa.string()),  # text: the shared words; image: null
    ]
)
DECONTAMINATE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("contaminated", pa.bool_()),
        ("matches", pa.list_(MATCH_TYPE)),
    ]
)
_SPAN_CHARS = 160  # shared words shown in a detail


class DecontaminateStage(ShardStage):
    """Removes training samples that contain benchmark items (see the module docstring)."""

    name = STAGE
    reads = ("ingest", "signatures")
    respects = ("filter",)

    def __init__(self, config: DecontaminateConfig) -> None:
        super().__init__(config)
        self.workers = config.workers or os.cpu_count() or 1
        self.index: BenchmarkIndex | None = None

    def settings(self) -> dict:
        cfg = self.config.model_dump(mode="json", exclude={"workers"})
        for b in cfg["benchmarks"]:
            b.pop("path")  # where it is does not matter, what it holds does (extra_inputs)
            b.pop("root")
        return cfg

    def extra_inputs(self, run: RunFolder) -> dict[str, str]:
        out = {}
        for bench in self.config.benchmarks:
            stats = [
                (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in benchmark_files(bench)
            ]
            out[f"benchmark:{bench.name}"] = xxhash.xxh3_64_hexdigest(orjson.dumps(stats))
        return out

    def prepare(self, run: RunFolder) -> None:
        if self.index is None:
            cfg = self.config
            found = load_benchmarks(cfg.benchmarks)
            self.index = BenchmarkIndex.build(found, cfg.ngram, cfg.min_words, cfg.image_distance)

    def process(self, shard: ShardInput) -> ShardOutput:
        if self.index is None:  # a worker that got the stage before prepare (tests)
            self.prepare(shard.run)
        samples = shard.samples(["sample_id", "dataset", "line", "conversations"])
        ids = samples.column("sample_id").to_pylist()
        matches: dict[str, list[dict]] = {i: [] for i in ids}
        if "image" in self.config.match:
            self._image_matches(shard, matches)
        if "text" in self.config.match:
            self._text_matches(samples, matches)
        rows, entries = [], []
        for s in samples.select(["sample_id", "dataset", "line"]).to_pylist():
            found = matches[s["sample_id"]]
            rows.append({**s, "contaminated": bool(found), "matches": found})
            entries += self._ledger(s, found)
        table = pa.Table.from_pylist(rows, schema=DECONTAMINATE_SCHEMA)
        return ShardOutput(table, ledger_table(entries))

    def _image_matches(self, shard: ShardInput, matches: dict[str, list[dict]]) -> None:
        sig = shard.table("signatures", ["sample_id", "image_hashes"]).to_pylist()
        owners, flat = [], []
        for r in sig:
            if r["sample_id"] not in matches:
                continue
            for h in r["image_hashes"] or []:
                if h is not None:
                    owners.append(r["sample_id"])
                    flat.append(h)
        pos, items, dist = self.index.image_matches(flat)
        for p, item, d in zip(pos.tolist(), items.tolist(), dist.tolist(), strict=True):
            matches[owners[p]].append(self._match(item, "image", distance=d))

    def _text_matches(self, samples: pa.Table, matches: dict[str, list[dict]]) -> None:
        ids = samples.column("sample_id").to_pylist()
        for sid, turns in zip(ids, samples.column("conversations").to_pylist(), strict=True):
            user = [t["text"] for t in turns or [] if t["role"] == "human"]
            hit = self.index.text_match(user)
            if hit is not None:
                item, span = hit
                matches[sid].append(self._match(item, "text", span=span[:_SPAN_CHARS]))

    def _match(self, item: int, by: str, distance: int | None = None, span: str | None = None):
        index = self.index
        return {
            "benchmark": index.names[int(index.bench_of_item[item])],
            "item": index.items[item],
            "by": by,
            "distance": distance,
            "span": span,
        }

    def _ledger(self, sample: dict, found: list[dict]) -> list[LedgerEntry]:
        """One row per benchmark matched: its closest image match, else its text match."""
        best: dict[str, dict] = {}
        for m in found:
            cur = best.get(m["benchmark"])
            if cur is None or _rank(m) < _rank(cur):
                best[m["benchmark"]] = m
        entries = []
        for bench, m in best.items():
            if m["by"] == "image":
                how = f"an image within {m['distance']} pHash bits of its image"
                value, threshold = float(m["distance"]), float(self.config.image_distance)
            else:
                how = f"a {len(m['span'].split())}-word span of its question: {m['span']!r}"
                value, threshold = float(len(m["span"].split())), float(self.config.ngram)
            others = sum(1 for x in found if x["benchmark"] == bench) - 1
            more = f" (+{others} more matches in {bench})" if others else ""
            entries.append(
                LedgerEntry(
                    sample["sample_id"],
                    sample["dataset"],
                    sample["line"],
                    STAGE,
                    RULE,
                    self.config.severity,
                    value,
                    threshold,
                    f"benchmark {bench} item {m['item']}: {how}{more}",
                )
            )
        return entries


def _rank(m: dict) -> tuple:
    return (0, m["distance"]) if m["by"] == "image" else (1, 0)
