"""Near-duplicates at scale: curate's signatures + grouping + ledger steps against data-juicer's
``document_minhash_deduplicator`` (text) and ``image_deduplicator`` (images), on the same
synthetic samples with planted near-duplicates; recall and precision of the planted pairs.

    python bench/neardup.py all --samples 100000 --peer-python /tmp/benchvenv-dedup/bin/python
    python bench/neardup.py all --samples 20000 --images 2000 --peer-python ...
    python bench/neardup.py signatures          # rensa vs datasketch on the same shingle sets

Peers are not project dependencies; put them in their own venv first:

    python -m venv /tmp/benchvenv-dedup
    /tmp/benchvenv-dedup/bin/pip install py-data-juicer imagehash datasketch rensa

The data: conversations from the demo's text generators (general, science, OCR; one or
two turns), each answer ending in ten random pseudo-words (the generators' small vocabulary
would otherwise make unrelated samples near-duplicates), split over two datasets. 5% are
near-duplicates of an earlier sample, a third each by whitespace/punctuation edits, reordered
turns, and a reworded answer (two words swapped); 1% are near-misses (the same question with
another answer). With ``--images M``, every sample has one of M scene images and the copies
carry the original's image resized, re-encoded or cropped by 1% (a third each); near-misses
there ask the same question about another image.

Each side runs under ``/usr/bin/time -v`` on one core (curate: ``workers: 1``, each of its
three steps in its own process, so each step's peak RSS is its own; data-juicer: ``num_proc``
1, one process): samples/s per core = samples / (user + sys CPU seconds, imports included),
and the peak resident set size (curate: the largest of its steps', each printed too; the
grouping step's ``partition_rows`` at its default). A sample counts as found when it is
marked (curate: a ``near_duplicate`` ledger row; data-juicer: removed); recall = planted
copies found / planted copies, precision = planted copies found / samples marked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1", "RAYON_NUM_THREADS": "1"}
SHARD_ROWS = 50_000
THRESHOLD = 0.7
NUM_PERM = 128
SHINGLE = 3

# --- the data ----------------------------------------------------------------------------------


def _gens():
    sys.path.insert(0, str(ROOT))
    from curate.demo import text as txt

    # Not math_qa: its three numbers repeat by chance every ~12,000 samples, making
    # conversations that differ only in the random tail (true Jaccard ~0.65, right at the
    # threshold), which would blur the precision of the planted pairs.
    return [
        txt.general_qa,
        txt.science_qa,
        lambda r: txt.ocr_qa(txt.document_lines(r, r.randint(4, 12))),
    ]


def _unique_tail(rng: random.Random) -> str:
    """Ten pseudo-words from a vocabulary of ~450,000: the demo generators draw from a few
    dozen words, so without this many unrelated samples would be near-duplicates by chance."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(10)) + "."


def _fresh(gens, rng: random.Random) -> tuple[str, str]:
    q, a = rng.choice(gens)(rng)
    return q, f"{a} {_unique_tail(rng)}"


def _edit(turns: list[tuple[str, str]], how: str, rng: random.Random) -> list[tuple[str, str]]:
    if how == "reorder" and len(turns) > 1:
        return turns[1:] + turns[:1]
    if how == "reword" or (how == "reorder" and len(turns) == 1):
        q, a = turns[-1]
        words = a.split(" ")
        for _ in range(2):
            words[rng.randrange(len(words))] = rng.choice(["quite", "rather", "indeed", "so"])
        return turns[:-1] + [(q, " ".join(words))]
    return [(q.replace(" ", "  "), a.replace(". ", " .  ").replace(",", "")) for q, a in turns]


