"""Stage mechanics that need no engine: decisions and ledger from readings, the stage's input
(what the filters kept, their repetition suspects), requests per sample, prompts too long for
the judge, settings that redo or not, and clear errors."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.engine import StageOrderError, count_rows
from curate.core.folder import RunFolder
from curate.core.io import write_parquet_atomic
from curate.core.memo import Memo
from curate.core.records import LedgerEntry, ledger_table
from curate.core.stage import ShardInput
from curate.stages.score.engines import EngineError, OpenAIEngine
from curate.stages.score.labels import LabelSet, Reading
from curate.stages.score.stage import (
    CACHE_SCHEMA,
    STAGE,
    Job,
    Result,
    Scorer,
    ScoreStage,
    ScoreStageError,
    assemble,
    repetition_suspects,
)
from tests.conftest import run_stages
from tests.stages.score.conftest import filter_run, keep_shards, planted_filter, score_config


def _sample(i, domain="mathematics", dataset="math_text"):
    return {
        "sample_id": f"s{i}",
        "dataset": dataset,
        "line": i + 1,
        "domain": domain,
        "kind": "text",
        "conversations": [{"role": "human", "text": "q"}, {"role": "gpt", "text": "a"}],
        "images": [],
    }


def _reading(score):
    probs = [0.0] * 11
    probs[score] = 1.0
    return Reading(score, float(score), probs)


def _job(i, check, prompt):
    return Job(f"s{i}", check, prompt, (prompt, "x", i))


def _counts(samples, out):
    """The engine's counts of a shard output (it checks every input sample comes out once)."""
    inputs = pa.Table.from_pylist(
        [{k: s[k] for k in ("sample_id", "dataset", "line")} for s in samples]
    )
    return count_rows(STAGE, "shard", inputs, out.rows, out.ledger)


def test_decisions_and_ledger_follow_the_thresholds():
    samples = [_sample(0), _sample(1), _sample(2), _sample(3, "chart", "chart_qa")]
    jobs = [_job(i, "quality", "mathematics") for i in range(3)] + [_job(3, "quality", "chart")]
    jobs += [_job(1, "repetition", "repetition"), _job(2, "repetition", "repetition")]
    done = {
        ("s0", "quality", "mathematics"): Result(_reading(8), 10),
        ("s1", "quality", "mathematics"): Result(_reading(9), 10),
        ("s2", "quality", "mathematics"): Result(_reading(5), 10),  # below 7: reject
        ("s3", "quality", "chart"): Result(_reading(7), 10),  # chart threshold 8: reject
        ("s1", "repetition", "repetition"): Result(_reading(2), 10),  # below 3: review
        ("s2", "repetition", "repetition"): Result(
            Reading(None, None, None, "output 'x' is not a label"), 10
        ),
    }
    result = assemble(samples, jobs, done, score_config(quality_thresholds={"chart": 8}))
    counts = _counts(samples, result)
    rows = {r["sample_id"]: r for r in result.rows.to_pylist()}
    assert [rows[f"s{i}"]["decision"] for i in range(4)] == ["keep", "review", "reject", "reject"]
    assert rows["s3"]["quality_threshold"] == 8 and rows["s0"]["quality_threshold"] == 7
    assert rows["s0"]["repetition_checked"] is False and rows["s0"]["repetition_score"] is None
    assert [r["sample_id"] for r in result.rows.to_pylist()] == ["s0", "s1", "s2", "s3"]
    assert (
        counts["rows_in"],
        counts["rows_kept"],
        counts["rows_rejected"],
        counts["rows_flagged"],
    ) == (4, 2, 2, 1)
    ledger = {(e["sample_id"], e["rule"]): e for e in result.ledger.to_pylist()}
    assert set(ledger) == {
        ("s1", "repetition_below_threshold"),
        ("s2", "quality_below_threshold"),
        ("s2", "score_invalid"),
        ("s3", "quality_below_threshold"),
    }
    assert ledger[("s1", "repetition_below_threshold")]["severity"] == "flag"
    assert ledger[("s2", "quality_below_threshold")]["value"] == 5
    assert ledger[("s2", "quality_below_threshold")]["threshold"] == 7
    invalid = ledger[("s2", "score_invalid")]
    assert invalid["severity"] == "flag" and "repetition check" in invalid["detail"]
    assert "not a label" in invalid["detail"]
    assert counts["by_dataset"] == {"math_text": [3, 2, 1, 1], "chart_qa": [1, 0, 1, 0]}


