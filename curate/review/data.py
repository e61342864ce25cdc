"""What the review app shows, read from a run folder once: the samples with ledger rows, their
ledger, judge scores and tile grids; the decisions are re-read whenever the file changes (the
CLI, or an undo, may write it while the app runs).

The queue: in ``pending`` mode the flagged samples no rule rejected (reviewed ones stay in it,
so that previous and undo work; a sample is *remaining* while its status is flag); in
``audit`` mode the samples a rule rejected (remaining while no decision, per sample or for
the rule in its dataset, covers it). Filters: stage, rule, dataset, domain, quality-score
range. Sorted by rule (pipeline order), then dataset, then line.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields

import polars as pl

from curate.core.errors import CurateError
from curate.core.folder import RunFolder
from curate.core.status import decisions_path, load_decisions, status_of
from curate.stages.report.html import card_context, prob_chart
from curate.stages.report.lessons import Lessons, judge_decisions, lessons
from curate.stages.report.rows import read_rows
from curate.stages.report.tables import STAGE_ORDER, dataset_roots

SAMPLE_COLUMNS = ["sample_id", "dataset", "line", "domain", "kind", "conversations", "images"]
SCORE_COLUMNS = [
    "sample_id",
    "quality_score",
    "quality_expected",
    "quality_probs",
    "quality_threshold",
    "repetition_checked",
    "repetition_score",
    "repetition_expected",
    "repetition_probs",
    "repetition_threshold",
    "decision",
]
MODES = ("pending", "audit")
# Rules whose detail names the sample this one copies (the first copy / the kept one).
DUPLICATE_RULES = ("duplicate_sample", "near_duplicate")
_SAMPLE_ID = re.compile(r"\b[0-9a-f]{16}\b")
# Queue items sent to the page at once (the counts always cover the whole queue).
MAX_ITEMS = 20_000
# Characters of each turn shown (the first two thirds and the last third of this).
MAX_TURN_CHARS = 12_000


class BadFilter(CurateError):
    """A queue filter the app cannot use (a score bound that is not a number...)."""


@dataclass(frozen=True)
class Filters:
    mode: str = "pending"
    stage: str = ""
    rule: str = ""
    dataset: str = ""
    domain: str = ""
    score_min: float | None = None
    score_max: float | None = None

    @classmethod
    def parse(cls, params: dict[str, str]) -> Filters:
        """From query parameters; empty values mean "any"."""
        mode = params.get("mode") or "pending"
        if mode not in MODES:
            raise BadFilter(f"mode is pending or audit, not {mode!r}")
        bounds = {}
        for key in ("score_min", "score_max"):
            raw = (params.get(key) or "").strip()
            try:
                bounds[key] = float(raw) if raw else None
            except ValueError:
                raise BadFilter(f"{key} must be a number, not {raw!r}") from None
            if bounds[key] is not None and not math.isfinite(bounds[key]):
                raise BadFilter(f"{key} must be a finite number")
        text = {k: (params.get(k) or "").strip() for k in ("stage", "rule", "dataset", "domain")}
        return cls(mode=mode, **text, **bounds)

    def query(self) -> dict[str, str]:
        """The filters as query parameters (only those set)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v not in (None, "") and not (f.name == "mode" and v == "pending"):
                out[f.name] = f"{v:g}" if isinstance(v, float) else str(v)
        return out


@dataclass
class Queue:
    items: list[dict]  # id, rule, dataset, status, reviewed (at most MAX_ITEMS)
    total: int
    reviewed: int
    per_rule: list[dict]  # stage, rule, samples, reviewed, remaining

    @property
    def remaining(self) -> int:
        return self.total - self.reviewed


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


