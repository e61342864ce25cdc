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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from curate.core.errors import CurateError
from curate.core.folder import RunFolder
from curate.core.io import path_identity
from curate.core.memo import Memo
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput, ShardOutput, ShardStage
from curate.stages.score.config import ScoreConfig
from curate.stages.score.engines import EngineRequest, EngineStats, load_tokenizer, make_engine
from curate.stages.score.labels import LABELS, LabelSet, Reading, most_probable
from curate.stages.score.prompts import PromptLibrary, apply_chat_template, render_user_message

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
        ("quality_score", pa.int8()),  # the most probable label; null when invalid
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


class ScoreStageError(CurateError):
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


def _threshold(table: dict[str, float], default: float, *keys: str | None) -> float:
    for k in keys:
        if k and k in table:
            return float(table[k])
    return float(default)


def repetition_suspects(filter_rows: pa.Table | None) -> set[str] | None:
    """Sample ids the filters flagged as repetition suspects (None: no filter results, so
    every sample is a suspect)."""
    if filter_rows is None or "repetition_suspect" not in filter_rows.column_names:
        return None
    suspect = pc.fill_null(filter_rows["repetition_suspect"], False)
    return set(filter_rows.filter(suspect)["sample_id"].to_pylist())


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


# What the stored score is; a new value re-decides every shard from its memo.
SCORE_RULE = "most_probable_label"

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


def load_cache(memo: Memo, fingerprint: str) -> dict[Key, Result]:
    done = {}
    for r in memo.load(fingerprint):
        # Memos written when the score was the greedy choice: the label from the stored
        # probabilities, with no new request.
        score = r["score"] if r["probs"] is None else most_probable(r["probs"])
        reading = Reading(score, r["expected"], r["probs"], r["reason"])
        done[(r["sample_id"], r["check"], r["prompt"])] = Result(reading, r["prompt_tokens"])
    return done


def save_cache(memo: Memo, done: dict[Key, Result], fingerprint: str) -> None:
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
    memo.save(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA))


# -- one shard --------------------------------------------------------------------------------
def score_samples(
    samples: list[dict],
    suspects: set[str] | None,
    cfg: ScoreConfig,
    scorer: Scorer,
    memo: Memo,
    on_chunk: Callable[[list[Job]], None] | None = None,
) -> ShardOutput:
    """Score samples (from the memo where it has them, saving after each engine chunk)."""

    def repetition(sample: dict) -> bool:
        if not cfg.repetition:
            return False
        return cfg.repetition_scope == "all" or suspects is None or sample["sample_id"] in suspects

    jobs = scorer.jobs(samples, repetition)
    done = load_cache(memo, scorer.fingerprint)
    todo = [j for j in jobs if j.key not in done]
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        done.update(scorer.score(chunk))
        for job in chunk:  # keep memory to one chunk of rendered prompts
            job.text, job.ids = "", []
        save_cache(memo, done, scorer.fingerprint)
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
) -> ShardOutput:
    """The shard's scores table and ledger, in sample order (independent of request order)."""
    prompts = {(j.sample_id, j.check): j.prompt_name for j in jobs}
    rows, entries = [], []
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
        rows.append(row)
        entries.extend(sample_entries)
    return ShardOutput(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), ledger_table(entries))


# -- the stage --------------------------------------------------------------------------------
class ScoreStage(ShardStage):
    """LLM quality scores (and the repetition check) of what the filters kept (``scores/``).

    Runs on the driver: it holds the judge engine (made on first use, so a stage with
    nothing to redo starts none). ``make_scorer`` builds it (``RayScorer`` on a cluster).
    """

    name = STAGE
    reads = ("ingest", "filter")
    respects = ("filter",)
    runs_on_driver = True

    def __init__(
        self,
        config: ScoreConfig,
        model: str | Path,
        make_scorer: Callable[[ScoreConfig, Path], Scorer] = Scorer,
    ) -> None:
        super().__init__(config)
        self.model = Path(model).resolve()
        self.make_scorer = make_scorer
        self.scorer: Scorer | None = None
        self.on_chunk: Callable[[list[Job], EngineStats], None] | None = None
        self.samples_scored = 0
        self.engine_stats: EngineStats | None = None

    @property
    def table(self) -> str:
        return OUTPUT

    def settings(self) -> dict:
        # Raw scores depend on the content fingerprint; decisions on the decision fields.
        decisions = self.config.model_dump(mode="json", include=DECISION_FIELDS)
        return {
            "content": _content(self.config, self.model),
            "judge_files": path_identity(self.model) if self.model.exists() else "",
            "decisions": decisions,
            "score": SCORE_RULE,
        }

    def prepare(self, run: RunFolder) -> None:
        if not (self.model / "config.json").exists():
            raise ScoreStageError(
                f"judge model not found: {self.model} (set score.model or models.judge)"
            )

    def process(self, shard: ShardInput) -> ShardOutput:
        if self.scorer is None:
            self.scorer = self.make_scorer(self.config, self.model)
        scorer = self.scorer
        filtered = (
            shard.table("filter") if shard.run.shard_path("filter", shard.shard).exists() else None
        )
        samples = shard.samples().to_pylist()

        def chunk_done(jobs: list[Job]) -> None:
            if self.on_chunk:
                self.on_chunk(jobs, scorer.stats)

        memo = Memo(shard.run, STAGE, shard.shard, CACHE_SCHEMA)
        out = score_samples(
            samples, repetition_suspects(filtered), self.config, scorer, memo, chunk_done
        )
        self.samples_scored += len(samples)
        return out

    def close(self) -> None:
        if self.scorer is not None:
            self.engine_stats = self.scorer.stats  # requests, tokens, prefix-cache hits
            self.scorer.close()
            self.scorer = None


def _content(cfg: ScoreConfig, model: str | Path | None) -> str:
    return content_fingerprint(cfg, Path(model or cfg.model or ""), PromptLibrary(cfg.prompts_dir))


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