def test_thresholds_on_the_expected_score_and_invalid_severity():
    samples = [_sample(0), _sample(1)]
    jobs = [_job(0, "quality", "mathematics"), _job(1, "quality", "mathematics")]
    done = {
        ("s0", "quality", "mathematics"): Result(Reading(8, 6.5, [0.0] * 11), 1),
        ("s1", "quality", "mathematics"): Result(Reading(None, None, None, "prompt too long"), 1),
    }
    cfg = score_config(threshold_on="expected", invalid_severity="reject")
    result = assemble(samples, jobs, done, cfg)
    rules = sorted((e["sample_id"], e["rule"], e["severity"]) for e in result.ledger.to_pylist())
    assert rules == [("s0", "quality_below_threshold", "reject"), ("s1", "score_invalid", "reject")]
    assert _counts(samples, result)["rows_rejected"] == 2


def test_the_input_is_what_the_filters_kept_and_their_suspects_get_the_repetition_check(
    tmp_path,
):
    run = RunFolder(tmp_path)
    samples = [_sample(i) for i in range(4)]
    write_parquet_atomic(pa.Table.from_pylist(samples), run.shard_path("samples", "a"))
    filtered = pa.table(
        {
            "sample_id": ["s0", "s1", "s2", "s3"],
            "decision": ["keep", "reject", "flag", "keep"],
            "repetition_suspect": [True, None, False, True],
        }
    )
    assert repetition_suspects(filtered) == {"s0", "s3"}
    # A filter table without suspects (or none): every sample gets the repetition check.
    assert repetition_suspects(filtered.drop_columns(["repetition_suspect"])) is None
    assert repetition_suspects(None) is None
    write_parquet_atomic(
        ledger_table(
            [
                LedgerEntry("s1", "math_text", 2, "filter", "r", "reject"),
                LedgerEntry("s2", "math_text", 3, "filter", "f", "flag"),  # flagged: scored
            ]
        ),
        run.ledger_path("filter", "a"),
    )
    inp = ShardInput(str(run.path), "a", ScoreStage.respects)
    assert inp.samples()["sample_id"].to_pylist() == ["s0", "s2", "s3"]


def test_without_filter_results_every_sample_is_scored_and_checked(ingested_run, judge, tmp_path):
    """A pipeline without a filter section: score judges every sample, each with the
    repetition check. Once the filters ran, a shard without their results stops it."""
    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    keep_shards(run, ("science_text-00000",))
    n = RunFolder(run).read("samples").num_rows
    stage = ScoreStage(score_config(max_model_len=128), judge)  # too long: no engine
    summary = run_stages(run, stage)[STAGE]
    assert summary.rows_in == n and stage.scorer.engine is None
    memo = _memo_requests(RunFolder(run), "science_text-00000")
    assert memo == {"quality": n, "repetition": n}
    # Filtered, then a shard is added upstream: score waits for its filter results.
    filter_run(run)
    for src in (f"samples/{SHARD}.parquet", f"_done/ingest/{SHARD}.json"):
        shutil.copy(ingested_run / src, run / src)
    late = ScoreStage(score_config(max_model_len=128), judge)
    with pytest.raises(StageOrderError, match=f"score needs filter shard {SHARD}, which has"):
        run_stages(run, late)
    assert late.scorer is None and not RunFolder(run).marker_path(STAGE, SHARD).exists()


SHARD = "code_text-00000"


def _too_long_run(ingested_run, tmp_path, shard="science_text-00000") -> RunFolder:
    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    keep_shards(run, (shard,))
    filter_run(run)
    return RunFolder(run)


def test_prompts_too_long_for_the_judge_are_score_invalid(ingested_run, judge, tmp_path):
    run = _too_long_run(ingested_run, tmp_path)
    # Every prompt is longer than the context: no engine is started.
    cfg = score_config(max_model_len=128, repetition_scope="all")
    stage = ScoreStage(cfg, judge)
    summary = run_stages(run, stage)[STAGE]
    assert stage.scorer.engine is None and stage.scorer.stats.requests == 0
    assert summary.redone == ["science_text-00000"] and summary.rows_in > 0
    ledger = run.ledger(STAGE).to_pylist()
    assert len(ledger) == 2 * summary.rows_in and summary.rows_flagged == summary.rows_in
    assert summary.rows_kept == summary.rows_in and summary.rows_rejected == 0
    assert {e["rule"] for e in ledger} == {"score_invalid"}
    assert "does not fit max_model_len 128" in ledger[0]["detail"]
    scores = run.read("scores").to_pylist()
    assert len(scores) == summary.rows_in
    assert all(r["quality_score"] is None and r["decision"] == "review" for r in scores)
    assert run.stats(STAGE)["rows_flagged"] == summary.rows_in


