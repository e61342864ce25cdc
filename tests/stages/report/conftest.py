"""A planted run for the inspection tests: the budgeted demo run plus deterministic filter and
score ledgers, a scores/ shard, and packs.

Planted (``PLANT`` gives the sample ids):

- ``hostile``: an image sample rejected by ``filter/char_run`` whose ledger detail carries a
  ``<script>`` and an attribute-breaking ``onerror=`` attempt;
- ``flagged``: an image sample flagged by ``filter/duplicate_lines``;
- ``zero``: a text sample flagged by ``filter/zero_run``;
- ``many``: eight samples flagged by ``filter/many_rule`` (for the per-rule gallery cap);
- ``low``: three samples scored 2, 3, 5 (< 7), rejected by ``score/quality_below_threshold``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from curate.core.records import LedgerEntry, ledger_table
from tests.conftest import mark_planted, run_stages

HOSTILE = "<script>alert(1)</script>\"><img src=x onerror=alert(2)> run of 'a'"
HOSTILE_CONVERSATION = '<script>alert(1)</script>"><img src=x onerror="alert(2)"> NUL\x00 bell\x07'


def _plant_ids(run: RunFolder) -> dict[str, list[str]]:
    s = pl.from_arrow(run.read("samples").select(["sample_id", "dataset", "kind", "line"]))
    s = s.sort("dataset", "line")
    images = s.filter(pl.col("kind") == "image")
    texts = s.filter(pl.col("kind") == "text")
    hostile = images.filter(pl.col("dataset") == "general_vqa")["sample_id"][0]
    flagged = images.filter(pl.col("dataset") == "doc_ocr")["sample_id"][0]
    zero = texts.filter(pl.col("dataset") == "math_text")["sample_id"][0]
    used = {hostile, flagged, zero}
    rest = [x for x in s.filter(pl.col("dataset") == "chart_qa")["sample_id"] if x not in used]
    return {
        "hostile": [hostile],
        "flagged": [flagged],
        "zero": [zero],
        "many": rest[:8],
        "low": rest[8:11],
    }


def plant(run: RunFolder) -> dict[str, list[str]]:
    """Write the planted ledgers and scores into ``run``; returns the planted ids."""
    ids = _plant_ids(run)
    s = pl.from_arrow(run.read("samples").select(["sample_id", "dataset", "line", "domain"]))
    info = {r["sample_id"]: r for r in s.iter_rows(named=True)}

    def entry(sid, stage, rule, severity, value, threshold, detail=""):
        return LedgerEntry(
            sid,
            info[sid]["dataset"],
            info[sid]["line"],
            stage,
            rule,
            severity,
            value,
            threshold,
            detail,
        )

    rows = [
        entry(ids["hostile"][0], "filter", "char_run", "reject", 150.0, 100.0, HOSTILE),
        entry(ids["flagged"][0], "filter", "duplicate_lines", "flag", 0.9167, 0.5, "dup"),
        entry(ids["zero"][0], "filter", "zero_run", "flag", 120.0, 24.0, "zeros"),
        *(
            entry(x, "filter", "many_rule", "flag", float(i), 0.0, f"many {i}")
            for i, x in enumerate(ids["many"])
        ),
    ]
    write_parquet_atomic(ledger_table(rows), run.ledger_path("filter", "x"))
    low = dict(zip(ids["low"], (2, 3, 5), strict=True))
    scores = [
        {
            "sample_id": sid,
            "dataset": r["dataset"],
            "line": r["line"],
            "domain": r["domain"],
            "quality_score": low.get(sid, 8),
            "quality_expected": float(low.get(sid, 8)) - 0.25,
            "quality_threshold": 7.0,
            "decision": "reject" if sid in low else "keep",
        }
        for sid, r in info.items()
    ]
    write_parquet_atomic(pa.Table.from_pylist(scores), run.shard_path("scores", "x"))
    score_rows = [
        entry(
            sid,
            "score",
            "quality_below_threshold",
            "reject",
            float(v),
            7.0,
            "quality: below threshold",
        )
        for sid, v in low.items()
    ]
    write_parquet_atomic(ledger_table(score_rows), run.ledger_path("score", "x"))
    mark_planted(run, "filter", "x")
    mark_planted(run, "score", "x")
    return ids


def make_hostile_conversation(run: RunFolder, sample_id: str) -> None:
    """Rewrite the sample's answer to hostile HTML (for report tests; not packed afterwards)."""
    for shard in run.shards("samples"):
        table = run.read("samples", [shard])
        rows = table.to_pylist()
        if not any(r["sample_id"] == sample_id for r in rows):
            continue
        for r in rows:
            if r["sample_id"] == sample_id:
                r["conversations"][-1]["text"] = HOSTILE_CONVERSATION
        write_parquet_atomic(
            pa.Table.from_pylist(rows, schema=table.schema), run.shard_path("samples", shard)
        )


@pytest.fixture(scope="session")
def planted_run(budgeted_run, tokenizer_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The budgeted demo run with planted ledgers, scores and packs (read-only: copy it)."""
    from curate.stages.pack.config import PackConfig

    path = tmp_path_factory.mktemp("inspect") / "planted"
    shutil.copytree(budgeted_run, path)
    run = RunFolder(path)
    ids = plant(run)
    pack(run, PackConfig(max_tokens=8192, max_tiles=40), tokenizer_dir)
    return path, ids


def pack(run: RunFolder, cfg, tokenizer_dir: Path):
    """Tokenize and pack ``run`` through the engine, respecting the planted filter and score
    ledgers (and the review decisions); returns the pack stage's summary."""
    from curate.stages.pack.stage import PackStage
    from curate.stages.pack.tokenize import TokenizeStage

    summaries = run_stages(
        run, TokenizeStage(cfg, tokenizer_dir), PackStage(cfg, tokenizer_dir, ("filter", "score"))
    )
    return summaries["pack"]
