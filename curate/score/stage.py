"""The score stage: LLM quality scores for every sample, an LLM repetition check for suspects.

Per ``samples/`` shard: samples the filter stage rejected are skipped (they are accounted by
the filter stage); every other sample gets a quality request with its domain's prompt, and the
samples the filters flagged ``repetition_suspect`` (all of them when the filter stage has not
run, or with ``repetition_scope: all``) also get a repetition request. Requests are sorted by
prompt so each prompt's shared rubric prefix is contiguous, and sent in chunks of
``batch_size`` (one batched engine call each, plus one for follow-ups); each chunk's raw
results are saved in ``_cache/score/<shard>.parquet`` (keyed by sample, check and prompt, and
by a fingerprint of model and prompt texts), so an interrupted run re-scores only what is
missing, and a change of thresholds or repetition scope re-decides without re-scoring.

Output ``scores/<shard>.parquet``: one row per scored sample (SCORES_SCHEMA). Ledger: quality
below its threshold -> ``quality_below_threshold`` (reject); repetition below its threshold ->
``repetition_below_threshold`` (flag, to review); no valid score -> ``score_invalid``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from curate.io import write_json_atomic, write_parquet_atomic
from curate.records import LedgerEntry, ledger_table
from curate.run import RunFolder, ShardResult, StageSummary, run_shards, settings_fingerprint
from curate.score.config import ScoreConfig
from curate.score.engines import EngineRequest, EngineStats, load_tokenizer, make_engine
from curate.score.labels import LABELS, LabelSet, Reading
from curate.score.prompts import PromptLibrary, apply_chat_template, render_user_message

STAGE = "score"
OUTPUT = "scores"
CHECKS = ("quality", "repetition")

PROBS = pa.list_(pa.float32())
SCORES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("domain", pa.string()),
        ("quality_prompt", pa.string()),
        ("quality_score", pa.int8()),  # the constrained choice; null when invalid
        ("quality_expected", pa.float32()),  # sum(s * P(s)) over labels 0..10
        ("quality_probs", PROBS),  # P(0) .. P(10)
        ("quality_threshold", pa.float32()),
        ("quality_reason", pa.string()),  # why there is no score
        ("repetition_checked", pa.bool_()),
        ("repetition_prompt", pa.string()),
        ("repetition_score", pa.int8()),
        ("repetition_expected", pa.float32()),
        ("repetition_probs", PROBS),
        ("repetition_threshold", pa.float32()),
        ("repetition_reason", pa.string()),
        ("prompt_tokens", pa.int32()),  # of the quality request
        ("decision", pa.string()),  # keep | reject | review
    ]
)

# One finished request, as saved between chunks.
CACHE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("check", pa.string()),
        ("prompt", pa.string()),
        ("score", pa.int8()),
        ("expected", pa.float32()),
        ("probs", PROBS),
        ("reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("fingerprint", pa.string()),
    ]
)


class ScoreStageError(RuntimeError):
    """The stage cannot run on this run folder as it is."""


@dataclass
class Job:
    """One request of the stage: a sample and a check (quality or repetition)."""

    sample_id: str
    check: str
    prompt_name: str
    sort_key: tuple
    sample: dict = field(default_factory=dict, repr=False)
    text: str = ""  # filled by Scorer.render
    ids: list[int] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # VLM only

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.sample_id, self.check, self.prompt_name)


@dataclass
class Result:
    reading: Reading
    prompt_tokens: int


@dataclass
class ScoreReport:
    """Engine totals of one ``score`` call (also saved as stats/score_engine.json)."""

    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cache_hit_rate: float | None = None
    engine_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def _threshold(table: dict[str, float], default: float, *keys: str | None) -> float:
    for k in keys:
        if k and k in table:
            return float(table[k])
    return float(default)


def filter_view(run: RunFolder, shard: str) -> tuple[set[str], set[str] | None]:
    """Sample ids the filter stage rejected, and those it flagged as repetition suspects
    (None: no filter results, so every sample is a suspect)."""
    rejected: set[str] = set()
    ledger = run.ledger_path("filter", shard)
    if ledger.exists():
        t = pq.read_table(ledger, columns=["sample_id", "severity"])
        rejected |= set(t.filter(pc.equal(t["severity"], "reject"))["sample_id"].to_pylist())
    if not run.dir("filter").is_dir():
        return rejected, None
    path = run.shard_path("filter", shard)
    if not path.exists():
        raise ScoreStageError(
            f"{path} is missing while other filter results exist: finish `curate filter` "
            "first (or remove the filter/ folder to score without filter results)"
        )
    t = pq.read_table(path)
    if "decision" in t.column_names:
        rejected |= set(t.filter(pc.equal(t["decision"], "reject"))["sample_id"].to_pylist())
    if "repetition_suspect" not in t.column_names:
        return rejected, None
    suspect = pc.fill_null(t["repetition_suspect"], False)
    return rejected, set(t.filter(suspect)["sample_id"].to_pylist())


def content_fingerprint(cfg: ScoreConfig, model: Path, library: PromptLibrary) -> str:
    """What a raw score depends on: judge, tokenizer, prompt texts, rendering, dtype, context.
    Cached results made under another fingerprint are not reused."""
    key = {
        "model": str(Path(model).resolve()),
        "tokenizer": str(Path(cfg.tokenizer or model).resolve()),
        "prompts": {n: library.get(n).text for n in library.names()},
        "labels": LABELS,
        **cfg.model_dump(
            mode="json",
            include={"max_turn_chars", "vlm", "image_placeholder", "dtype", "max_model_len"},
        ),
    }
    return xxhash.xxh3_64_hexdigest(orjson.dumps(key, option=orjson.OPT_SORT_KEYS))


# Settings that decide keep / reject / review from raw scores (and which requests exist).
DECISION_FIELDS = {
    "domain_prompts",
    "default_prompt",
    "repetition_prompt",
    "quality_threshold",
    "quality_thresholds",
    "repetition",
    "repetition_scope",
    "repetition_threshold",
    "repetition_thresholds",
    "threshold_on",
    "invalid_severity",
}


def stage_fingerprint(cfg: ScoreConfig, content: str) -> str:
    """The shard markers' fingerprint: a shard scored under other settings is done again
    (from the cache when only decisions changed)."""
    return settings_fingerprint(
        content,
        orjson.dumps(
            cfg.model_dump(mode="json", include=DECISION_FIELDS), option=orjson.OPT_SORT_KEYS
        ).decode(),
    )


class Scorer:
    """Renders, orders and scores jobs with one engine (created on first use)."""

    def __init__(self, cfg: ScoreConfig, model: Path) -> None:
        self.cfg = cfg
        self.model = Path(model)
        self.library = PromptLibrary(cfg.prompts_dir)
        self.tokenizer = load_tokenizer(cfg.tokenizer or model)
        self.labels = LabelSet(self.tokenizer)
        self.engine = None
        self._stats = EngineStats()  # an engine's totals, kept after it is closed
        self.fingerprint = content_fingerprint(cfg, self.model, self.library)

    # -- jobs -------------------------------------------------------------------------------
    def quality_prompt(self, sample: dict) -> str:
        return self.library.resolve(
            sample["dataset"],
            sample.get("domain"),
            self.cfg.domain_prompts,
            self.cfg.default_prompt,
        )

    def jobs(self, samples: Sequence[dict], repetition: Callable[[dict], bool]) -> list[Job]:
        """Every request for these samples (a repetition request where ``repetition(sample)``),
        in engine order; rendered later, chunk by chunk (``render``)."""
        jobs = []
        for i, s in enumerate(samples):
            checks = [("quality", self.quality_prompt(s))]
            if repetition(s):
                checks.append(("repetition", self.cfg.repetition_prompt))
            for check, name in checks:
                # Same prompt -> contiguous (shared rubric prefix); then dataset, then order.
                jobs.append(Job(s["sample_id"], check, name, (name, s["dataset"], i), sample=s))
        jobs.sort(key=lambda j: j.sort_key)
        return jobs

    def render(self, jobs: Sequence[Job]) -> None:
        """Fill each job's prompt text (chat template applied) and token ids."""
        cfg = self.cfg
        placeholder = cfg.image_placeholder if cfg.vlm else None
        todo = [j for j in jobs if not j.ids]
        texts = []
        for j in todo:
            message = render_user_message(
                self.library.get(j.prompt_name),
                j.sample,
                max_turn_chars=cfg.max_turn_chars,
                image_placeholder=placeholder,
            )
            texts.append(apply_chat_template(self.tokenizer, message))
            if cfg.vlm:
                j.images = [im["path"] for im in j.sample.get("images") or []]
        ids = self.tokenizer(texts, add_special_tokens=False).input_ids if texts else []
        for job, text, tok in zip(todo, texts, ids, strict=True):
            job.text, job.ids = text, tok

    # -- scoring ----------------------------------------------------------------------------
    def _engine(self):
        if self.engine is None:
            self.engine = make_engine(self.cfg, self.model, self.labels)
            self._stats = self.engine.stats
        return self.engine

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def score(self, jobs: Sequence[Job]) -> dict[tuple[str, str], Result]:
        """Score jobs (one chunk): one batched engine call, then one for the follow-ups."""
        self.render(jobs)
        limit = self.cfg.max_model_len - self.labels.max_tokens
        out: dict[tuple[str, str], Result] = {}
        runnable = []
        for j in jobs:
            if len(j.ids) > limit and not self.cfg.vlm:
                reason = (
                    f"prompt of {len(j.ids)} tokens does not fit max_model_len "
                    f"{self.cfg.max_model_len}"
                )
                out[j.key] = Result(Reading(None, None, None, reason), len(j.ids))
            else:
                runnable.append(j)
        if not runnable:
            return out
        engine = self._engine()
        # One batched call: requests sharing a prompt are adjacent, and vLLM lets requests
        # scheduled in the same step share the prefix blocks (measured: priming one request
        # per prompt first gives the same hit rate).
        raws = engine.run([EngineRequest(j.text, j.ids, j.images) for j in runnable])
        # Follow-ups: P(continuation | ambiguous first token) off the greedy path.
        follow_jobs = [(k, tid) for k, raw in enumerate(raws) for tid in self.labels.pending(raw)]
        follow_reqs = [
            EngineRequest(runnable[k].text, runnable[k].ids, runnable[k].images, next_after=tid)
            for k, tid in follow_jobs
        ]
        follow: dict[int, dict[int, dict[int, float]]] = {}
        for (k, tid), raw in zip(follow_jobs, engine.run(follow_reqs), strict=True):
            if raw.error is None and raw.steps:
                follow.setdefault(k, {})[tid] = raw.steps[0]
        for k, (job, raw) in enumerate(zip(runnable, raws, strict=True)):
            reading = self.labels.read(raw, follow.get(k))
            out[job.key] = Result(reading, raw.prompt_tokens or len(job.ids))
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# -- raw results cache ------------------------------------------------------------------------
Key = tuple[str, str, str]  # sample_id, check, prompt


