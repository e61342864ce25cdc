"""What review teaches: per rule, how often reviewers agreed with it and a threshold that would
have agreed more; for the judge, agreement with the reviewers (counts and Cohen's kappa).

Only per-sample decisions count as evidence (a reviewer looked at that sample); a per-rule
decision ("the rest of this rule in this dataset") is counted apart, as the number of datasets
it covers. Rules are grouped by (stage, rule, threshold): a threshold overridden per dataset is
its own row, since that override is what one would change.

A flagged sample the reviewer rejected is a true alarm, one kept a false alarm; the rule's
precision on this data is rejected / reviewed. The suggested threshold moves only towards
fewer flags (the ledger holds the values of flagged samples only, so nothing is known about
the samples a looser threshold would add): the one, among the current threshold and the kept
samples' values, that misjudges the fewest reviewed samples (ties: the nearest the current).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from curate.core.folder import RunFolder

# Reviewer keep/reject, judge keep/reject: the four cells of the agreement table.
CELLS = ("keep_keep", "keep_reject", "reject_keep", "reject_reject")


@dataclass(frozen=True)
class RuleLesson:
    stage: str
    rule: str
    threshold: float | None
    samples: int  # with a ledger row of this rule (any severity)
    reviewed: int  # with a per-sample decision in force
    kept: int
    rejected: int
    direction: str | None  # "above" | "below": which side of the threshold fails; None: unknown
    suggested: float | None  # None: no values, direction unknown, or nothing reviewed
    errors_now: int | None  # reviewed samples misjudged at the current threshold (the kept ones)
    errors_suggested: int | None  # ... at the suggested threshold
    rule_decisions: int  # per-rule decisions in force for it (keep or reject, one per dataset)

    @property
    def kept_share(self) -> float | None:
        """Share of reviewed flags the reviewers kept: the rule's false alarms."""
        return self.kept / self.reviewed if self.reviewed else None

    @property
    def precision(self) -> float | None:
        """Share of reviewed flags the reviewers rejected: the rule's precision on this data."""
        return self.rejected / self.reviewed if self.reviewed else None


@dataclass(frozen=True)
class JudgeAgreement:
    """Reviewer decision (rows) against the judge's decision (columns), keep / reject only."""

    keep_keep: int
    keep_reject: int
    reject_keep: int
    reject_reject: int
    judge_review: int  # reviewed samples the judge sent to review (repetition below threshold)

    @property
    def n(self) -> int:
        return self.keep_keep + self.keep_reject + self.reject_keep + self.reject_reject

    @property
    def agreement(self) -> float | None:
        return (self.keep_keep + self.reject_reject) / self.n if self.n else None

    @property
    def kappa(self) -> float | None:
        return cohen_kappa(self.keep_keep, self.keep_reject, self.reject_keep, self.reject_reject)


@dataclass(frozen=True)
class Lessons:
    rules: list[RuleLesson]
    judge: JudgeAgreement | None  # None: no judge decisions in the run
    sample_decisions: int  # per-sample decisions in force


def cohen_kappa(a: int, b: int, c: int, d: int) -> float | None:
    """Cohen's kappa of a 2x2 table [[a, b], [c, d]] (rater 1 rows, rater 2 columns); None when
    undefined (no pairs, or both raters used one label only: chance agreement is 1)."""
    n = a + b + c + d
    if n == 0:
        return None
    observed = (a + d) / n
    chance = ((a + b) * (a + c) + (c + d) * (b + d)) / (n * n)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def fail_direction(values: list[float], threshold: float | None) -> str | None:
    """Which side of ``threshold`` the ledger's values lie on: ``above`` (value > threshold
    fails), ``below``, or None (no threshold, values on both sides, or all equal to it)."""
    if threshold is None or not values:
        return None
    above = all(v >= threshold for v in values)
    below = all(v <= threshold for v in values)
    if above and not below:
        return "above"
    if below and not above:
        return "below"
    return None


def suggest_threshold(
    kept: list[float], rejected: list[float], threshold: float, direction: str
) -> tuple[float, int, int]:
    """(suggested threshold, misjudged now, misjudged at it) over the reviewed values.

    Candidates: the current threshold and every kept value (at a kept value, that sample
    passes: ``above`` fails strictly above the threshold, ``below`` strictly below)."""

    def errors(t: float) -> int:
        if t == threshold:  # every reviewed sample was flagged there: the kept ones are wrong
            return len(kept)
        if direction == "above":
            return sum(v > t for v in kept) + sum(v <= t for v in rejected)
        return sum(v < t for v in kept) + sum(v >= t for v in rejected)

    above = direction == "above"
    # Nearest the current threshold first, so that a tie keeps the smallest change.
    fewer = sorted(
        {v for v in kept if (v > threshold if above else v < threshold)}, reverse=not above
    )
    candidates = [threshold, *fewer]
    best = min(range(len(candidates)), key=lambda i: (errors(candidates[i]), i))
    return candidates[best], errors(threshold), errors(candidates[best])