class ReviewData:
    """A run folder's review material (see the module docstring)."""

    def __init__(self, run: RunFolder) -> None:
        if not run.shards("samples"):
            raise CurateError(f"{run.path} has no samples/: run `curate ingest` first")
        self.run = run
        self._load()

    def _tables_stamp(self) -> tuple:
        """What the tables read at load depend on: their files' names, sizes and times."""
        files = []
        for pattern in (
            "samples/*.parquet",
            "ledger/*/*.parquet",
            "scores/*.parquet",
            "budget/*.parquet",
            "run.json",
        ):
            for p in sorted(self.run.path.glob(pattern)):
                st = p.stat()
                files.append((str(p), st.st_size, st.st_mtime_ns))
        return tuple(files)

    def reload_if_changed(self) -> bool:
        """Read the tables again if a stage rewrote them since (a page load calls this; a
        keystroke does not). Returns whether it did."""
        if self._tables_stamp() == self._stamp_tables:
            return False
        self._load()
        return True

    def _load(self) -> None:
        run = self.run
        self._stamp_tables = self._tables_stamp()
        self.roots = dataset_roots(run)
        ledger = pl.from_arrow(run.ledger()).filter(pl.col("stage") != "ingest")
        ids = ledger["sample_id"].unique()
        self.samples = read_rows(run, "samples", ids, SAMPLE_COLUMNS)
        # The ledger with each row's domain and pipeline rank, for filtering and sorting.
        domains = self.samples.select("sample_id", "domain") if "domain" in self.samples else None
        if domains is None:
            ledger = ledger.with_columns(domain=pl.lit(None, pl.String))
        else:
            ledger = ledger.join(domains, on="sample_id", how="left")
        rank = {s: i for i, s in enumerate(STAGE_ORDER)}
        self.ledger = ledger.with_columns(
            rank=pl.col("stage").replace_strict(rank, default=len(rank), return_dtype=pl.Int32)
        ).sort("rank", "rule", "dataset", "line")
        self.scores = read_rows(run, "scores", ids, SCORE_COLUMNS)
        self.grids = dict(read_rows(run, "budget", ids, ["sample_id", "grids"]).iter_rows())
        self.judge = judge_decisions(run)
        self._decisions: pl.DataFrame | None = None
        self._stamp: tuple | None = None
        self._status: pl.DataFrame | None = None
        self._extra: dict[str, dict | None] = {}  # samples outside the queue, by id

    # -- decisions and status, re-read when the file changed ---------------------------------
    def decisions(self) -> pl.DataFrame:
        path = decisions_path(self.run)
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if self._decisions is None or stamp != self._stamp:
            self._decisions = load_decisions(self.run)
            self._stamp = stamp
            self._status = None
        return self._decisions

    def status(self) -> pl.DataFrame:
        """sample_id, dataset, status, reasons of every sample with ledger rows."""
        decisions = self.decisions()
        if self._status is None:
            self._status = status_of(self.samples, self.ledger, decisions)
        return self._status

    def sample_decisions(self) -> pl.DataFrame:
        """The per-sample decision in force: sample_id, decision, note."""
        rows = self.decisions().filter(pl.col("sample_id").is_not_null())
        return (
            rows.sort("decided_at")
            .group_by("sample_id", maintain_order=True)
            .last()
            .select("sample_id", "decision", "note")
        )

    # -- the queue -----------------------------------------------------------------------------
    def options(self) -> dict[str, list[str]]:
        """The values each filter can take in this run."""
        stages = self.ledger.select("stage", "rank").unique().sort("rank", "stage")["stage"]
        return {
            "stage": stages.to_list(),
            "rule": self.ledger["rule"].unique().sort().to_list(),
            "dataset": self.ledger["dataset"].unique().sort().to_list(),
            "domain": self.ledger["domain"].drop_nulls().unique().sort().to_list(),
        }

    def _members(self, f: Filters) -> pl.DataFrame:
        """sample_id, dataset, line, rules (matched, pipeline order), rule (the first)."""
        match = self.ledger.filter(
            pl.col("severity") == ("flag" if f.mode == "pending" else "reject")
        )
        for key in ("stage", "rule", "dataset", "domain"):
            if getattr(f, key):
                match = match.filter(pl.col(key) == getattr(f, key))
        members = match.group_by("sample_id", maintain_order=True).agg(
            dataset=pl.col("dataset").first(),
            line=pl.col("line").max(),
            rank=pl.col("rank").first(),
            rules=pl.col("rule").unique(maintain_order=True),
        )
        if f.mode == "pending":  # a flagged sample that a rule rejects is not awaiting review
            rejected = self.ledger.filter(pl.col("severity") == "reject").select("sample_id")
            members = members.join(rejected, on="sample_id", how="anti")
        if f.score_min is not None or f.score_max is not None:
            members = members.join(self._quality(), on="sample_id", how="inner")
            if f.score_min is not None:
                members = members.filter(pl.col("score") >= f.score_min)
            if f.score_max is not None:
                members = members.filter(pl.col("score") <= f.score_max)
        return members.with_columns(rule=pl.col("rules").list.first())

    def _quality(self) -> pl.DataFrame:
        """sample_id, score: the judge's quality score (its expected value where none)."""
        have = [
            pl.col(c).cast(pl.Float64)
            for c in ("quality_score", "quality_expected")
            if c in self.scores.columns
        ]
        if not have:
            return pl.DataFrame(schema={"sample_id": pl.String, "score": pl.Float64})
        return self.scores.select("sample_id", score=pl.coalesce(have)).drop_nulls("score")

    def queue(self, f: Filters) -> Queue:
        members = self._members(f)
        status = self.status().select("sample_id", "status")
        members = members.join(status, on="sample_id", how="left").join(
            self.sample_decisions().select("sample_id", "decision"), on="sample_id", how="left"
        )
        if f.mode == "pending":
            reviewed = pl.col("status") != "flag"
        else:
            by_rule = self.decisions().filter(pl.col("sample_id").is_null())
            ruled = by_rule.select("dataset", "rule").unique().with_columns(ruled=pl.lit(True))
            members = members.join(ruled, on=["dataset", "rule"], how="left")
            reviewed = pl.col("decision").is_not_null() | pl.col("ruled").fill_null(False)
        members = members.with_columns(reviewed=reviewed).sort(
            "rank", "rule", "dataset", "line", "sample_id"
        )
        per_rule = (
            members.explode("rules")
            .group_by("rules", maintain_order=True)
            .agg(samples=pl.len(), reviewed=pl.col("reviewed").sum())
            .rename({"rules": "rule"})
            .with_columns(remaining=pl.col("samples") - pl.col("reviewed"))
        )
        stage_of = dict(self.ledger.select("rule", "stage").unique("rule").iter_rows())
        rules = [
            {**r, "stage": stage_of.get(r["rule"], "")} for r in per_rule.iter_rows(named=True)
        ]
        rules.sort(key=lambda r: (_stage_rank(r["stage"]), r["rule"]))
        items = [
            {
                "id": r["sample_id"],
                "rule": r["rule"],
                "dataset": r["dataset"],
                "status": r["status"],
                "reviewed": bool(r["reviewed"]),
            }
            for r in members.head(MAX_ITEMS).iter_rows(named=True)
        ]
        return Queue(items, members.height, int(members["reviewed"].sum() or 0), rules)

    def lessons(self) -> Lessons:
        return lessons(self.ledger, self.decisions(), self.judge)

    def summary(self) -> str:
        q = self.queue(Filters())
        return (
            f"{self.run.path}: {q.total} flagged sample{'s' if q.total != 1 else ''} "
            f"awaiting review or reviewed ({q.remaining} remaining)"
        )

    # -- one sample ------------------------------------------------------------------------------
    def sample(self, sample_id: str) -> dict | None:
        """The sample row (queue samples in memory, others read once), or None if unknown."""
        hit = self.samples.filter(pl.col("sample_id") == sample_id)
        if hit.height:
            return hit.row(0, named=True)
        if sample_id not in self._extra:
            rows = read_rows(self.run, "samples", pl.Series([sample_id]), SAMPLE_COLUMNS)
            self._extra[sample_id] = rows.row(0, named=True) if rows.height else None
        return self._extra[sample_id]

    def image_path(self, sample_id: str, index: int) -> str | None:
        """The path of a sample's ``index``-th image (None: no such sample or image)."""
        s = self.sample(sample_id)
        images = (s or {}).get("images") or []
        if not 0 <= index < len(images):
            return None
        return images[index].get("path")

    def failures(self, sample_id: str) -> list[dict]:
        cols = ["stage", "rule", "severity", "value", "threshold", "detail"]
        return self.ledger.filter(pl.col("sample_id") == sample_id).select(cols).to_dicts()

    def current_status(self, sample_id: str, dataset: str) -> str:
        """One sample's status now (from its own ledger rows: a keystroke does not recompute
        the whole queue's)."""
        keys = pl.DataFrame({"sample_id": [sample_id], "dataset": [dataset]})
        rows = self.ledger.filter(pl.col("sample_id") == sample_id)
        return status_of(keys, rows, self.decisions())["status"][0]

    def judge_charts(self, sample_id: str) -> list[dict]:
        hit = self.scores.filter(pl.col("sample_id") == sample_id)
        if not hit.height:
            return []
        row = hit.row(0, named=True)
        charts = []
        for check in ("quality", "repetition"):
            probs = row.get(f"{check}_probs")
            if not probs or (check == "repetition" and not row.get("repetition_checked", True)):
                continue
            charts.append(
                prob_chart(
                    check,
                    probs,
                    row.get(f"{check}_score"),
                    row.get(f"{check}_expected"),
                    row.get(f"{check}_threshold"),
                )
            )
        return charts

    def partner_id(self, sample_id: str, failures: list[dict]) -> str | None:
        """The sample a duplicate rule says this one copies (its first copy / the kept one)."""
        for f in failures:
            if f["rule"] not in DUPLICATE_RULES:
                continue
            for found in _SAMPLE_ID.findall(str(f.get("detail") or "")):
                if found != sample_id and self.sample(found) is not None:
                    return found
        return None

    def card(self, sample_id: str, with_failures: bool = True) -> dict | None:
        """The card template's context for one sample, images served by the app."""
        s = self.sample(sample_id)
        if s is None:
            return None
        failures = self.failures(sample_id) if with_failures else []
        decision = self.sample_decisions().filter(pl.col("sample_id") == sample_id)
        row = {**s, "status": self.current_status(sample_id, s["dataset"])}
        hit = self._quality().filter(pl.col("sample_id") == sample_id)
        if hit.height:
            row["score"] = hit["score"][0]

        def images(k: int, im: dict) -> tuple[str | None, str | None]:
            return f"/thumb/{sample_id}/{k}", f"/image/{sample_id}/{k}"

        c = card_context(
            row,
            failures,
            images=images,
            grids=self.grids.get(sample_id),
            judge=self.judge_charts(sample_id),
            max_chars=MAX_TURN_CHARS,
        )
        c["note"] = decision["note"][0] if decision.height else None
        c["decision"] = decision["decision"][0] if decision.height else None
        return c
