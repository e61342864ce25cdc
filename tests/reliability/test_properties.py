"""Property tests: the JSONL reader and the rules never raise and stay within their ranges."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.stages.filters.rules import check_sample
from curate.stages.ingest.meta import DatasetSpec
from curate.stages.ingest.normalize import parse_line

SPEC = DatasetSpec(name="p", root="/nonexistent-root", annotation="/dev/null")
ROLES = st.sampled_from(["human", "gpt", "system", "robot", 3, None])
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | st.sampled_from(
    ["<image>", "<video>\n", "0" * 80, "ab" * 60, "\x00\ufffd", "", " \n "]
)
TURN = st.fixed_dictionaries({"from": ROLES, "value": TEXT | st.integers()})
RECORD = st.fixed_dictionaries(
    {"conversations": st.lists(TURN, max_size=6) | st.none() | st.text(max_size=5)},
    optional={
        "image": st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=3) | st.integers(),
        "video": st.text(max_size=10),
        "id": st.integers(),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_parse_line_never_raises_on_bytes(line):
    parsed = parse_line(line, SPEC, max_image_pixels=10**8, max_line_bytes=300)
    assert (parsed.row is None) == bool(parsed.problems)
    assert all(p.rule and isinstance(p.detail, str) for p in parsed.problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORD)
def test_parse_line_never_raises_on_records(record):
    # stdlib json writes integers of any size; the reader must cope (orjson refuses > 64 bits).
    parsed = parse_line(json.dumps(record).encode(), SPEC, max_image_pixels=10**8)
    assert (parsed.row is None) == bool(parsed.problems)
    if parsed.row is not None:
        assert parsed.row["kind"] in ("text", "image", "multi_image", "video")


ANSWERS = st.lists(TEXT, min_size=1, max_size=3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ANSWERS, st.text(max_size=200))
def test_rules_never_raise_and_ratios_stay_in_range(answers, question):
    turns = []
    for a in answers:
        turns += [{"role": "human", "text": question}, {"role": "gpt", "text": a}]
    sample = {
        "sample_id": "x",
        "dataset": "p",
        "line": 1,
        "domain": "general",
        "kind": "text",
        "conversations": turns,
        "images": [],
        "video": None,
        "extra": None,
    }
    metrics, reasons = check_sample(sample)
    assert all(r.severity in ("reject", "flag") for r in reasons)
    for name, value in metrics.items():
        if isinstance(value, float) and not math.isnan(value) and name.endswith(("frac", "ratio")):
            assert 0.0 <= value <= 1.0, (name, value)