def latest_sample_decisions(decisions: pl.DataFrame) -> pl.DataFrame:
    """The per-sample decisions in force: sample_id, decision (the latest per sample)."""
    rows = decisions.filter(pl.col("sample_id").is_not_null())
    return (
        rows.sort("decided_at")
        .group_by("sample_id", maintain_order=True)
        .last()
        .select("sample_id", "decision")
    )


def rule_lessons(ledger: pl.DataFrame, decisions: pl.DataFrame) -> list[RuleLesson]:
    """One RuleLesson per (stage, rule, threshold) of the ledger (ingest rows left out: those
    lines never became samples, nobody can review them)."""
    ledger = ledger.filter(pl.col("stage") != "ingest")
    if ledger.is_empty():
        return []
    per_sample = latest_sample_decisions(decisions)
    rule_level = (
        decisions.filter(pl.col("sample_id").is_null())
        .sort("decided_at")
        .group_by("dataset", "rule", maintain_order=True)
        .last()
    )
    rows = (
        ledger.group_by("stage", "rule", "threshold", "sample_id", maintain_order=True)
        .agg(value=pl.col("value").max(), dataset=pl.col("dataset").first())
        .join(per_sample, on="sample_id", how="left")
    )
    out = []
    keys = rows.select("stage", "rule", "threshold").unique(maintain_order=True)
    for stage, rule, threshold in keys.iter_rows():
        same = (pl.col("stage") == stage) & (pl.col("rule") == rule)
        same = same & (
            pl.col("threshold").is_null() if threshold is None else pl.col("threshold") == threshold
        )
        group = rows.filter(same)
        values = [v for v in group["value"].to_list() if v is not None]
        direction = fail_direction(values, threshold)
        decided = group.filter(pl.col("decision").is_not_null() & pl.col("value").is_not_null())
        kept = decided.filter(pl.col("decision") == "keep")["value"].to_list()
        rejected = decided.filter(pl.col("decision") == "reject")["value"].to_list()
        suggested = errors_now = errors_then = None
        if direction is not None and (kept or rejected):
            suggested, errors_now, errors_then = suggest_threshold(
                kept, rejected, threshold, direction
            )
        datasets = group["dataset"].unique().to_list()
        n_rule = rule_level.filter(
            (pl.col("rule") == rule) & pl.col("dataset").is_in(datasets)
        ).height
        out.append(
            RuleLesson(
                stage=stage,
                rule=rule,
                threshold=threshold,
                samples=group.height,
                reviewed=int(group["decision"].is_not_null().sum()),
                kept=int((group["decision"] == "keep").sum()),
                rejected=int((group["decision"] == "reject").sum()),
                direction=direction,
                suggested=suggested,
                errors_now=errors_now,
                errors_suggested=errors_then,
                rule_decisions=n_rule,
            )
        )
    return sorted(out, key=lambda r: (-r.reviewed, r.stage, r.rule))


def judge_agreement(decisions: pl.DataFrame, judge: pl.DataFrame | None) -> JudgeAgreement | None:
    """Per-sample reviewer decisions against the judge's (``judge``: sample_id, decision of
    keep | reject | review, as the score stage writes them)."""
    if judge is None:
        return None
    pairs = latest_sample_decisions(decisions).join(
        judge.select("sample_id", judge="decision"), on="sample_id", how="inner"
    )
    cells = {
        f"{r}_{j}": int(((pairs["decision"] == r) & (pairs["judge"] == j)).sum())
        for r in ("keep", "reject")
        for j in ("keep", "reject")
    }
    return JudgeAgreement(**cells, judge_review=int((pairs["judge"] == "review").sum()))


def judge_decisions(run: RunFolder) -> pl.DataFrame | None:
    """The score stage's decision per sample (sample_id, decision), or None without scores."""
    import pyarrow.parquet as pq

    frames = []
    for shard in run.shards("scores"):
        path = run.shard_path("scores", shard)
        if "decision" in pq.read_schema(path).names:
            frames.append(pl.from_arrow(pq.read_table(path, columns=["sample_id", "decision"])))
    return pl.concat(frames) if frames else None


def lessons(ledger: pl.DataFrame, decisions: pl.DataFrame, judge: pl.DataFrame | None) -> Lessons:
    """Everything review teaches, from frames already read."""
    return Lessons(
        rules=rule_lessons(ledger, decisions),
        judge=judge_agreement(decisions, judge),
        sample_decisions=latest_sample_decisions(decisions).height,
    )
