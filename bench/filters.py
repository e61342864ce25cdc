"""Filters on real text, side by side: curate's rules against datatrove's
GopherRepetitionFilter and data-juicer's character / word repetition filters.

    python bench/corpus.py --seed 3 --out /tmp/corpus3.jsonl   # optional: look at the data
    python bench/filters.py --seed 3 --repeat 3 --peer-python /tmp/benchvenv/bin/python \
        --images 300

The data is ``bench/corpus.py``'s corpus for ``--seed``: real documents of this Python install
(clean), the same kind of documents ending in planted generation loops (loop), and first
sentences (short), each the one assistant answer of a text-only sample in its source's domain.
The report gives, per rule, the share of loops caught and of clean documents and short answers
flagged, beside the peers' decisions on the same texts; then speed per core (CPU seconds of one
process, best of ``--repeat``: the dev machine is shared); then, with ``--images``, the image
checks' decode rate and cache hit rate over two runs of the stage. Samples are judged without
a run folder, so the run-wide exact-duplicate rule does not take part (a window drawn twice is
not a false flag).

The peers are not project dependencies; put them in a separate venv first:

    python -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install "datatrove[processing]" spacy py-data-juicer aiohttp

Without ``--peer-python`` (or if a peer fails to import) only curate's figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Import the project from its root (this script may run from anywhere), and the corpus
# builder by its file path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))

SETS = ("loop", "clean", "short")
ONE_THREAD = {
    k: "1"
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS")
}

# --- the peers (run inside the bench venv) ------------------------------------------------------


def peer_main(which: str, texts_path: str, out_path: str, repeat: int) -> None:
    texts = json.loads(Path(texts_path).read_text())
    if which == "datatrove_gopher":
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherRepetitionFilter

        f = GopherRepetitionFilter()
        docs = [Document(text=t, id=str(i)) for i, t in enumerate(texts)]
        f.filter(docs[0])  # loads spaCy's tokenizer outside the timing

        def run():
            res = [f.filter(d) for d in docs]
            return [r is True for r in res], [None if r is True else r[1] for r in res]
    else:
        from data_juicer.ops.filter.character_repetition_filter import CharacterRepetitionFilter
        from data_juicer.ops.filter.word_repetition_filter import WordRepetitionFilter
        from data_juicer.utils.constant import Fields

        op = (
            CharacterRepetitionFilter(rep_len=10, max_ratio=0.5)
            if which == "dj_char"
            else WordRepetitionFilter(rep_len=10, max_ratio=0.5)
        )
        key = "char_rep_ratio" if which == "dj_char" else "word_rep_ratio"

        def run():
            samples = {"text": texts, Fields.stats: [{} for _ in texts]}
            samples = op.compute_stats_batched(samples)
            keep = list(op.process_batched(samples))
            return keep, [s[key] for s in samples[Fields.stats]]

    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        result = run()
        best = min(best, time.process_time() - t0)
    Path(out_path).write_text(json.dumps({"seconds": best, "keep": result[0], "extra": result[1]}))


def run_peer(python: str, which: str, texts_path: str, repeat: int) -> dict:
    import subprocess

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    proc = subprocess.run(
        [python, __file__, "--peer", which, texts_path, out, str(repeat)],
        capture_output=True,
        text=True,
        env={**os.environ, **ONE_THREAD},
        cwd="/tmp",
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(Path(out).read_text())


# --- curate --------------------------------------------------------------------------------------


def sample_rows(rows: list[dict]) -> list[dict]:
    """Corpus rows as sample rows (SAMPLE_SCHEMA): one question, the text as the answer."""
    return [
        {
            "sample_id": f"c{r['id']}",
            "dataset": f"corpus_{r['domain']}",
            "line": r["id"] + 1,
            "domain": r["domain"],
            "kind": "text",
            "conversations": [
                {"role": "human", "text": "Please write this out."},
                {"role": "gpt", "text": r["text"]},
            ],
            "images": [],
            "video": None,
            "extra": None,
        }
        for r in rows
    ]


def best_of(repeat: int, fn):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def curate_side(rows: list[dict], repeat: int) -> dict:
    import pyarrow as pa

    from curate.core.records import SAMPLE_SCHEMA, ledger_table
    from curate.stages.filters import repetition as rep
    from curate.stages.filters.config import FilterConfig
    from curate.stages.filters.stage import filter_table

    table = pa.Table.from_pylist(sample_rows(rows), schema=SAMPLE_SCHEMA)
    cfg = FilterConfig(decode_images=False)
    texts = [r["text"] for r in rows]

    def full():
        # What the stage does to a shard, but for reading and writing Parquet: measure, judge,
        # the output table and the ledger.
        kept, entries = filter_table(table, cfg, {})
        return kept, ledger_table(entries)

    res: dict = {}
    res["full_s"], (_, ledger) = best_of(repeat, full)
    fired: dict[str, set[str]] = {}
    for sid, rule in zip(ledger["sample_id"].to_pylist(), ledger["rule"].to_pylist(), strict=True):
        fired.setdefault(sid, set()).add(rule)
    res["rules"] = [sorted(fired.get(f"c{r['id']}", ())) for r in rows]
    res["char_s"], res["char"] = best_of(repeat, lambda: rep.char_repetition_ratios(texts, 10))
    res["word_s"], res["word"] = best_of(repeat, lambda: rep.word_repetition_ratios(texts, 10))
    return res


# --- images ----------------------------------------------------------------------------------


def image_side(n_images: int, samples: int, shards: int, seed: int) -> dict:
    """Two runs of the duplicate + filter stages over samples that share images across
    shards: decodes, cache hits and decode rate of each (the second is a rerun after a
    threshold change, which redoes every filter shard)."""
    import random

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from curate.core.engine import Engine
    from curate.core.folder import RunFolder
    from curate.core.io import write_json_atomic, write_parquet_atomic
    from curate.core.records import SAMPLE_SCHEMA
    from curate.stages.filters.config import FilterConfig
    from curate.stages.filters.dedup import DuplicatesStage
    from curate.stages.filters.images import read_cache_stats
    from curate.stages.filters.stage import FilterStage

    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="curate-bench-img-"))
    paths = []
    for i in range(n_images):
        w, h = rng.choice(((1280, 960), (1024, 768), (800, 600), (1920, 1080)))
        arr = np.random.default_rng(i).integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        im = Image.fromarray(arr).resize((w, h))
        path = root / "img" / (f"{i}.jpg" if i % 3 else f"{i}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=90) if path.suffix == ".jpg" else im.save(path, compress_level=1)
        paths.append((str(path), w, h))
    rows = []
    for k in range(samples):
        p, w, h = paths[rng.randrange(n_images)]
        rows.append(
            {
                "sample_id": f"s{k}",
                "dataset": "images",
                "line": k + 1,
                "domain": "general",
                "kind": "image",
                "conversations": [
                    {"role": "human", "text": f"<image>\nWhat is in image {k}?"},
                    {"role": "gpt", "text": f"A picture, number {k}."},
                ],
                "images": [{"path": p, "width": w, "height": h}],
                "video": None,
                "extra": None,
            }
        )
    run = RunFolder(root / "run")
    write_json_atomic(
        {"datasets": {"images": {"domain": "general"}}, "dataset_order": ["images"]},
        run.path / "run.json",
    )
    per = -(-samples // shards)
    for s in range(shards):
        part = pa.Table.from_pylist(rows[s * per : (s + 1) * per], schema=SAMPLE_SCHEMA)
        write_parquet_atomic(part, run.shard_path("samples", f"s-{s:04d}"))
    out = {"images": n_images, "samples": samples, "shards": shards, "runs": []}
    for threshold in (2.0, 3.0):
        cfg = FilterConfig(workers=1, rules={"image_blank": {"threshold": threshold}})
        t0 = time.process_time()
        Engine(run, [DuplicatesStage(cfg), FilterStage(cfg)]).run_stages()
        cpu = time.process_time() - t0
        out["runs"].append({"cpu_s": cpu, **read_cache_stats(run.path)})
    shutil.rmtree(root, ignore_errors=True)
    return out


# --- report ----------------------------------------------------------------------------------


def pct(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.1%}" if flags else "-"


def load_corpus_module():
    """``bench/corpus.py``, loaded by path (the bench folder is not on the import path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_corpus", BENCH / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> None:
    corpus_mod = load_corpus_module()

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clean", type=int, default=2000)
    ap.add_argument("--loops", type=int, default=1400)
    ap.add_argument("--short", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peer-python", default=None, help="python of the venv holding the peers")
    ap.add_argument("--images", type=int, default=0, help="unique images for the decode bench")
    ap.add_argument("--corpus", type=Path, default=None, help="read this corpus JSONL instead")
    args = ap.parse_args()

    if args.corpus:
        rows = [json.loads(x) for x in args.corpus.read_text().splitlines()]
    else:
        rows = corpus_mod.build(args.seed, args.clean, args.loops, args.short)
    texts = [r["text"] for r in rows]
    sets = [r["set"] for r in rows]
    n = len(rows)
    print(
        f"corpus seed {args.seed}: {n} answers, {sum(map(len, texts)) / n:,.0f} chars on average "
        f"({', '.join(f'{sets.count(s)} {s}' for s in SETS)})"
    )
    ours = curate_side(rows, args.repeat)

    peers: dict[str, dict] = {}
    if args.peer_python:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(texts, f)
            texts_path = f.name
        for which in ("datatrove_gopher", "dj_char", "dj_word"):
            peers[which] = run_peer(args.peer_python, which, texts_path, args.repeat)
    for k, v in peers.items():
        if "error" in v:
            print(f"peer {k} could not run: {v['error']}")
    peers = {k: v for k, v in peers.items() if "error" not in v}

    # -- what each rule catches ------------------------------------------------------------
    def by_set(flags: list[bool]) -> list[str]:
        return [pct([f for f, s in zip(flags, sets, strict=True) if s == want]) for want in SETS]

    fired = Counter(rule for rs in ours["rules"] for rule in rs)
    print("\n| rule | loops caught | clean documents flagged | short answers flagged |")
    print("|---|---:|---:|---:|")
    for rule in sorted(fired, key=lambda r: -fired[r]):
        print(
            f"| curate `{rule}` | "
            + " | ".join(by_set([rule in rs for rs in ours["rules"]]))
            + " |"
        )
    any_rule = [bool(rs) for rs in ours["rules"]]
    print("| **curate, any rule** | " + " | ".join(f"**{x}**" for x in by_set(any_rule)) + " |")
    names = {
        "datatrove_gopher": "datatrove GopherRepetitionFilter",
        "dj_char": "data-juicer character_repetition_filter (0.5)",
        "dj_word": "data-juicer word_repetition_filter (0.5)",
    }
    drops = {k: [not x for x in v["keep"]] for k, v in peers.items()}
    for k, flags in drops.items():
        print(f"| {names[k]} | " + " | ".join(by_set(flags)) + " |")
    if "dj_char" in drops and "dj_word" in drops:
        both = [a or b for a, b in zip(drops["dj_char"], drops["dj_word"], strict=True)]
        print("| data-juicer, both ops | " + " | ".join(by_set(both)) + " |")

    kinds = sorted({r["loop_kind"] for r in rows if r["loop_kind"]})
    print("\n| loops caught, by kind | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    sides = {"curate, any rule": any_rule, **{names[k]: f for k, f in drops.items()}}
    for name, flags in sides.items():
        cells = [
            pct([f for f, r in zip(flags, rows, strict=True) if r["loop_kind"] == k]) for k in kinds
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")

    src_kinds = sorted({r["kind"] for r in rows if r["set"] == "clean"})
    print("\n| clean documents flagged, by source | " + " | ".join(src_kinds) + " |")
    print("|---|" + "---:|" * len(src_kinds))
    for name, flags in sides.items():
        cells = []
        for k in src_kinds:
            picked = [
                f
                for f, r in zip(flags, rows, strict=True)
                if r["set"] == "clean" and r["kind"] == k
            ]
            cells.append(f"{sum(picked)}/{len(picked)}")
        print(f"| {name} | " + " | ".join(cells) + " |")

    # -- speed -----------------------------------------------------------------------------
    print("\n| side | CPU seconds | answers/s per core |\n|---|---:|---:|")
    table = [
        ("**curate: the whole filter stage (all rules, per answer)**", ours["full_s"]),
        ("curate: data-juicer char ratio formula alone", ours["char_s"]),
        ("curate: data-juicer word ratio formula alone", ours["word_s"]),
    ]
    table += [(names[k], v["seconds"]) for k, v in peers.items()]
    if "dj_char" in peers and "dj_word" in peers:
        table.append(
            (
                "data-juicer, both ops chained",
                peers["dj_char"]["seconds"] + peers["dj_word"]["seconds"],
            )
        )
    for name, s in table:
        print(f"| {name} | {s:.2f} | {n / s:,.0f} |")
    if "datatrove_gopher" in peers:
        gopher = peers["datatrove_gopher"]["seconds"]
        print(f"\nwhole stage vs datatrove Gopher, per core: {gopher / ours['full_s']:.1f}x")
    if "dj_char" in peers and "dj_word" in peers:
        dj = peers["dj_char"]["seconds"] + peers["dj_word"]["seconds"]
        print(f"whole stage vs data-juicer's two ops chained, per core: {dj / ours['full_s']:.2f}x")
    for key, peer in (("char", "dj_char"), ("word", "dj_word")):
        if peer in peers:
            same = sum(
                abs(a - b) < 1e-12 for a, b in zip(ours[key], peers[peer]["extra"], strict=True)
            )
            print(f"data-juicer {key} ratio: {same}/{n} values equal to curate's formula")

    if args.images:
        res = image_side(args.images, args.images * 4, 8, args.seed)
        print(
            f"\nimages: {res['images']} unique images (1/3 PNG, 2/3 JPEG, 800x600 to 1920x1080), "
            f"{res['samples']} samples over {res['shards']} shards, one worker"
        )
        print(
            "\n| run | CPU s | images looked up | decoded | cache hits | hit rate "
            "| decoded images/s |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for k, r in enumerate(res["runs"]):
            label = "first" if k == 0 else "rerun (threshold changed)"
            rate = f"{r['images_per_s']:,.0f}" if r["decoded"] else "-"
            print(
                f"| {label} | {r['cpu_s']:.2f} | {r['images']} | {r['decoded']} | {r['hits']} | "
                f"{r['hit_rate']:.1%} | {rate} |"
            )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
