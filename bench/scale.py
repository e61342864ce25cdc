"""curate at scale: ingest → budget → filter → pack on a synthetic InternVL-like mixture of N
samples, each stage as its own CLI command with its defaults, measured from outside.

    python bench/scale.py --samples 100000 [--images 300] [--work DIR] [--keep]

The mixture: 10 datasets in InternVL 2.5's proportions (30% text-only: general, code, math;
55% single image: captions, OCR, charts, documents, science; 15% multi-image), each sample a
conversation of 1-3 turns whose answers are word windows cut at random offsets out of real
text (this install's Markdown / reST / licences / docstrings: ``bench/corpus.py``), so no two
samples are identical; images drawn from a pool of ``--images`` real-size JPEG and PNG files
(640x480 up to 2480x3508 scans). The tokenizer: a byte-level BPE of 16k tokens trained on the
same words, with InternVL's special tokens (``curate.demo.models.build_tokenizer``).

Per stage: CPU seconds (the command and every process it waited for: ``RUSAGE_CHILDREN``),
wall seconds, samples per second per CPU second (samples / CPU s), the peak RSS of the whole
process tree (every process's RSS summed, sampled every 50 ms) and of its largest process.
Then a no-op rerun of the whole pipeline (``curate run``: nothing changed, nothing redone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import psutil
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

# (name, domain, kind, share, answer words lo-hi, turns lo-hi)
DATASETS = [
    ("general_text", "general", "text", 0.14, (20, 400), (1, 3)),
    ("code_text", "programming", "text", 0.08, (30, 500), (1, 2)),
    ("math_text", "mathematics", "text", 0.08, (20, 300), (1, 2)),
    ("caption", "captioning", "image", 0.15, (10, 120), (1, 1)),
    ("ocr_doc", "ocr", "image", 0.12, (50, 600), (1, 2)),
    ("chart_qa", "chart", "image", 0.10, (5, 80), (1, 3)),
    ("doc_vqa", "document", "image", 0.10, (5, 60), (1, 3)),
    ("science_qa", "science", "image", 0.08, (10, 150), (1, 2)),
    ("multi_image", "general", "multi", 0.10, (20, 200), (1, 2)),
    ("interleaved", "general", "multi", 0.05, (30, 300), (1, 2)),
]
IMAGE_SIZES = [(640, 480), (1024, 768), (1280, 720), (1920, 1080), (800, 1200), (2480, 3508)]
QUESTIONS = [
    "What does the {thing} say about {topic}?",
    "Summarize the {thing} in a few sentences.",
    "Explain step {n} of the {thing}.",
    "Which {topic} is described, and why does it matter?",
    "Read the {thing} and answer: what is {topic} number {n}?",
]
TOKENIZER_VOCAB = 16000  # a byte-level BPE trained on the same words (the demo's has 2k)
THINGS = ["image", "document", "chart", "page", "figure", "text", "table", "diagram"]


def word_stream(seed: int, min_words: int = 3_000_000) -> list[str]:
    """A long stream of real words (whole documents of this install, in a seeded order)."""
    from corpus import collect

    sources = collect(seed)
    random.Random(seed).shuffle(sources)
    words: list[str] = []
    for src in sources:
        words += src.text.split()
        if len(words) >= min_words:
            break
    return words


def make_images(folder: Path, n: int, seed: int) -> list[str]:
    """``n`` images of real sizes: smooth gradients with noise, so they compress as photos do."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        path = folder / f"im{i:05d}.{'png' if i % 5 == 0 else 'jpg'}"
        im.save(path, quality=85) if path.suffix == ".jpg" else im.save(path, optimize=False)
        paths.append(str(path))
    return paths


def conversation(rng: random.Random, words: list[str], spec, n_images: int) -> list[dict]:
    _, _, _, _, (lo, hi), (t_lo, t_hi) = spec
    turns = []
    for t in range(rng.randint(t_lo, t_hi)):
        q = rng.choice(QUESTIONS).format(
            thing=rng.choice(THINGS), topic=rng.choice(words), n=rng.randint(1, 999)
        )
        if t == 0 and n_images:
            q = "".join("<image>\n" for _ in range(n_images)) + q
        length = int(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        start = rng.randrange(len(words) - length)
        turns += [
            {"from": "human", "value": q},
            {"from": "gpt", "value": " ".join(words[start : start + length])},
        ]
    return turns


def write_mixture(work: Path, n: int, n_images: int, seed: int) -> tuple[Path, list[str]]:
    """Annotation JSONL per dataset and the meta JSON; the meta path and the word stream."""
    rng = random.Random(seed)
    words = word_stream(seed)
    images = make_images(work / "images", n_images, seed)
    meta = {}
    for spec in DATASETS:
        name, domain, kind, share = spec[:4]
        count = round(n * share)
        path = work / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for i in range(count):
                k = {"text": 0, "image": 1, "multi": rng.randint(2, 4)}[kind]
                row = {"id": i, "conversations": conversation(rng, words, spec, k)}
                if k == 1:
                    row["image"] = rng.choice(images)
                elif k > 1:
                    row["image"] = rng.sample(images, k)
                f.write(orjson.dumps(row) + b"\n")
        meta[name] = {
            "root": "",
            "annotation": str(path),
            "data_augment": kind != "text",
            "repeat_time": 1,
            "length": count,
            "domain": domain,
        }
    (work / "meta.json").write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2))
    return work / "meta.json", words