def cache_path(run: RunFolder, shard: str) -> Path:
    return run.path / "_cache" / STAGE / f"{shard}.parquet"


def load_cache(run: RunFolder, shard: str, fingerprint: str) -> dict[Key, Result]:
    path = cache_path(run, shard)
    if not path.exists():
        return {}
    done = {}
    for r in pq.read_table(path).to_pylist():
        if r["fingerprint"] == fingerprint:
            reading = Reading(r["score"], r["expected"], r["probs"], r["reason"])
            done[(r["sample_id"], r["check"], r["prompt"])] = Result(reading, r["prompt_tokens"])
    return done


def save_cache(run: RunFolder, shard: str, done: dict[Key, Result], fingerprint: str) -> None:
    rows = [
        {
            "sample_id": sid,
            "check": check,
            "prompt": prompt,
            "score": res.reading.score,
            "expected": res.reading.expected,
            "probs": res.reading.probs,
            "reason": res.reading.reason,
            "prompt_tokens": res.prompt_tokens,
            "fingerprint": fingerprint,
        }
        for (sid, check, prompt), res in done.items()
    ]
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), cache_path(run, shard))


# -- one shard --------------------------------------------------------------------------------
def _considered(
    run: RunFolder, shard: str, cfg: ScoreConfig
) -> tuple[list[dict], Callable[[dict], bool]]:
    """The shard's samples the filters did not reject, and which of them get a repetition
    request."""
    samples = run.read("samples", [shard]).to_pylist()
    rejected, suspects = filter_view(run, shard)

    def repetition(sample: dict) -> bool:
        if not cfg.repetition:
            return False
        return cfg.repetition_scope == "all" or suspects is None or sample["sample_id"] in suspects

    return [s for s in samples if s["sample_id"] not in rejected], repetition