def _memo_requests(run: RunFolder, shard: str) -> dict[str, int]:
    rows = pq.read_table(Memo(run, STAGE, shard, CACHE_SCHEMA).path).to_pylist()
    out: dict[str, int] = {}
    for r in rows:
        out[r["check"]] = out.get(r["check"], 0) + 1
    return out


def test_requests_per_sample_follow_the_repetition_settings(ingested_run, judge, tmp_path):
    """A quality request per sample the filters kept, a repetition request per suspect (or
    per sample with scope all, none without the check). Prompts too long for the judge:
    every request is decided without an engine and kept in the memo."""
    shard = "science_text-00000"
    run = _too_long_run(ingested_run, tmp_path, shard)
    n = run.read("samples").num_rows
    planted_filter(run.path, reject=lambda i: i % 5 == 0, suspect=lambda i: i % 3 == 0)
    kept = [i for i in range(n) if i % 5]
    suspects = [i for i in kept if i % 3 == 0]
    assert kept and suspects
    for overrides, want in (
        ({}, {"quality": len(kept), "repetition": len(suspects)}),
        ({"repetition_scope": "all"}, {"quality": len(kept), "repetition": len(kept)}),
        ({"repetition": False}, {"quality": len(kept)}),
    ):
        Memo(run, STAGE, shard, CACHE_SCHEMA).path.unlink(missing_ok=True)
        stage = ScoreStage(score_config(max_model_len=128, **overrides), judge)
        summary = run_stages(run, stage)[STAGE]
        assert summary.rows_in == len(kept), overrides
        assert _memo_requests(run, shard) == want, overrides
        assert stage.scorer.engine is None


def test_clear_errors(small_run, demo_dir, judge, tmp_path):
    from curate.core.engine import Engine
    from curate.stages.ingest.config import IngestConfig
    from curate.stages.ingest.stage import IngestStage

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    with pytest.raises(ScoreStageError, match="judge model not found"):
        run_stages(run, ScoreStage(score_config(), tmp_path / "nope"))
    assert not (run / "_done" / STAGE).exists()
    # A run folder with no samples yet: the pipeline's ingest has to run first.
    ingest = IngestStage(IngestConfig(), demo_dir / "meta.json")
    stages = [ingest, ScoreStage(score_config(), judge)]
    with pytest.raises(StageOrderError, match="score needs ingest, which has not run yet"):
        Engine(RunFolder(tmp_path / "empty"), stages).run_stage(STAGE)


