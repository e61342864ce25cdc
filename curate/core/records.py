"""The sample row, sample ids, and the ledger of rejects: the data contract shared by all stages.

A sample row is what ingest writes to ``samples/``; every later stage joins on ``sample_id``.
A ledger row is one failed (or flagged) rule of one sample; a sample rejected by three rules has
three ledger rows, so nothing about why it was rejected is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import xxhash

# Conversation roles as InternVL annotations spell them.
ROLES = ("system", "human", "gpt")

TURN_TYPE = pa.struct([("role", pa.string()), ("text", pa.string())])
IMAGE_TYPE = pa.struct([("path", pa.string()), ("width", pa.int32()), ("height", pa.int32())])

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),  # 1-based line number in the annotation file
        ("domain", pa.string()),
        ("kind", pa.string()),  # text | image | multi_image | video
        ("conversations", pa.list_(TURN_TYPE)),
        ("images", pa.list_(IMAGE_TYPE)),  # absolute paths; for video, every frame in order
        ("video", pa.string()),  # the annotation's video path, null otherwise
        ("extra", pa.string()),  # the annotation's other fields, as JSON
    ]
)

SEVERITIES = ("reject", "flag")

LEDGER_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("dataset", pa.string()),
        ("line", pa.int64()),
        ("stage", pa.string()),
        ("rule", pa.string()),
        ("severity", pa.string()),  # reject | flag
        ("value", pa.float64()),
        ("threshold", pa.float64()),
        ("detail", pa.string()),
    ]
)


def sample_id(dataset: str, line: bytes, copy: int = 0) -> str:
    """Stable id of one annotation line: xxh3-64 of the dataset name and the line's bytes
    (less surrounding whitespace), seeded with ``copy``.

    The same line of the same dataset gets the same id in every run, so stages join on it and
    a rerun recognises finished work. Identical lines still get ids of their own: the first
    copy ``copy=0`` (the id such a line always had), the k-th further copy in file order
    ``copy=k``; so a decision on a duplicate never reaches the line it repeats.
    """
    h = xxhash.xxh3_64(dataset.encode("utf-8"), seed=copy)
    h.update(b"\x00")
    h.update(line.strip())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One failed or flagged rule of one sample."""

    sample_id: str
    dataset: str
    line: int
    stage: str
    rule: str
    severity: str = "reject"
    value: float | None = None
    threshold: float | None = None
    detail: str = ""


def ledger_table(entries: list[LedgerEntry]) -> pa.Table:
    """Build a ledger table (LEDGER_SCHEMA) from entries; an empty list gives an empty table."""
    columns = {name: [getattr(e, name) for e in entries] for name in LEDGER_SCHEMA.names}
    return pa.table(columns, schema=LEDGER_SCHEMA)


def empty_samples() -> pa.Table:
    return SAMPLE_SCHEMA.empty_table()