def write_pipeline(work: Path, meta: Path, tokenizer: Path) -> Path:
    """Every section at its defaults: what a user gets from the CLI."""
    text = (
        f"run: {work / 'run'}\nmeta: {meta}\nmodels:\n  tokenizer: {tokenizer}\n"
        "stages:\n  ingest: {}\n  budget: {}\n  filter: {}\n  pack: {}\n"
    )
    path = work / "pipeline.yaml"
    path.write_text(text)
    return path


class TreeSampler(threading.Thread):
    """Peak RSS of a process tree (the sum over every live process, and the largest one) and
    the CPU seconds of every process seen in it (its last reading: a worker pool's processes
    are not always children the command waits for, so RUSAGE_CHILDREN misses them)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak_tree = self.peak_one = 0
        self.cpu_s: dict[tuple[int, float], float] = {}  # (pid, create time) -> user + system
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = []
            for p in procs:
                with contextlib.suppress(psutil.Error):  # it ended between listing and reading
                    rss.append(p.memory_info().rss)
                    t = p.cpu_times()
                    self.cpu_s[(p.pid, p.create_time())] = t.user + t.system
            self.peak_tree = max(self.peak_tree, sum(rss))
            self.peak_one = max(self.peak_one, max(rss, default=0))
            time.sleep(self.every_s)


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(cmd: list[str], log: Path) -> dict:
    """Run one command; its CPU s (tree), wall s, peak tree and process RSS (bytes)."""
    cpu0, t0 = children_cpu_s(), time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.done.set()
        sampler.join()
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    waited = children_cpu_s() - cpu0
    return {
        # the command and what it waited for, or every process sampled: whichever saw more
        "cpu_s": max(waited, sum(sampler.cpu_s.values())),
        "wall_s": time.perf_counter() - t0,
        "peak_tree_gb": sampler.peak_tree / 2**30,
        "peak_process_gb": sampler.peak_one / 2**30,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="curate-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    curate = str(Path(sys.executable).with_name("curate"))
    log = work / "commands.log"
    t0 = time.perf_counter()
    meta, words = write_mixture(work, args.samples, args.images, args.seed)
    tokenizer = work / "tokenizer"
    if not tokenizer.exists():
        from curate.demo.models import build_tokenizer

        lines = [" ".join(words[i : i + 200]) for i in range(0, 400_000, 200)]
        build_tokenizer(tokenizer, corpus=lines, vocab_size=TOKENIZER_VOCAB)
    pipeline = write_pipeline(work, meta, tokenizer)
    print(f"mixture of {args.samples:,} samples written in {time.perf_counter() - t0:.0f} s")

    results = {}
    for stage in ("ingest", "budget", "filter", "pack"):
        cmd = [curate, stage, *([str(meta)] if stage == "ingest" else [])]
        cmd += ["--run", str(work / "run"), "--config", str(pipeline)]
        results[stage] = measure(cmd, log)
        r = results[stage]
        print(
            f"{stage:7s} CPU {r['cpu_s']:8.1f} s  wall {r['wall_s']:7.1f} s  "
            f"{args.samples / max(r['cpu_s'], 1e-9):9,.0f} samples/CPU-s  "
            f"peak tree {r['peak_tree_gb']:.2f} GB, largest process {r['peak_process_gb']:.2f} GB",
            flush=True,
        )
    results["noop_rerun"] = measure([curate, "run", str(pipeline)], log)
    total_cpu = sum(results[s]["cpu_s"] for s in ("ingest", "budget", "filter", "pack"))
    print(
        f"no-op rerun: wall {results['noop_rerun']['wall_s']:.1f} s; total CPU "
        f"{total_cpu:.0f} s = {1000 * total_cpu / args.samples:.2f} ms per sample "
        f"(cores: {os.cpu_count()})"
    )
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, **results}, indent=2))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