def make(out: Path, n: int, n_images: int, seed: int) -> None:
    """``out/run/samples/*.parquet`` (curate), ``out/data.jsonl`` (data-juicer), truth."""
    import pyarrow as pa

    from curate.core.io import write_json_atomic, write_parquet_atomic
    from curate.core.records import SAMPLE_SCHEMA

    rng = random.Random(seed)
    gens = _gens()
    images = _make_images(out / "images", n_images, rng) if n_images else []
    rows, truth, near_miss = [], {}, []
    kinds = ("whitespace", "reorder", "reword")
    transforms = ("resized", "jpeg_q35", "cropped")
    for i in range(n):
        image = None
        u = rng.random()
        if i > 10 and u < 0.05:
            j = rng.randrange(i)
            while rows[j]["copy_of"] is not None:
                j = rng.randrange(i)
            turns = _edit(rows[j]["turns"], kinds[i % 3], rng)
            if images:
                image = _transformed(images[rows[j]["image_no"]], transforms[i % 3], out, i)
            truth[f"s{i}"] = f"s{j}"
            copy_of = j
        elif i > 10 and u < 0.06:
            j = rng.randrange(i)
            q, _ = rows[j]["turns"][0]
            turns = [(q, _fresh(gens, rng)[1])] + rows[j]["turns"][1:]
            if images:
                image = rng.randrange(len(images))
            near_miss.append(f"s{i}")
            copy_of = None
        else:
            turns = [_fresh(gens, rng) for _ in range(1 if rng.random() < 0.7 else 2)]
            copy_of = None
        image_no = image if isinstance(image, int) else None
        if images and image is None:
            image_no = rng.randrange(len(images))
        path = image if isinstance(image, str) else (images[image_no] if images else None)
        rows.append({"turns": turns, "copy_of": copy_of, "image_no": image_no, "path": path})
    samples, lines = [], []
    for i, r in enumerate(rows):
        ds = "synth_a" if i % 2 == 0 else "synth_b"
        convs = []
        for q, a in r["turns"]:
            convs += [{"role": "human", "text": q}, {"role": "gpt", "text": a}]
        if r["path"]:
            convs[0] = {"role": "human", "text": "<image>\n" + convs[0]["text"]}
        samples.append(
            {
                "sample_id": f"s{i}",
                "dataset": ds,
                "line": i // 2 + 1,
                "domain": "general",
                "kind": "image" if r["path"] else "text",
                "conversations": convs,
                "images": [{"path": r["path"], "width": 0, "height": 0}] if r["path"] else [],
                "video": None,
                "extra": None,
            }
        )
        text = "\n".join(t["text"] for t in convs)
        lines.append({"id": f"s{i}", "text": text, "images": [r["path"]] if r["path"] else []})
    run = out / "run"
    shards = []
    for k in range(0, n, SHARD_ROWS):
        name = f"synth-{k // SHARD_ROWS:05d}"
        table = pa.Table.from_pylist(samples[k : k + SHARD_ROWS], schema=SAMPLE_SCHEMA)
        write_parquet_atomic(table, run / "samples" / f"{name}.parquet")
        marker = {"fingerprint": "bench", "inputs": {}, "output": f"bench-{name}"}
        write_json_atomic(marker, run / "_done" / "ingest" / f"{name}.json")
        shards.append(name)
    datasets = {d: {"name": d, "domain": "general"} for d in ("synth_a", "synth_b")}
    write_json_atomic({"datasets": datasets, "dataset_order": list(datasets)}, run / "run.json")
    with open(out / "data.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    sets = {s["sample_id"]: _true_set(s["conversations"]) for s in samples}
    jaccard = {a: _jaccard(sets[a], sets[b]) for a, b in truth.items()}
    (out / "truth.json").write_text(
        json.dumps({"copies": truth, "near_misses": near_miss, "jaccard": jaccard})
    )


def _true_set(conversations: list[dict]) -> set[str]:
    from curate.stages.neardup.config import Shingle
    from curate.stages.neardup.text import conversation_shingles

    return set(conversation_shingles(conversations, Shingle(unit="word", size=SHINGLE)))


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def _make_images(folder: Path, n: int, rng: random.Random) -> list[str]:
    from curate.demo import images as img

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = folder / f"img_{k}.jpg"
        img.save(img.scene(rng, 480, 360), path, quality=90)
        paths.append(str(path))
    return paths


def _transformed(path: str, how: str, out: Path, i: int) -> str:
    from PIL import Image

    from curate.demo import images as img

    im = Image.open(path).convert("RGB")
    dest = out / "images" / f"copy_{i}.jpg"
    if how == "resized":
        img.save(img.resized(im, 0.6), dest)
    elif how == "jpeg_q35":
        img.save(im, dest, quality=35)
    else:
        img.save(img.cropped(im, 0.01), dest)
    return str(dest)


# --- the sides ---------------------------------------------------------------------------------


STEPS = ("signatures", "neardup_groups", "neardup")


def _engine(data: Path):
    from curate.core.engine import Engine
    from curate.core.folder import RunFolder
    from curate.core.stage import ShardStage
    from curate.stages.neardup.config import NearDupConfig, Shingle
    from curate.stages.neardup.groups import NearDupGroupsStage
    from curate.stages.neardup.signatures import SignaturesStage
    from curate.stages.neardup.stage import NearDupStage

    cfg = NearDupConfig(
        threshold=THRESHOLD,
        shingle=Shingle(unit="word", size=SHINGLE),
        num_perm=NUM_PERM,
        workers=1,
    )
    ingest = type("RecordedIngest", (ShardStage,), {"name": "ingest", "table": "samples"})(None)
    stages = [ingest, SignaturesStage(cfg), NearDupGroupsStage(cfg), NearDupStage(cfg, ())]
    return Engine(RunFolder(data / "run"), stages)


def curate_step(data: Path, name: str) -> dict:
    """One step in this process (the caller times the process): its CPU s inside the step."""
    engine = _engine(data)
    t0 = time.process_time()
    engine.run_stage(name)
    return {"cpu_s": round(time.process_time() - t0, 2)}


def curate_side(data: Path) -> dict:
    """curate's three steps, each in its own process under /usr/bin/time -v: its peak RSS is
    its own (the grouping's is not hidden under the signatures'), CPU includes imports."""
    import shutil

    from curate.core.folder import RunFolder

    run = RunFolder(data / "run")
    for folder in ("signatures", "neardup_groups", "neardup", "_cache", "ledger", ".staging"):
        shutil.rmtree(run.path / folder, ignore_errors=True)
    for stage in STEPS:
        shutil.rmtree(run.path / "_done" / stage, ignore_errors=True)
    steps = {}
    for name in STEPS:
        result, m = timed([sys.executable, __file__, "_curate_step", str(data), name], ONE_THREAD)
        if "error" in result:
            return {"error": f"{name}: {result['error']}"}
        steps[name] = {**m, "cpu_in_step_s": result["cpu_s"]}
    marked = run.ledger("neardup")["sample_id"].to_pylist()
    report = run.marker("neardup_groups", "all")["report"]
    return {"marked": marked, "steps": steps, "report": report}


def _organic(data: Path, run) -> list[float]:
    """True Jaccard of each marked sample outside the planted pairs with its kept sample:
    near-duplicates the generators made by chance (templated text)."""
    truth = json.loads((data / "truth.json").read_text())
    in_pairs = set(truth["copies"]) | set(truth["copies"].values())
    members = [
        m
        for m in run.read("neardup_groups").to_pylist()
        if m["role"] == "duplicate" and m["sample_id"] not in in_pairs
    ]
    wanted = {m["sample_id"] for m in members} | {m["kept_id"] for m in members}
    convs = {
        r["sample_id"]: r["conversations"]
        for r in run.read("samples", columns=["sample_id", "conversations"]).to_pylist()
        if r["sample_id"] in wanted
    }
    return [
        _jaccard(_true_set(convs[m["sample_id"]]), _true_set(convs[m["kept_id"]])) for m in members
    ]


def _rows(data: Path) -> list[dict]:
    with open(data / "data.jsonl") as f:
        return [json.loads(line) for line in f]


def peer_text_side(data: Path) -> dict:
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.deduplicator.document_minhash_deduplicator import (
        DocumentMinhashDeduplicator,
    )
    from datasets import Dataset

    rows = _rows(data)
    ds = NestedDataset(Dataset.from_list([{"id": r["id"], "text": r["text"]} for r in rows]))
    op = DocumentMinhashDeduplicator(
        tokenization="space",
        window_size=SHINGLE,
        lowercase=True,
        ignore_pattern=r"\p{P}",
        num_permutations=NUM_PERM,
        jaccard_threshold=THRESHOLD,
    )
    ds = ds.map(op.compute_hash, num_proc=1)
    kept, _ = op.process(ds)
    kept_ids = set(kept["id"])
    return {"marked": [r["id"] for r in rows if r["id"] not in kept_ids]}


def peer_image_side(data: Path) -> dict:
    from data_juicer.core.data import NestedDataset
    from data_juicer.ops.deduplicator.image_deduplicator import ImageDeduplicator
    from datasets import Dataset

    rows = _rows(data)
    ds = NestedDataset(Dataset.from_list(rows))
    op = ImageDeduplicator(method="phash", consider_text=True)
    ds = ds.map(op.compute_hash, num_proc=1)
    kept, _ = op.process(ds)
    kept_ids = set(kept["id"])
    return {"marked": [r["id"] for r in rows if r["id"] not in kept_ids]}


def score(data: Path, marked: list[str]) -> dict:
    """Pairs, whichever copy a side keeps (curate: meta order then line; data-juicer: the
    first row): a planted pair is found when one of its two samples is marked; a marked
    sample is right when it belongs to a planted pair."""
    truth = json.loads((data / "truth.json").read_text())
    pairs, misses = truth["copies"], set(truth["near_misses"])
    in_pairs = set(pairs) | set(pairs.values())
    found = set(marked)
    hit = sum(1 for a, b in pairs.items() if a in found or b in found)
    above = {a: b for a, b in pairs.items() if truth["jaccard"][a] >= THRESHOLD}
    hit_above = sum(1 for a, b in above.items() if a in found or b in found)
    return {
        "planted": len(pairs),
        "planted_above": len(above),
        "marked": len(found),
        "recall": round(hit / max(len(pairs), 1), 4),
        "recall_above": round(hit_above / max(len(above), 1), 4),
        "precision": round(len(found & in_pairs) / max(len(found), 1), 4),
        "near_misses_marked": len(found & misses),
    }


# --- measuring ---------------------------------------------------------------------------------


def timed(cmd: list[str], env: dict) -> tuple[dict, dict]:
    """Run ``cmd`` under /usr/bin/time -v; (its JSON result, wall/cpu/RSS)."""
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env={**os.environ, **env}
    )
    err = proc.stderr

    def field(name: str) -> str:
        m = re.search(rf"{re.escape(name)}: (.+)", err)
        return m.group(1).strip() if m else "0"

    if proc.returncode != 0:
        tail = [x for x in err.splitlines() if x.strip() and not x.startswith("\t")][-3:]
        return {"error": " | ".join(tail)}, {}
    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")
    seconds = sum(float(x) * 60**k for k, x in enumerate(reversed(wall)))
    cpu = float(field("User time (seconds)")) + float(field("System time (seconds)"))
    rss = int(field("Maximum resident set size (kbytes)")) / 1024
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, {"wall_s": round(seconds, 1), "cpu_s": round(cpu, 1), "rss_mb": round(rss)}