def test_unreachable_server_is_a_clear_error(tokenizer_dir):
    from transformers import AutoTokenizer

    labels = LabelSet(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = score_config(
        engine="openai", server_url="http://127.0.0.1:9/v1", retries=1, backoff_s=0, timeout_s=2
    )
    with pytest.raises(EngineError, match="cannot reach the scoring server at http://127.0.0.1:9"):
        OpenAIEngine(cfg, labels)


def test_vlm_requests_carry_the_images_in_placeholder_order(ingested_run, judge, tmp_path):
    """The VLM path without a VLM: placeholders stay images and the engine input holds them."""
    from PIL import Image

    from curate.stages.score.engines import EngineRequest, VllmEngine

    samples = RunFolder(ingested_run).read("samples", ["multi_image_compare-00000"]).to_pylist()
    cfg = score_config(vlm=True, image_placeholder="<image>")
    scorer = Scorer(cfg, judge)
    jobs = scorer.jobs(samples[:2], lambda s: False)
    scorer.render(jobs)
    for job, s in zip(sorted(jobs, key=lambda j: j.sort_key[2]), samples[:2], strict=True):
        assert job.images == [im["path"] for im in s["images"]]
        assert job.text.count("<image>") == len(s["images"]) >= 2
    engine = object.__new__(VllmEngine)  # no model load: only the request building
    engine.cfg, engine.labels = cfg, scorer.labels
    prompt = engine._prompt(EngineRequest(jobs[0].text, jobs[0].ids, jobs[0].images))
    assert prompt["prompt"] == jobs[0].text
    images = prompt["multi_modal_data"]["image"]
    assert len(images) == len(jobs[0].images) and all(isinstance(i, Image.Image) for i in images)
    one = next(iter(scorer.labels.next))
    follow = engine._prompt(EngineRequest(jobs[0].text, jobs[0].ids, jobs[0].images, one))
    assert follow["prompt"] == jobs[0].text + "1"
    with pytest.raises(EngineError, match="VLM judge needs engine: vllm"):
        OpenAIEngine(score_config(engine="openai", vlm=True), scorer.labels)


def test_server_errors_fatal_or_per_request(tokenizer_dir):
    """A 400 is that request's problem (score_invalid); a 404 stops the run with its message."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from transformers import AutoTokenizer

    from curate.stages.score.engines import EngineRequest

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"data": [{"id": "judge"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code = 400 if body["prompt"] == "too long" else 404
            self._send(code, {"error": {"message": f"error {code}"}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        labels = LabelSet(AutoTokenizer.from_pretrained(tokenizer_dir))
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        engine = OpenAIEngine(score_config(engine="openai", server_url=url), labels)
        assert engine.model == "judge"
        [out] = engine.run([EngineRequest("too long", [1, 2])])
        assert out.error == "server rejected the request (HTTP 400): error 400"
        assert labels.read(out).reason == out.error
        with pytest.raises(EngineError, match=r"failed \(HTTP 404\): error 404"):
            engine.run([EngineRequest("fine", [1, 2])])
    finally:
        server.shutdown()


def test_settings_separate_decisions_from_raw_scores(judge, tmp_path):
    """The stage's settings (what redoes its shards) are the raw scores' fingerprint and the
    decision fields: engine plumbing redoes nothing; thresholds redo the decisions (from the
    memo: the content fingerprint, which the memo's rows carry, is unchanged); prompts redo
    the scores."""
    from curate.stages.score.prompts import PromptLibrary
    from curate.stages.score.stage import content_fingerprint

    lib = PromptLibrary()
    base = score_config()
    content = content_fingerprint(base, judge, lib)
    settings = ScoreStage(base, judge).settings()
    assert settings["content"] == content
    same = score_config(engine="openai", batch_size=7, concurrency=3, tensor_parallel_size=2)
    assert content_fingerprint(same, judge, lib) == content
    assert ScoreStage(same, judge).settings() == settings
    stricter = score_config(quality_threshold=8)
    assert content_fingerprint(stricter, judge, lib) == content
    assert ScoreStage(stricter, judge).settings()["content"] == content
    assert ScoreStage(stricter, judge).settings() != settings
    assert ScoreStage(score_config(repetition_scope="all"), judge).settings() != settings
    (tmp_path / "general.md").write_text("Mine.\n{metadata}\n{conversation}")
    assert content_fingerprint(base, judge, PromptLibrary(tmp_path)) != content
    mine = ScoreStage(score_config(prompts_dir=tmp_path), judge).settings()
    assert mine["content"] != content and mine["decisions"] == settings["decisions"]


def test_memo_written_with_the_greedy_choice_gives_the_most_probable_label(tmp_path, judge):
    """A memo saved before scores were the most probable label re-decides from its stored
    probabilities (no new request), and the stage's settings change so its shards are redone."""
    from curate.stages.score.stage import load_cache

    probs = [0.0955] * 11
    probs[7], probs[10], probs[1] = 0.1365, 0.086, 0.014
    row = {
        "sample_id": "s0",
        "check": "quality",
        "prompt": "general",
        "score": 10,  # the constrained greedy choice
        "expected": 5.0,
        "probs": probs,
        "reason": None,
        "prompt_tokens": 10,
        "fingerprint": "f",
    }
    memo = Memo(RunFolder(tmp_path), STAGE, "shard", CACHE_SCHEMA)
    memo.save(pa.Table.from_pylist([row, {**row, "sample_id": "s1", "probs": None}]))
    done = load_cache(memo, "f")
    assert done[("s0", "quality", "general")].reading.score == 7
    assert done[("s1", "quality", "general")].reading.score == 10  # no probabilities: the choice
    assert ScoreStage(score_config(), judge).settings()["score"] == "most_probable_label"
