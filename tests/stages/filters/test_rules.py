"""One test per rule: a sample planted to fail it, run through the stage, and the exact rule name
(with severity, value and threshold) found in the ledger. Also: every failed rule is kept,
overrides per dataset and domain, the count invariant, and clean samples stay clean."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from curate.stages.filters.config import FilterConfig
from curate.stages.filters.registry import RULES, RULES_BY_NAME
from curate.stages.filters.rules import check_sample
from curate.stages.filters.stage import FILTER_SCHEMA
from tests.stages.filters.helpers import image, make_run, prose, run_filter, sample

rng = random.Random(0)
LONG_WORDS = " ".join(f"w{i}" for i in range(250))
DUP_LINE = "The total is four apples."


def _bad_samples(tmp) -> dict[str, dict]:
    """rule name -> a sample that fails it (and its expected metric value, where exact)."""
    ok_img = image(tmp / "img" / "ok.png", 300, 200)
    twice = prose(random.Random(1), 8)
    return {
        "empty_answer": sample("  \n "),
        "answer_too_long": sample("\n".join(prose(rng, 20) for _ in range(30))),
        "long_sentence": sample(LONG_WORDS),
        "long_line": sample(" ".join(prose(rng, 1, (8, 8)) for _ in range(120))),
        "zero_run": sample("The value is 1" + "0" * 80 + "."),
        "char_run": sample("Result: no" + "!" * 80 + "\nDone."),  # a separator line is layout
        "control_chars": sample("It is 4.\x07"),
        "replacement_char": sample("It is \ufffd4."),
        "image_in_answer": sample("Here: <image> a cat."),
        "placeholder_mismatch": sample(
            "A cat.", question="<image>\n<image>\nWhat?", images=[ok_img]
        ),
        "duplicate_lines": sample(
            "\n".join([DUP_LINE, "The first item.", DUP_LINE, DUP_LINE, DUP_LINE])
        ),
        "duplicate_paragraphs": sample("First part.\n\nSecond part.\n\nFirst part.\n\nFirst part."),
        "char_repetition": sample("Oh n" + "o" * 100),
        "word_repetition": sample(
            prose(rng, 2) + " the quick brown fox jumps over the lazy dog"
            " again and again." * 12 + " Then it rests by the river bank."
        ),
        "internvl_repetition": sample(f"{twice} {twice}"),
        "language_mismatch": sample(
            "The capital of France is Paris, known for its art, history and museums.",
            question="Wie heißt die Hauptstadt von Frankreich, und warum ist sie so bekannt?",
        ),
        "mixed_script": sample("Log in at pаypal.com to check your аccount details today."),
        "tail_loop": sample(prose(rng, 3) + " The answer is B." * 30),
        "counting_loop": sample("The counts are:\n" + "\n".join(f"{k}." for k in range(1, 60))),
        "repeated_paragraph": sample(f"{prose(random.Random(2), 1)}\n\n{twice}\n\n{twice}"),
        "repeated_turns": sample([twice, "Another thing entirely.", twice]),
        "duplicate_sample": sample("Same content in two datasets.", dataset="ds_b", line=7),
        "image_unreadable": sample(
            "A photo.", images=[image(tmp / "img" / "trunc.jpg", 400, 300, truncate=True)]
        ),
        "image_too_small": sample("An icon.", images=[image(tmp / "img" / "tiny.png", 20, 20)]),
        "image_aspect_ratio": sample(
            "A banner.", images=[image(tmp / "img" / "wide.png", 1100, 100)]
        ),
        "image_blank": sample(
            "A photo.", images=[image(tmp / "img" / "blank.png", 200, 200, blank=True)]
        ),
        "image_clipped": sample(
            "A scan.", images=[image(tmp / "img" / "scan16.png", 160, 120, sixteen_bit=True)]
        ),
    }


def _good_samples(tmp) -> list[dict]:
    r = random.Random(5)
    rows = [sample(prose(r, r.randint(1, 6)), dataset="ds_a") for _ in range(10)]
    rows += [sample("Yes."), sample("The answer is 4.")]
    rows += [
        sample(prose(r, 3), images=[image(tmp / "img" / f"good{i}.png", 320, 240, seed=i)])
        for i in range(3)
    ]
    rows.append(sample("Same content in two datasets.", dataset="ds_a", line=3))  # the first copy
    return rows


# Every rule on, those off by default included, so that each must reach the ledger.
CONFIG = FilterConfig(
    rules={
        rule: {"enabled": True}
        for rule in ("internvl_repetition", "language_mismatch", "mixed_script")
    },
    workers=2,
)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rules")
    bad = _bad_samples(tmp)
    rows = []
    for k, (rule, row) in enumerate(bad.items()):
        if rule != "duplicate_sample":
            row.update(dataset="ds_a", line=100 + k, sample_id=f"bad:{rule}")
        else:
            row.update(sample_id="bad:duplicate_sample")
        rows.append(row)
    good = _good_samples(tmp)
    for k, row in enumerate(good):
        row.update(line=k + 1 if row["line"] != 3 else 3, sample_id=f"good:{k}")
    rows = good + rows
    run = make_run(tmp / "run", rows, shard_size=10)
    summary = run_filter(run, CONFIG)
    return run, summary, rows


def _ledger(run):
    return run.ledger("filter").to_pylist()


@pytest.mark.parametrize("rule", [r.name for r in RULES])
def test_rule_reaches_the_ledger(filtered, rule):
    run, _, _ = filtered
    hits = [e for e in _ledger(run) if e["sample_id"] == f"bad:{rule}" and e["rule"] == rule]
    assert len(hits) == 1, [e["rule"] for e in _ledger(run) if e["sample_id"] == f"bad:{rule}"]
    hit = hits[0]
    spec = RULES_BY_NAME[rule]
    assert hit["stage"] == "filter"
    assert hit["severity"] == spec.severity
    assert hit["threshold"] == spec.threshold
    value, threshold = hit["value"], hit["threshold"]
    assert value > threshold if spec.op == ">" else value < threshold
    assert hit["detail"]


def test_exact_values_in_ledger(filtered):
    run, _, _ = filtered
    by = {(e["sample_id"], e["rule"]): e for e in _ledger(run)}
    assert by[("bad:zero_run", "zero_run")]["value"] == 80
    assert by[("bad:char_run", "char_run")]["value"] == 80
    assert by[("bad:long_sentence", "long_sentence")]["value"] == 250
    # Content characters: "the total is four apples" (24) three times of 4 * 24 + 14.
    assert by[("bad:duplicate_lines", "duplicate_lines")]["value"] == 72 / 110
    # "first part" (10) twice of 3 * 10 + 11 ("second part").
    assert by[("bad:duplicate_paragraphs", "duplicate_paragraphs")]["value"] == 20 / 41
    assert by[("bad:counting_loop", "counting_loop")]["value"] == 59
    assert by[("bad:placeholder_mismatch", "placeholder_mismatch")]["value"] == 1
    assert by[("bad:image_aspect_ratio", "image_aspect_ratio")]["value"] == 11
    assert by[("bad:image_too_small", "image_too_small")]["value"] == 20
    assert by[("bad:image_blank", "image_blank")]["value"] == 0
    dup = by[("bad:duplicate_sample", "duplicate_sample")]
    assert dup["detail"] == "same content as ds_a:3 (good:15)"
    assert "truncated" in by[("bad:image_unreadable", "image_unreadable")]["detail"]


def test_every_failed_rule_is_kept(filtered):
    run, _, _ = filtered
    rules = {e["rule"] for e in _ledger(run) if e["sample_id"] == "bad:tail_loop"}
    assert {"tail_loop", "word_repetition"} <= rules  # not just the first reason


def test_clean_samples_stay_clean(filtered):
    run, _, _ = filtered
    assert not [e for e in _ledger(run) if e["sample_id"].startswith("good:")]


def test_count_invariant_and_outputs(filtered):
    run, summary, rows = filtered
    assert summary.rows_in == len(rows) == summary.rows_kept + summary.rows_rejected
    out = run.read("filter", schema=FILTER_SCHEMA)
    assert out.schema.equals(FILTER_SCHEMA)
    assert out.num_rows == summary.rows_kept  # one row per kept or flagged sample
    ledger = _ledger(run)
    rejected = {e["sample_id"] for e in ledger if e["severity"] == "reject"}
    flagged = {e["sample_id"] for e in ledger} - rejected
    assert len(rejected) == summary.rows_rejected and len(flagged) == summary.rows_flagged
    decisions = dict(zip(out["sample_id"].to_pylist(), out["decision"].to_pylist(), strict=True))
    assert not rejected & set(decisions)
    assert {s for s, d in decisions.items() if d == "flag"} == flagged
    suspects = set(out.filter(out["repetition_suspect"])["sample_id"].to_pylist())
    assert "bad:tail_loop" in suspects and "bad:image_blank" not in suspects
    flags = dict(zip(out["sample_id"].to_pylist(), out["flags"].to_pylist(), strict=True))
    assert flags["bad:image_blank"] == ["image_blank"] and flags["good:0"] == []
    for shard in run.shards("samples"):
        marker = pq.read_table(run.shard_path("filter", shard)).num_rows
        assert marker <= pq.read_table(run.shard_path("samples", shard)).num_rows


def test_rerun_skips_finished_shards(filtered, tmp_path):
    import shutil

    run, summary, _ = filtered
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    from curate.core.folder import RunFolder

    again = run_filter(RunFolder(copy), CONFIG)
    assert again.shards_skipped == again.shards and again.rows_in == summary.rows_in


# --- settings --------------------------------------------------------------------------------


def test_overrides_dataset_beats_domain_beats_rules():
    cfg = FilterConfig(
        rules={"zero_run": {"threshold": 10}},
        overrides={
            "mathematics": {"zero_run": {"threshold": 100}},
            "big_numbers": {"zero_run": {"threshold": 30, "severity": "reject"}},
        },
    )
    row = sample("It is 1" + "0" * 40 + ".", domain="mathematics", dataset="big_numbers")
    assert [r.rule for r in check_sample({**row, "dataset": "other"}, cfg)[1]] == []  # 40 < 100
    assert [r.rule for r in check_sample({**row, "domain": "general", "dataset": "x"}, cfg)[1]] == [
        "zero_run"
    ]  # threshold 10
    (reason,) = check_sample(row, cfg)[1]
    assert (reason.rule, reason.severity, reason.threshold) == ("zero_run", "reject", 30)


def test_rule_can_be_disabled():
    row = sample("It is 4.\x07")
    cfg = FilterConfig(overrides={"ds_a": {"control_chars": {"enabled": False}}})
    assert check_sample(row, cfg)[1] == []


def test_unknown_rule_is_an_error():
    with pytest.raises(ValidationError, match="unknown rule"):
        FilterConfig(rules={"zero_runs": {"threshold": 3}})
    with pytest.raises(ValidationError):
        FilterConfig(rules={"zero_run": {"treshold": 3}})


def test_unknown_override_target_is_an_error(tmp_path):
    run = make_run(tmp_path / "run", [sample("A cat.")])
    with pytest.raises(ValueError, match="unknown datasets/domains"):
        run_filter(run, FilterConfig(overrides={"no_such_dataset": {"zero_run": {}}}, workers=1))


def test_images_not_decoded_when_disabled(tmp_path):
    row = sample("A photo.", images=[image(tmp_path / "t.jpg", 400, 300, truncate=True)])
    metrics, reasons = check_sample(row, FilterConfig(decode_images=False))
    assert reasons == [] and metrics["unreadable_images"] != metrics["unreadable_images"]  # NaN


def test_sixteen_bit_grey_is_flagged_as_clipped(tmp_path):
    """A 16-bit grey scan keeps some spread in its thumbnail but the trainer's convert("RGB")
    clips almost all of it to white: its own rule says so, with the mode and the share."""
    import numpy as np
    from PIL import Image

    row = sample("A scan.", images=[image(tmp_path / "scan16.png", 160, 120, sixteen_bit=True)])
    with Image.open(row["images"][0]["path"]) as im:
        assert im.mode.startswith("I")
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.99
    metrics, reasons = check_sample(row)
    assert metrics["min_image_std"] > 2  # why the blank rule alone missed it
    (hit,) = [r for r in reasons if r.rule == "image_clipped"]
    assert hit.value > 0.99 and "mode I;16" in hit.detail and "% clipped" in hit.detail


def test_eight_bit_image_is_not_clipped(tmp_path):
    row = sample("A photo.", images=[image(tmp_path / "rgb.png", 64, 64)])
    metrics, reasons = check_sample(row)
    assert metrics["max_clipped_share"] == 0
    assert not [r for r in reasons if r.rule == "image_clipped"]


def test_builtin_domain_thresholds_sit_below_the_pipeline_file():
    from curate.stages.filters.registry import DOMAIN_THRESHOLDS

    code = FilterConfig().resolve("any", "programming")
    assert code["duplicate_lines"].threshold == DOMAIN_THRESHOLDS["programming"]["duplicate_lines"]
    assert FilterConfig().resolve("any", "general")["duplicate_lines"].threshold == 0.5
    # Any setting in the pipeline file wins over the built-in domain threshold.
    mine = FilterConfig(rules={"duplicate_lines": {"threshold": 0.2}})
    assert mine.resolve("any", "programming")["duplicate_lines"].threshold == 0.2
    mine = FilterConfig(overrides={"programming": {"word_repetition": {"threshold": 0.3}}})
    assert mine.resolve("any", "programming")["word_repetition"].threshold == 0.3