def run_all(args) -> None:
    data = Path(args.data)
    if not (data / "truth.json").exists() or args.remake:
        t0 = time.time()
        make(data, args.samples, args.images, args.seed)
        print(f"made {args.samples:,} samples ({args.images} images) in {time.time() - t0:.0f} s")
    n = len(_rows(data))
    sides: list[tuple[str, list[str] | None]] = [("curate (rensa MinHash-LSH + pHash)", None)]
    if args.peer_python:
        op = "_peer_image" if args.images else "_peer_text"
        name = (
            "data-juicer image_deduplicator (phash, consider_text)"
            if args.images
            else "data-juicer document_minhash_deduplicator"
        )
        sides.append((name, [args.peer_python, __file__, op, str(data)]))
    print(f"\n{n:,} samples; threshold {THRESHOLD}, word {SHINGLE}-grams, {NUM_PERM} permutations")
    print(
        "| side | samples/s/core | CPU s | wall s | peak RSS MB | recall (all planted) "
        "| recall (true Jaccard >= threshold) | precision | near-misses marked |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cmd in sides:
        if cmd is None:
            result = curate_side(data)
            steps = result.get("steps", {})
            m = {
                "cpu_s": round(sum(x["cpu_s"] for x in steps.values()), 1),
                "wall_s": round(sum(x["wall_s"] for x in steps.values()), 1),
                "rss_mb": max((x["rss_mb"] for x in steps.values()), default=0),
            }
        else:
            result, m = timed(cmd, ONE_THREAD)
        if "error" in result:
            print(f"| {name} | failed: {result['error'][:200]} |")
            continue
        s = score(data, result["marked"])
        rate = n / m["cpu_s"] if m["cpu_s"] else 0
        print(
            f"| {name} | {rate:,.0f} | {m['cpu_s']} | {m['wall_s']} | {m['rss_mb']:,} | "
            f"{s['recall']:.3f} | {s['recall_above']:.3f} | {s['precision']:.3f} | "
            f"{s['near_misses_marked']} |"
        )
        if "steps" in result:
            _print_steps(data, n, result)
    truth = json.loads((data / "truth.json").read_text())
    above = sum(1 for j in truth["jaccard"].values() if j >= THRESHOLD)
    print(
        f"planted pairs: {len(truth['jaccard'])}, of which {above} at true Jaccard >= {THRESHOLD}"
    )


def _print_steps(data: Path, n: int, result: dict) -> None:
    from curate.core.folder import RunFolder

    print("\n| curate step | samples/s/core | CPU s (process) | CPU s (in step) | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, x in result["steps"].items():
        rate = n / x["cpu_s"] if x["cpu_s"] else 0
        print(f"| {name} | {rate:,.0f} | {x['cpu_s']} | {x['cpu_in_step_s']} | {x['rss_mb']:,} |")
    print(f"\ngrouping: {result['report']}")
    # After the timing, in this process: it reads every conversation back.
    organic = _organic(data, RunFolder(data / "run"))
    real = sum(1 for j in organic if j >= THRESHOLD)
    print(
        f"curate marked {len(organic)} samples outside the planted pairs; {real} of them "
        f"have a true Jaccard >= {THRESHOLD} with their kept sample (the generators' "
        "own near-duplicates)"
    )


def signatures_bench(n: int, seed: int) -> None:
    """rensa vs datasketch on the same shingle sets (CPU seconds, one process)."""
    import numpy as np

    from curate.stages.neardup.config import Shingle
    from curate.stages.neardup.text import conversation_shingles

    rng = random.Random(seed)
    gens = _gens()
    sets = []
    for _ in range(n):
        q, a = rng.choice(gens)(rng)
        turns = [{"role": "human", "text": q}, {"role": "gpt", "text": a}]
        sets.append(conversation_shingles(turns, Shingle(unit="word", size=SHINGLE)))
    out = {}
    import rensa

    t0 = time.process_time()
    rensa.RMinHash.digest_matrix_from_token_sets(sets, NUM_PERM, 1).to_rows()
    out["rensa digest_matrix_from_token_sets"] = time.process_time() - t0
    try:
        import datasketch
    except ImportError:
        datasketch = None
    if datasketch is not None:
        encoded = [[s.encode() for s in x] for x in sets]
        t0 = time.process_time()
        for x in encoded:
            m = datasketch.MinHash(num_perm=NUM_PERM, seed=1)
            m.update_batch(x)
            m.digest()
        out["datasketch MinHash.update_batch"] = time.process_time() - t0
        t0 = time.process_time()
        datasketch.MinHash.bulk(encoded, num_perm=NUM_PERM, seed=1)
        out["datasketch MinHash.bulk"] = time.process_time() - t0
    print(f"{n:,} shingle sets, {NUM_PERM} permutations (CPU s, sets/s):")
    for k, v in out.items():
        print(f"| {k} | {v:.2f} | {n / v:,.0f} |")
    np.random.seed(0)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1].startswith("_"):
        data = Path(sys.argv[2])
        if sys.argv[1] == "_curate_step":
            sys.path.insert(0, str(ROOT))
            result = curate_step(data, sys.argv[3])
        elif sys.argv[1] == "_peer_text":
            result = peer_text_side(data)
        else:
            result = peer_image_side(data)
        print(json.dumps(result))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["all", "signatures"])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--images", type=int, default=0, help="distinct images (0: text only)")
    p.add_argument("--data", default="/tmp/curate-bench-neardup")
    p.add_argument("--peer-python", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remake", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.what == "signatures":
        signatures_bench(min(args.samples, 20_000), args.seed)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