def process_shard(
    run: RunFolder,
    cfg: ScoreConfig,
    scorer: Scorer,
    shard: str,
    on_chunk: Callable[[list[Job]], None] | None = None,
) -> ShardResult:
    samples, repetition = _considered(run, shard, cfg)
    jobs = scorer.jobs(samples, repetition)
    done = load_cache(run, shard, scorer.fingerprint)
    todo = [j for j in jobs if j.key not in done]
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        done.update(scorer.score(chunk))
        for job in chunk:  # keep memory to one chunk of rendered prompts
            job.text, job.ids = "", []
        save_cache(run, shard, done, scorer.fingerprint)
        if on_chunk:
            on_chunk(chunk)
    return assemble(samples, jobs, done, cfg)


def _check_entry(
    cfg: ScoreConfig, sample: dict, check: str, prompt: str, res: Result | None, threshold: float
) -> LedgerEntry | None:
    sid, ds, line, domain = sample["sample_id"], sample["dataset"], sample["line"], sample["domain"]
    where = f"{check} check, domain={domain}, prompt={prompt}"
    r = res.reading
    if r.score is None:
        return LedgerEntry(
            sid,
            ds,
            line,
            STAGE,
            "score_invalid",
            cfg.invalid_severity,
            None,
            threshold,
            f"{where}: {r.reason}",
        )
    value = float(r.score) if cfg.threshold_on == "score" or r.expected is None else r.expected
    if value >= threshold:
        return None
    rule, severity = (
        ("quality_below_threshold", "reject")
        if check == "quality"
        else ("repetition_below_threshold", "flag")
    )
    detail = f"{where}, score={r.score}"
    if r.expected is not None:
        detail += f", expected={r.expected:.2f}, p(score)={r.probs[r.score]:.2f}"
    return LedgerEntry(sid, ds, line, STAGE, rule, severity, value, threshold, detail)


