"""Training tokenisation: InternVL's per-sample way vs curate's batch tokenizer, same output.

    python bench/chat_tokens.py [--scale 10] [--repeat 3]

The demo mixture at ``--scale`` is ingested and budgeted; then every sample's training ids and
labels are made twice, timed in CPU seconds of this process (best of ``--repeat``):

- per sample (``curate.core.chat.tokenize``, InternVL's ``preprocess_internvl2_5``): one
  tokenizer call per sample over its segments, ``<IMG_CONTEXT>`` x 256·tiles as text, plus
  one call for the assistant prefix;
- batched (``BatchTokenizer``): the text between added tokens encoded once per distinct piece,
  one tokenizer call per 2,048 samples, image ids inserted.

It checks the two give identical ids and labels for every sample, and prints samples/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from curate.core.chat import BatchTokenizer, tokenize
    from curate.core.engine import Engine
    from curate.core.folder import RunFolder
    from curate.demo.data import make_demo, make_demo_models
    from curate.stages.budget.config import BudgetConfig
    from curate.stages.budget.stage import BudgetStage, load_tokenizer
    from curate.stages.budget.tiling import tokens_per_tile
    from curate.stages.ingest.config import IngestConfig
    from curate.stages.ingest.stage import IngestStage
    from curate.stages.pack.tokenize import chat_sample

    work = Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    make_demo(work, seed=0, scale=args.scale)
    tokenizer_dir = make_demo_models(work)["tokenizer"]
    run = RunFolder(work / "run")
    stages = [
        IngestStage(IngestConfig(), work / "meta.json"),
        BudgetStage(BudgetConfig(), tokenizer_dir),
    ]
    engine = Engine(run, stages)
    for s in stages:
        engine.run_stage(s.name)
    samples = run.read("samples").to_pylist()
    budgets = {b["sample_id"]: b for b in run.read("budget").to_pylist()}
    chats = [
        chat_sample(
            s,
            budgets[s["sample_id"]],
            system_prompt=BudgetConfig().system_prompt,
            per_tile=tokens_per_tile(448),
        )
        for s in samples
    ]
    tok = load_tokenizer(tokenizer_dir)
    batch = BatchTokenizer(tok)

    def timed(fn):
        best, out = float("inf"), None
        for _ in range(args.repeat):
            t = time.process_time()
            out = fn()
            best = min(best, time.process_time() - t)
        return best, out

    slow_s, slow = timed(lambda: [tokenize(tok, c.segments()) for c in chats])
    fast_s, fast = timed(lambda: batch(chats))
    tokens = sum(len(ids) for ids, _ in fast)
    print(f"{len(chats):,} samples, {tokens:,} tokens; identical ids and labels: {fast == slow}")
    print("| way | CPU s | samples/s |\n|---|---:|---:|")
    print(f"| per sample (InternVL's) | {slow_s:.2f} | {len(chats) / slow_s:,.0f} |")
    print(
        f"| batched (BatchTokenizer, exact={batch.exact}) | {fast_s:.2f} "
        f"| {len(chats) / fast_s:,.0f} |"
    )
    print(f"speed-up: {slow_s / fast_s:.1f}x")


if __name__ == "__main__":
    main()
