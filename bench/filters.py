"""Filters, side by side: curate's repetition detectors + rules against datatrove's
GopherRepetitionFilter and data-juicer's character / word repetition filters, on the same
generated conversations (normal answers plus planted loops, duplicate lines, zero runs).

    python bench/filters.py --samples 20000 --peer-python /tmp/benchvenv/bin/python

The peers are not project dependencies; put them in a separate venv first:

    python -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install "datatrove[processing]" spacy py-data-juicer aiohttp

Every side runs in one process and is timed in CPU seconds of that process (the dev machine is
shared, so wall time swings with its load), best of ``--repeat`` runs: samples/s per core.
Peers get each conversation's answers as one text (what they filter); curate reads the whole
conversation (per answer). Where the formulas are the same (data-juicer's ratios; Gopher's
metrics), curate's own implementations run on the peers' exact texts and their decisions are
compared with the peers'. Without ``--peer-python`` (or if a peer fails to import) the peer
columns say so and only curate's figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# --- the data ----------------------------------------------------------------------------------


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    """Conversations (1-3 answers) of five domains; about 8% planted repetition of three kinds."""
    sys.path.insert(0, str(ROOT))
    from curate.demo import text as txt

    rng = random.Random(seed)
    gens = [
        txt.general_qa,
        txt.math_qa,
        txt.code_qa,
        txt.science_qa,
        lambda r: txt.ocr_qa(txt.document_lines(r, r.randint(4, 16))),
    ]
    out = []
    for i in range(n):
        n_turns = 1 if rng.random() < 0.8 else rng.randint(2, 3)
        turns = [rng.choice(gens)(rng) for _ in range(n_turns)]
        kind = "normal"
        u = rng.random()
        if u < 0.04:
            kind = "loop"
            q, _ = turns[-1]
            turns[-1] = (q, txt.generation_loop(rng)[: rng.randint(400, 1800)])
        elif u < 0.06:
            kind = "dup_lines"
            q, _ = turns[-1]
            turns[-1] = (q, "\n".join([txt.sentence(rng)] * rng.randint(6, 15)))
        elif u < 0.08:
            kind = "paragraph_loop"
            q, _ = turns[-1]
            turns[-1] = (q, "\n\n".join([txt.paragraph(rng, 3)] * rng.randint(3, 6)))
        elif u < 0.09:
            kind = "zeros"
            q, a = turns[-1]
            turns[-1] = (q, a + " 1" + "0" * rng.randint(40, 120) + ".")
        out.append({"id": i, "kind": kind, "turns": turns})
    return out


def flat_text(conv: dict) -> str:
    return "\n\n".join(a for _, a in conv["turns"])


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
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {
        **os.environ,
        **{
            k: "1"
            for k in (
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS",
                "POLARS_MAX_THREADS",
            )
        },
    }
    proc = subprocess.run(
        [python, __file__, "--peer", which, texts_path, out, str(repeat)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/tmp",
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(Path(out).read_text())


# --- curate --------------------------------------------------------------------------------------


def curate_table(convs: list[dict]):
    import pyarrow as pa

    from curate.core.records import SAMPLE_SCHEMA

    rows = []
    for c in convs:
        turns = []
        for q, a in c["turns"]:
            turns += [{"role": "human", "text": q}, {"role": "gpt", "text": a}]
        rows.append(
            {
                "sample_id": str(c["id"]),
                "dataset": "bench",
                "line": c["id"] + 1,
                "domain": "general",
                "kind": "text",
                "conversations": turns,
                "images": [],
                "video": None,
                "extra": None,
            }
        )
    return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)


def best_of(repeat: int, fn):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def curate_side(convs: list[dict], texts: list[str], repeat: int) -> dict:
    from curate.stages.filters import repetition as rep
    from curate.stages.filters.config import FilterConfig
    from curate.stages.filters.registry import REPETITION_RULES
    from curate.stages.filters.rules import Batch, judge, measure

    table = curate_table(convs)
    cfg = FilterConfig(decode_images=False)

    def full():
        reasons = []
        for start in range(0, len(table), cfg.batch_rows):
            batch = Batch.of(table.slice(start, cfg.batch_rows))
            reasons += judge(batch, measure(batch, cfg), cfg)
        return reasons

    res = {}
    res["full_s"], reasons = best_of(repeat, full)
    res["repetition_flag"] = [any(r.rule in REPETITION_RULES for r in why) for why in reasons]
    res["any_flag"] = [bool(why) for why in reasons]
    res["char_s"], res["char"] = best_of(repeat, lambda: rep.char_repetition_ratios(texts, 10))
    res["word_s"], res["word"] = best_of(repeat, lambda: rep.word_repetition_ratios(texts, 10))
    res["char_ref_s"], _ = best_of(1, lambda: [rep.char_repetition_ratio(t, 10) for t in texts])
    res["gopher_s"], res["gopher"] = best_of(
        repeat, lambda: [rep.gopher_failures(t) for t in texts]
    )
    return res


# --- report -------------------------------------------------------------------------------------


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}"


def recall(flags: list[bool], kinds: list[str], kind: str) -> str:
    picked = [
        f for f, k in zip(flags, kinds, strict=True) if (k == kind if kind else k != "normal")
    ]
    return f"{sum(picked) / len(picked):.0%}" if picked else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-python", default=None, help="python of the venv holding the peers")
    args = ap.parse_args()

    convs = make_conversations(args.samples, args.seed)
    texts = [flat_text(c) for c in convs]
    kinds = [c["kind"] for c in convs]
    n = len(texts)
    planted = ", ".join(sorted(set(kinds) - {"normal"}))
    print(
        f"{n} conversations, {sum(len(t) for t in texts) / n:.0f} answer chars on average, "
        f"{sum(k != 'normal' for k in kinds)} planted ({planted})"
    )
    ours = curate_side(convs, texts, args.repeat)

    peers: dict[str, dict] = {}
    if args.peer_python:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(texts, f)
            texts_path = f.name
        for which in ("datatrove_gopher", "dj_char", "dj_word"):
            peers[which] = run_peer(args.peer_python, which, texts_path, args.repeat)
    missing = {k: v["error"] for k, v in peers.items() if "error" in v}
    for k, e in missing.items():
        print(f"peer {k} could not run: {e}")

    rows = [
        ("curate: all rules + repetition detectors (per answer)", ours["full_s"]),
        ("curate: data-juicer char ratio formula (vectorised batch)", ours["char_s"]),
        ("curate: data-juicer word ratio formula (vectorised batch)", ours["word_s"]),
        ("curate: Gopher metrics formula (all 13, per text)", ours["gopher_s"]),
        ("curate: data-juicer char ratio, one-text reference", ours["char_ref_s"]),
    ]
    names = {
        "datatrove_gopher": "datatrove GopherRepetitionFilter (spaCy words)",
        "dj_char": "data-juicer character_repetition_filter",
        "dj_word": "data-juicer word_repetition_filter",
    }
    for k, v in peers.items():
        if "error" not in v:
            rows.append((names[k], v["seconds"]))
    print("\n| side | CPU seconds | samples/s per core |\n|---|---:|---:|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} | {rate(n, s)} |")

    print("\n| check | agreement with the peer |\n|---|---|")
    if "dj_char" in peers and "error" not in peers["dj_char"]:
        p = peers["dj_char"]
        same = sum(abs(a - b) < 1e-12 for a, b in zip(ours["char"], p["extra"], strict=True))
        dec = sum((a <= 0.5) == k for a, k in zip(ours["char"], p["keep"], strict=True))
        print(f"| char ratio values / decisions (max 0.5) | {same}/{n} equal, {dec}/{n} same |")
    if "dj_word" in peers and "error" not in peers["dj_word"]:
        p = peers["dj_word"]
        same = sum(abs(a - b) < 1e-12 for a, b in zip(ours["word"], p["extra"], strict=True))
        dec = sum((a <= 0.5) == k for a, k in zip(ours["word"], p["keep"], strict=True))
        print(f"| word ratio values / decisions (max 0.5) | {same}/{n} equal, {dec}/{n} same |")
    if "datatrove_gopher" in peers and "error" not in peers["datatrove_gopher"]:
        p = peers["datatrove_gopher"]
        dec = sum((not f) == k for f, k in zip(ours["gopher"], p["keep"], strict=True))
        reason = sum(r in f for f, r in zip(ours["gopher"], p["extra"], strict=True) if r)
        print(
            f"| Gopher keep/drop | {dec}/{n} same; datatrove's first reason among ours in "
            f"{reason}/{sum(1 for r in p['extra'] if r)} |"
        )

    print(
        "\n| side | planted caught | loops | dup lines | paragraph loops | zero runs "
        "| normal samples hit |\n|---|---:|---:|---:|---:|---:|---:|"
    )

    def line(name, flags):
        print(
            f"| {name} | {recall(flags, kinds, '')} | {recall(flags, kinds, 'loop')} | "
            f"{recall(flags, kinds, 'dup_lines')} | {recall(flags, kinds, 'paragraph_loop')} | "
            f"{recall(flags, kinds, 'zeros')} | {recall(flags, kinds, 'normal')} |"
        )

    line("curate repetition rules", ours["repetition_flag"])
    line("curate all rules", ours["any_flag"])
    for k, v in peers.items():
        if "error" not in v:
            line(names[k], [not x for x in v["keep"]])


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
