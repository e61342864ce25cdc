"""The run engine: what a rerun costs after a small change, against redoing everything.

Without an engine that knows what a change invalidates, the safe thing after fixing one
annotation line or changing one threshold is a fresh run; a stale-serving tool is faster but
wrong. This script builds the demo mixture at ``--scale``, runs ingest → budget → filter → pack
once, then measures (wall seconds, and the units the engine redid):

- a no-op rerun (planning alone: every input hashed and compared with the markers),
- a rerun after fixing one malformed line,
- a rerun after relaxing one filter threshold,
- a fresh run of the same pipeline in a new folder (the baseline).

    python bench/engine.py --scale 40
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import orjson


def pipeline(work: Path, run: Path, tokenizer: Path, zero_run: int):
    from curate.pipeline.config import validate

    return validate(
        {
            "run": str(run),
            "meta": str(work / "meta.json"),
            "models": {"tokenizer": str(tokenizer)},
            "stages": {
                "ingest": {"shard_lines": 2000, "workers": 2},
                "budget": {"workers": 2},
                "filter": {
                    "workers": 2,
                    "rules": {"zero_run": {"threshold": zero_run, "severity": "reject"}},
                },
                "pack": {"max_tokens": 8192, "max_tiles": 40, "workers": 2},
            },
        },
        "bench",
    )


def timed_run(config) -> tuple[float, dict[str, int]]:
    from curate.core.folder import RunFolder
    from curate.pipeline.run import Pipeline

    t0 = time.perf_counter()
    with RunFolder(config.run).lock():
        p = Pipeline(config)
        summaries = p.run_stages()
    seconds = time.perf_counter() - t0
    return seconds, {name: len(s.redone) for name, s in summaries.items()}


def same_tables(a: Path, b: Path) -> bool:
    """Do two run folders hold the same rows in every table the stages wrote?"""
    import polars as pl

    for name in ("samples", "budget", "filter", "tokens", "pack", "packs"):
        frames = [pl.read_parquet(sorted((run / name).glob("*.parquet"))) for run in (a, b)]
        key = "pack_id" if name == "packs" else "sample_id"
        if not frames[0].sort(key).equals(frames[1].sort(key)):
            return False
    return True


def fix_one_line(work: Path) -> None:
    """Replace the first malformed JSON line of the math dataset by a valid sample."""
    path = work / "annotations" / "math_text.jsonl"
    lines = path.read_bytes().split(b"\n")
    for i, line in enumerate(lines):
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            if line.strip():
                turns = [
                    {"from": "human", "value": "What is 12 times 12?"},
                    {"from": "gpt", "value": "12 times 12 is 144."},
                ]
                lines[i] = orjson.dumps({"conversations": turns})
                break
    path.write_bytes(b"\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=40, help="demo mixture multiplier")
    args = ap.parse_args()
    from curate.demo.data import make_demo, make_demo_models

    work = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    make_demo(work, seed=0, scale=args.scale)
    tokenizer = make_demo_models(work)["tokenizer"]
    run = work / "run"
    rows = []
    first, _ = timed_run(pipeline(work, run, tokenizer, 24))
    rows.append(("first run", first, "every unit"))
    seconds, redone = timed_run(pipeline(work, run, tokenizer, 24))
    rows.append(("no-op rerun", seconds, redone))
    fix_one_line(work)
    seconds, redone = timed_run(pipeline(work, run, tokenizer, 24))
    rows.append(("one line fixed", seconds, redone))
    seconds, redone = timed_run(pipeline(work, run, tokenizer, 10_000))
    rows.append(("one threshold relaxed", seconds, redone))
    fresh = work / "fresh"
    seconds, _ = timed_run(pipeline(work, fresh, tokenizer, 10_000))
    rows.append(("fresh run (baseline)", seconds, "every unit"))
    samples = sum(1 for _ in (run / "samples").glob("*.parquet"))
    print(f"demo scale {args.scale}: {samples} ingest shards")
    print(f"rerun tables identical to the fresh run's: {same_tables(run, fresh)}\n")
    print("| run | seconds | units redone per stage |")
    print("|---|---|---|")
    for name, secs, what in rows:
        print(f"| {name} | {secs:.2f} | {what} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