def assemble(
    samples: Sequence[dict], jobs: Sequence[Job], done: dict, cfg: ScoreConfig
) -> ShardResult:
    """The shard's scores table and ledger, in sample order (independent of request order)."""
    prompts = {(j.sample_id, j.check): j.prompt_name for j in jobs}
    rows, entries = [], []
    by_dataset: dict[str, list[int]] = {}
    rejected = flagged = 0
    for s in samples:
        sid, ds, domain = s["sample_id"], s["dataset"], s["domain"]
        q_prompt = prompts[(sid, "quality")]
        q = done[(sid, "quality", q_prompt)]
        q_thr = _threshold(cfg.quality_thresholds, cfg.quality_threshold, ds, domain, q_prompt)
        row = {
            "sample_id": sid,
            "dataset": ds,
            "line": s["line"],
            "domain": domain,
            "quality_prompt": q_prompt,
            "quality_score": q.reading.score,
            "quality_expected": q.reading.expected,
            "quality_probs": q.reading.probs,
            "quality_threshold": q_thr,
            "quality_reason": q.reading.reason,
            "repetition_checked": (sid, "repetition") in prompts,
            "prompt_tokens": q.prompt_tokens,
        }
        sample_entries = [_check_entry(cfg, s, "quality", q_prompt, q, q_thr)]
        if row["repetition_checked"]:
            r_prompt = prompts[(sid, "repetition")]
            r = done[(sid, "repetition", r_prompt)]
            r_thr = _threshold(
                cfg.repetition_thresholds, cfg.repetition_threshold, ds, domain, r_prompt
            )
            row.update(
                repetition_prompt=r_prompt,
                repetition_score=r.reading.score,
                repetition_expected=r.reading.expected,
                repetition_probs=r.reading.probs,
                repetition_threshold=r_thr,
                repetition_reason=r.reading.reason,
            )
            sample_entries.append(_check_entry(cfg, s, "repetition", r_prompt, r, r_thr))
        sample_entries = [e for e in sample_entries if e is not None]
        severities = {e.severity for e in sample_entries}
        row["decision"] = (
            "reject" if "reject" in severities else "review" if "flag" in severities else "keep"
        )
        counts = by_dataset.setdefault(ds, [0, 0, 0, 0])
        counts[0] += 1
        if row["decision"] == "reject":
            rejected += 1
            counts[2] += 1
        else:
            counts[1] += 1
            if row["decision"] == "review":
                flagged += 1
                counts[3] += 1
        rows.append(row)
        entries.extend(sample_entries)
    return ShardResult(
        outputs={OUTPUT: pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)},
        ledger=ledger_table(entries),
        rows_in=len(samples),
        rows_kept=len(samples) - rejected,
        rows_rejected=rejected,
        rows_flagged=flagged,
        rows_by_dataset=by_dataset,
    )


# -- the stage --------------------------------------------------------------------------------
def count_requests(
    run: RunFolder, cfg: ScoreConfig, shards: Sequence[str], model: str | Path | None = None
) -> int:
    """Requests the unfinished shards need at most (a progress bar's total): cached results
    are not looked up."""
    fingerprint = stage_fingerprint(cfg, _content(cfg, model))
    total = 0
    for shard in shards:
        if run.is_done(STAGE, shard, fingerprint):
            continue
        samples, repetition = _considered(run, shard, cfg)
        total += len(samples) + sum(map(repetition, samples))
    return total


