"""curate's scoring vs the fastest thing a user would write with the same engine, and vs one
chat request per sample with a JSON reply.

    python bench/score.py [--samples 48] [--judge demo|wide] [--repeat 5] [--profile]
                          [--json-max-tokens 128] [--no-json]

Same engine (one ``vllm.LLM``, in process, float32, prefix caching on), same model, same
samples, same rendered prompts on every side; each timed pass starts from the samples
(prompts rendered and tokenised inside the timed region, on every side) and a cold prefix
cache:

- curate, ``readout: probe`` (the default): one request per sample, one batched ``generate``
  per ``--batch-size`` requests, 2 decode steps; the label tokens' logprobs of the first step,
  the decode forced through "1" by ``logit_bias`` for P(10 | "1"): all 11 probabilities;
- curate, ``readout: constrained``: decoded under a choice constraint "0".."10" with label
  logprobs, plus follow-up requests where the greedy path did not give P(10 | "1");
- the competent baseline: the same prompts in one batched ``generate`` under the choice
  constraint "0".."10", no logprobs: the greedy label only (what a user who wants a score and
  nothing else writes). Its grammar ends a label by sampling EOS, so a one-digit label takes
  2 decode steps as well (the "out tokens/sample" column);
- data-juicer's ``llm_quality_score_filter`` method: for each sample in turn, ``llm.chat``
  with a system prompt asking for a JSON object of dimension scores, flags, rationale and
  recommendation; the reply's outer braces are found with a regex and parsed with
  ``json.loads`` (data-juicer keeps a sample whose reply does not parse). Our own prompt in
  its format; one try per sample (data-juicer retries up to 3 times on a parse failure, so
  this is its best case). ``--json-max-tokens`` bounds its reply: a real judge's reply in
  that format is about 100-150 tokens; a random judge never stops early.

The sides run interleaved, ``--repeat`` rounds, each round starting with the next side (the
machine's load swings); the table gives each side's best wall and best CPU time over the
rounds, and the median over rounds of the baseline's CPU time / the side's CPU time in the
same round (paired, so a round under load counts against both sides alike). ``--profile``
adds each side's engine steps, tokens computed, and CPU seconds in the forward pass, in the
sampler and in the rest.

``--judge demo`` is the tiny demo judge (hidden 128, 2 layers); ``--judge wide`` builds a
larger random Qwen2 (hidden 512, 4 layers, 8 heads) with the demo tokenizer, where the
forward pass weighs more than the per-step overhead.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "curate-inductor"))

SYSTEM_PROMPT = """You assess the quality of training data for language models. Read the data \
sample and rate it on four dimensions, each from 1 (worst) to 5 (best):
- accuracy: are the statements factually correct and verifiable?
- grammar: is the language correct and fluent?
- informativeness: how much useful content does it carry?
- coherence: is it logically structured and consistent?

