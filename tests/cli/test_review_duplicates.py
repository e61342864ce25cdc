"""``curate review`` on a duplicate line: every line has its own id, so a decision on the
duplicate never reaches the line it repeats (issue 13, item 4)."""

from __future__ import annotations

import orjson
from PIL import Image

from curate.core.folder import RunFolder
from curate.core.status import sample_status
from curate.stages.report.tables import rejected_samples
from tests.cli.test_cli import assert_ok, assert_user_error, invoke


def _line(k: int) -> bytes:
    turns = [{"from": "human", "value": f"<image>\nWhat is {k}?"}, {"from": "gpt", "value": "A."}]
    return orjson.dumps({"image": "ok.png", "conversations": turns})


def _ingested(tmp_path) -> RunFolder:
    """Line 5 repeated as line 7, among other lines."""
    (tmp_path / "root").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "root" / "ok.png")
    lines = [_line(k) for k in range(6)] + [_line(4)]
    (tmp_path / "ann.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    meta = tmp_path / "meta.json"
    meta.write_bytes(orjson.dumps({"ds": {"root": "root", "annotation": "ann.jsonl"}}))
    run = tmp_path / "run"
    result, _ = invoke("ingest", meta, "--run", run)
    assert_ok(result)
    return RunFolder(run)


def test_rejecting_a_duplicate_leaves_its_first_copy_alone(tmp_path):
    run = _ingested(tmp_path)
    (dup,) = run.ledger("ingest").to_pylist()
    first = next(s for s in run.read("samples").to_pylist() if s["line"] == 5)
    assert dup["line"] == 7 and dup["rule"] == "duplicate_sample"
    assert dup["sample_id"] != first["sample_id"]
    assert dup["detail"] == f"same content as line 5 (sample {first['sample_id']})"

    result, _ = invoke("review", "--run", run.path, "--sample", dup["sample_id"], "--reject")
    assert_user_error(result, "rejected at ingest (duplicate_sample)")
    status = dict(sample_status(run).select("sample_id", "status").iter_rows())
    assert status[first["sample_id"]] == "keep" and set(status.values()) == {"keep"}
    # The notebook's view: the duplicate is a line ingest rejected (never a sample), not kept.
    (row,) = rejected_samples(run).to_dicts()
    assert (row["line"], row["status"], row["ingested"]) == (7, "reject", False)