def score_run(
    run: RunFolder,
    cfg: ScoreConfig,
    model: str | Path | None = None,
    *,
    on_chunk: Callable[[list[Job], EngineStats], None] | None = None,
    on_shard: Callable[[str, dict], None] | None = None,
    scorer: Scorer | None = None,
) -> tuple[StageSummary, ScoreReport]:
    """Score every unfinished ``samples/`` shard of ``run``; finished shards are skipped.

    ``model`` defaults to ``cfg.model``. ``on_chunk(jobs, engine_stats)`` is called after
    each engine chunk, ``on_shard`` after each shard commit. Pass a ``scorer`` to reuse
    its engine across calls (tests, benchmarks): it keeps its own model, prompt and engine
    settings; ``cfg`` then gives the thresholds, repetition scope and batch size.
    """
    model = Path(model or cfg.model or "")
    if scorer is None and not (model / "config.json").exists():
        raise ScoreStageError(f"judge model not found: {model} (set score.model or models.judge)")
    shards = run.shards("samples")
    if not shards:
        raise ScoreStageError(f"{run.path} has no samples/: run `curate ingest` first")
    t0 = time.perf_counter()
    content = scorer.fingerprint if scorer is not None else _content(cfg, model)
    fingerprint = stage_fingerprint(cfg, content)
    if all(run.is_done(STAGE, s, fingerprint) for s in shards):  # no engine, no tokenizer
        summary = run_shards(run, STAGE, shards, _nothing, fingerprint=fingerprint)
        return summary, ScoreReport(seconds=round(time.perf_counter() - t0, 3))
    own = scorer is None
    scorer = scorer or Scorer(cfg, model)
    before = _copy_stats(scorer.stats)
    counted = {"samples": 0}

    def process(shard: str) -> ShardResult:
        def chunk_done(jobs: list[Job]) -> None:
            if on_chunk:
                on_chunk(jobs, scorer.stats)

        result = process_shard(run, cfg, scorer, shard, chunk_done)
        counted["samples"] += result.rows_in
        return result

    try:
        summary = run_shards(
            run, STAGE, shards, process, on_shard=on_shard, fingerprint=fingerprint
        )
    finally:
        if own:
            scorer.close()
    stats = scorer.stats
    report = ScoreReport(
        requests=stats.requests - before.requests,
        samples=counted["samples"],
        prompt_tokens=stats.prompt_tokens - before.prompt_tokens,
        cached_tokens=stats.cached_tokens - before.cached_tokens,
        engine_seconds=round(stats.seconds - before.seconds, 3),
        seconds=round(time.perf_counter() - t0, 3),
    )
    if stats.cache_known and report.prompt_tokens:
        report.cache_hit_rate = round(report.cached_tokens / report.prompt_tokens, 4)
    write_json_atomic(
        {**report.__dict__, "samples_per_s": round(report.samples_per_s, 2)},
        run.stats_path("score_engine"),
    )
    return summary, report


def _content(cfg: ScoreConfig, model: str | Path | None) -> str:
    return content_fingerprint(cfg, Path(model or cfg.model or ""), PromptLibrary(cfg.prompts_dir))


def _nothing(shard: str) -> ShardResult:
    raise AssertionError(f"{shard}: every shard is done")


def _copy_stats(s: EngineStats) -> EngineStats:
    return EngineStats(s.requests, s.prompt_tokens, s.cached_tokens, s.cache_known, s.seconds)


def score_distribution(run: RunFolder) -> list[dict]:
    """Per domain and prompt: samples, score histogram, mean scores, below-threshold counts."""
    import polars as pl

    shards = run.shards(OUTPUT)
    if not shards:
        return []
    df = pl.from_arrow(run.read(OUTPUT, shards))
    out = []
    for (domain, prompt), g in sorted(
        df.group_by(["domain", "quality_prompt"]), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))
    ):
        scores = g["quality_score"].drop_nulls()
        hist = [int((scores == s).sum()) for s in range(11)]
        rep = g.filter(pl.col("repetition_checked"))
        out.append(
            {
                "domain": domain,
                "prompt": prompt,
                "samples": g.height,
                "histogram": hist,
                "mean_score": round(float(scores.mean()), 2) if len(scores) else None,
                "mean_expected": round(float(g["quality_expected"].drop_nulls().mean()), 2)
                if g["quality_expected"].drop_nulls().len()
                else None,
                "below_threshold": int((g["quality_score"] < g["quality_threshold"]).sum()),
                "invalid": int(g["quality_score"].null_count()),
                "repetition_checked": rep.height,
                "repetition_flagged": int(
                    (rep["repetition_score"] < rep["repetition_threshold"]).sum()
                ),
                "rejected": int((g["decision"] == "reject").sum()),
                "review": int((g["decision"] == "review").sum()),
            }
        )
    return out