Base every score on evidence in the text, punish hallucinated or false content hard, and flag
samples a human should review. Answer with one JSON object and nothing else, in this form:
{
  "dimension_scores": {"accuracy": 4, "grammar": 5, "informativeness": 3, "coherence": 4},
  "flags": ["minor_grammar_issues"],
  "rationale": "One or two sentences explaining the scores.",
  "recommendation": "keep"
}
recommendation is one of keep, review, discard."""
INPUT_TEMPLATE = "# Data\n'''\n{data}\n'''\n\n# Response\njson\n"
DIMENSIONS = ("accuracy", "grammar", "informativeness", "coherence")
OUTER_BRACES = re.compile(r"(\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\})")


def parse_json_reply(text: str) -> float | None:
    """data-juicer's reading: the first balanced {...} (one nesting level), json.loads, the
    mean of the dimension scores / 5; None when anything fails."""
    match = OUTER_BRACES.search(text)
    if not match:
        return None
    try:
        data = json.loads(match.group(1))
        scores = data["dimension_scores"]
        return sum(float(scores[k]) for k in DIMENSIONS) / len(DIMENSIONS) / 5
    except (ValueError, KeyError, TypeError):
        return None


def build_wide_judge(out: Path, tokenizer_dir: Path) -> Path:
    """A larger random judge (hidden 512, 4 layers, 8 heads) for a heavier comparison."""
    from curate.demo.models import build_judge_llm

    if (out / "config.json").exists():
        return out
    return build_judge_llm(
        out, tokenizer_dir, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8
    )


def pick_samples(run, n: int) -> list[dict]:
    """Round robin over datasets so every domain is in the mix."""
    rows = run.read("samples").to_pylist()
    by_ds: dict[str, list[dict]] = {}
    for r in rows:
        by_ds.setdefault(r["dataset"], []).append(r)
    out = []
    while len(out) < n and any(by_ds.values()):
        for ds in sorted(by_ds):
            if by_ds[ds] and len(out) < n:
                out.append(by_ds[ds].pop(0))
    return out


def sample_text(sample: dict) -> str:
    from curate.stages.score.prompts import render_conversation

    return render_conversation(sample["conversations"], sample["images"], kind=sample["kind"])


def run_curate(scorer, samples: list[dict], batch_size: int) -> dict:
    jobs = scorer.jobs(samples, lambda s: False)  # quality only: one score per sample
    s = scorer.stats
    before = (s.requests, s.prompt_tokens, s.cached_tokens, s.output_tokens)
    t0, c0 = time.perf_counter(), time.process_time()
    results = {}
    for start in range(0, len(jobs), batch_size):
        results.update(scorer.score(jobs[start : start + batch_size]))  # renders its chunk
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    valid = sum(r.reading.score is not None for r in results.values())
    return {
        "seconds": seconds,
        "cpu": cpu,
        "valid": valid,
        "requests": s.requests - before[0],
        "hit": (s.cached_tokens - before[2]) / max(1, s.prompt_tokens - before[1]),
        "out_tokens": (s.output_tokens - before[3]) / len(samples),
    }


def run_choice(llm, scorer, samples: list[dict]) -> dict:
    """The baseline: one batched generate under a choice constraint, greedy label only."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    jobs = scorer.jobs(samples, lambda s: False)
    params = SamplingParams(
        max_tokens=2,
        temperature=0.0,
        structured_outputs=StructuredOutputsParams(choice=[str(i) for i in range(11)]),
    )
    t0, c0 = time.perf_counter(), time.process_time()
    scorer.render(jobs)  # the same prompts, rendered in the timed region as curate's are
    jobs.sort(key=lambda j: j.ids)  # shared prompt prefixes next to each other, as curate does
    outs = llm.generate([{"prompt_token_ids": j.ids} for j in jobs], params, use_tqdm=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    valid = sum(o.outputs[0].text in {str(i) for i in range(11)} for o in outs)
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    cached = sum(o.num_cached_tokens or 0 for o in outs)
    return {
        "seconds": seconds,
        "cpu": cpu,
        "valid": valid,
        "requests": len(jobs),
        "hit": cached / prompt,
        "out_tokens": sum(len(o.outputs[0].token_ids) for o in outs) / len(jobs),
    }


def run_json_chat(llm, samples: list[dict], max_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    prompt_tokens = cached = parsed = out_tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for s in samples:  # one request per sample, as the data-juicer op does
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": INPUT_TEMPLATE.format(data=f"**Text**\n{sample_text(s)}")},
        ]
        out = llm.chat(messages, params, use_tqdm=False)[0]
        parsed += parse_json_reply(out.outputs[0].text) is not None
        prompt_tokens += len(out.prompt_token_ids)
        cached += out.num_cached_tokens or 0
        out_tokens += len(out.outputs[0].token_ids)
    return {
        "seconds": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
        "valid": parsed,
        "hit": cached / max(1, prompt_tokens),
        "out_tokens": out_tokens / len(samples),
    }


class EngineProfile:
    """``--profile``: CPU seconds inside the model's forward pass and inside the sampler, and the
    engine steps and tokens scheduled, per timed pass (wraps vLLM 0.32 internals of the
    in-process engine; the rest of a pass is scheduling, output processing, rendering and the
    reading of the results)."""

    def __init__(self, llm) -> None:
        core = llm.llm_engine.engine_core.engine_core
        runner = core.model_executor.driver_worker.worker.model_runner
        self.counts: dict[str, float] = {}
        self._wrap(runner, "_model_forward", "forward")
        self._wrap(runner, "_sample", "sampler")
        schedule = core.scheduler.schedule

        def counted(*args, **kwargs):
            out = schedule(*args, **kwargs)
            if out.total_num_scheduled_tokens:
                self.counts["steps"] += 1
                self.counts["tokens"] += out.total_num_scheduled_tokens
            return out

        core.scheduler.schedule = counted
        self.reset()

    def _wrap(self, obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            c0 = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.counts[key] += time.process_time() - c0

        setattr(obj, name, timed)

    def reset(self) -> None:
        self.counts = dict.fromkeys(("forward", "sampler", "steps", "tokens"), 0.0)


def _print_profile(profiles: dict[str, list[dict]]) -> None:
    print(
        "\n| method | engine steps | tokens computed | forward CPU s (best / median) "
        "| sampler CPU s (best / median) | rest CPU s (best / median) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in profiles.items():
        for r in rows:
            r["rest"] = r["cpu"] - r["forward"] - r["sampler"]

        def cell(key: str, rows=rows) -> str:
            values = [r[key] for r in rows]
            return f"{min(values):.3f} / {statistics.median(values):.3f}"

        print(
            f"| {name} | {rows[0]['steps']:.0f} | {rows[0]['tokens']:.0f} | {cell('forward')} "
            f"| {cell('sampler')} | {cell('rest')} |"
        )


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--judge", choices=("demo", "wide"), default="demo")
    ap.add_argument("--json-max-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--no-json", action="store_true", help="skip the sequential JSON side")
    ap.add_argument("--repeat", type=int, default=5, help="timed passes per side; best kept")
    ap.add_argument("--work", type=Path, default=None, help="folder for demo data (default: tmp)")
    ap.add_argument(
        "--profile", action="store_true", help="also CPU in forward / sampler, steps, tokens"
    )
    args = ap.parse_args()

    from curate.core.engine import Engine
    from curate.core.folder import RunFolder
    from curate.demo.data import make_demo, make_demo_models
    from curate.stages.ingest.config import IngestConfig
    from curate.stages.ingest.stage import IngestStage
    from curate.stages.score.config import ScoreConfig
    from curate.stages.score.stage import Scorer

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_score_"))
    if not (work / "meta.json").exists():
        make_demo(work, seed=0, scale=2)
    models = make_demo_models(work)
    judge = (
        models["judge"]
        if args.judge == "demo"
        else build_wide_judge(work / "models" / "judge_wide", models["tokenizer"])
    )
    run = RunFolder(work / "run")
    if not run.shards("samples"):
        Engine(run, [IngestStage(IngestConfig(), work / "meta.json")]).run_stage("ingest")
    samples = pick_samples(run, args.samples)

    cfg = ScoreConfig(
        dtype="float32",
        max_model_len=4096,
        kv_cache_memory_bytes=256 << 20,
        batch_size=args.batch_size,
    )
    t0 = time.perf_counter()
    scorer = Scorer(cfg, judge)
    llm = scorer._engine().llm
    print(f"engine ready in {time.perf_counter() - t0:.1f} s")
    # Warm-up (kernel compilation, grammar compilation) on other samples, then a cold cache.
    warm = pick_samples(run, args.samples + 8)[args.samples :]
    engine = scorer._engine()
    run_curate(scorer, warm, args.batch_size)
    run_choice(llm, scorer, warm)
    run_json_chat(llm, warm[:2], 8)
    n = len(samples)

    def constrained(on: bool) -> None:
        engine.probing, engine._params = not on, {}

    sides = {
        "curate, readout probe: all 11 probabilities": (
            lambda: constrained(False),
            lambda: run_curate(scorer, samples, args.batch_size),
        ),
        "curate, readout constrained + follow-ups: all 11 probabilities": (
            lambda: constrained(True),
            lambda: run_curate(scorer, samples, args.batch_size),
        ),
        "baseline: one batched generate, choice 0..10, label only": (
            lambda: None,
            lambda: run_choice(llm, scorer, samples),
        ),
    }
    constrained(True)
    run_curate(scorer, warm, args.batch_size)  # the constrained path's kernels, warmed too
    load0 = _load()
    base_name = next(name for name in sides if name.startswith("baseline"))
    profile = EngineProfile(llm) if args.profile else None
    profiles: dict[str, list[dict]] = {name: [] for name in sides}
    best: dict[str, dict] = {}
    rounds: list[dict[str, float]] = []
    names = list(sides)
    for i in range(args.repeat):  # interleaved: the machine's load swings
        cpu: dict[str, float] = {}
        for name in names[i % len(names) :] + names[: i % len(names)]:  # no side always first
            setup, run_side = sides[name]
            setup()
            llm.reset_prefix_cache()
            gc.collect()  # the previous side's garbage is not collected in this side's time
            if profile:
                profile.reset()
            result = run_side()
            cpu[name] = result["cpu"]
            if profile:
                profiles[name].append({**profile.counts, "cpu": result["cpu"]})
            for key in ("seconds", "cpu"):  # best wall and best CPU time, each on its own
                if name not in best or result[key] < best[name][key]:
                    best.setdefault(name, dict(result))[key] = result[key]
        rounds.append(cpu)
    constrained(False)
    paired = {name: statistics.median(r[base_name] / r[name] for r in rounds) for name in sides}
    rows = list(best.items())
    if not args.no_json:
        llm.reset_prefix_cache()
        theirs = run_json_chat(llm, samples, args.json_max_tokens)
        rows.append(
            (
                f"one chat request per sample, JSON reply + regex (max_tokens "
                f"{args.json_max_tokens}, {theirs['out_tokens']:.0f} generated/sample)",
                theirs,
            )
        )

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; judge: {args.judge} ({judge})")
    print(f"samples: {n} (domains: {sorted({s['domain'] for s in samples})})")
    print(f"rounds: {args.repeat}, interleaved; load average before/after: {load0} / {_load()}\n")
    print(
        "| method | requests | out tokens/sample | wall s | CPU s | samples/s (wall) "
        "| samples per CPU s | valid | prefix-cache hit | vs baseline (wall / CPU, best) "
        "| vs baseline (CPU, paired median) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = best[base_name]
    for name, r in rows:
        pair = f"{paired[name]:.2f}x" if name in paired else "-"
        print(
            f"| {name} | {r.get('requests', n)} | {r['out_tokens']:.2f} | {r['seconds']:.2f} "
            f"| {r['cpu']:.2f} | {n / r['seconds']:.1f} | {n / r['cpu']:.1f} | {r['valid']}/{n} "
            f"| {r['hit']:.1%} | {base['seconds'] / r['seconds']:.2f}x / "
            f"{base['cpu'] / r['cpu']:.2f}x | {pair} |"
        )
    if profile:
        _print_profile(profiles)
    scorer.close()


if __name__ == "__main__":
    main()
