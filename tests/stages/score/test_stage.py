"""Stage mechanics that need no engine: decisions and ledger from readings, filter results,
prompts too long for the judge, and clear errors."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.io import write_parquet_atomic
from curate.core.records import LedgerEntry, ledger_table
from curate.core.folder import RunFolder
from curate.stages.score.engines import EngineError, OpenAIEngine
from curate.stages.score.labels import LabelSet, Reading
from curate.stages.score.stage import (
    Job,
    Result,
    Scorer,
    ScoreStageError,
    assemble,
    count_requests,
    filter_view,
    score_run,
)
from tests.score.conftest import score_config


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
    rows = {r["sample_id"]: r for r in result.outputs["scores"].to_pylist()}
    assert [rows[f"s{i}"]["decision"] for i in range(4)] == ["keep", "review", "reject", "reject"]
    assert rows["s3"]["quality_threshold"] == 8 and rows["s0"]["quality_threshold"] == 7
    assert rows["s0"]["repetition_checked"] is False and rows["s0"]["repetition_score"] is None
    assert (result.rows_in, result.rows_kept, result.rows_rejected, result.rows_flagged) == (
        4,
        2,
        2,
        1,
    )
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
    assert result.rows_by_dataset == {"math_text": [3, 2, 1, 1], "chart_qa": [1, 0, 1, 0]}


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
    assert result.rows_rejected == 2


def test_filter_view(tmp_path):
    run = RunFolder(tmp_path)
    assert filter_view(run, "a") == (set(), None)  # no filter stage: everything is a suspect
    (tmp_path / "filter").mkdir()
    pq.write_table(
        pa.table(
            {
                "sample_id": ["x", "y", "z"],
                "decision": ["keep", "reject", "flag"],
                "repetition_suspect": [True, None, False],
            }
        ),
        run.shard_path("filter", "a"),
    )
    assert filter_view(run, "a") == ({"y"}, {"x"})
    write_parquet_atomic(
        ledger_table([LedgerEntry("z", "d", 3, "filter", "r", "reject")]),
        run.ledger_path("filter", "a"),
    )
    assert filter_view(run, "a")[0] == {"y", "z"}
    with pytest.raises(ScoreStageError, match="finish `curate filter`"):
        filter_view(run, "b")


def test_prompts_too_long_for_the_judge_are_score_invalid(ingested_run, judge, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ingested_run, run)
    for p in (run / "samples").glob("*.parquet"):
        if p.stem != "science_text-00000":
            p.unlink()
    cfg = score_config(max_model_len=128)  # every prompt is longer: no engine is started
    scorer = Scorer(cfg, judge)
    summary, report = score_run(RunFolder(run), cfg, scorer=scorer)
    assert scorer.engine is None and report.requests == 0
    ledger = RunFolder(run).ledger("score").to_pylist()
    assert len(ledger) == 2 * summary.rows_in and summary.rows_flagged == summary.rows_in
    assert {e["rule"] for e in ledger} == {"score_invalid"}
    assert "does not fit max_model_len 128" in ledger[0]["detail"]
    scores = RunFolder(run).read("scores").to_pylist()
    assert all(r["quality_score"] is None and r["decision"] == "review" for r in scores)


def test_count_requests_and_clear_errors(ingested_run, judge, tmp_path):
    run = RunFolder(ingested_run)
    n = run.read("samples").num_rows
    assert count_requests(run, score_config(), run.shards("samples")) == 2 * n
    assert count_requests(run, score_config(repetition=False), run.shards("samples")) == n
    with pytest.raises(ScoreStageError, match="judge model not found"):
        score_run(run, score_config(), tmp_path / "nope")
    with pytest.raises(ScoreStageError, match="no samples"):
        score_run(RunFolder(tmp_path), score_config(), judge)


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


def test_fingerprints_separate_decisions_from_raw_scores(judge, tmp_path):
    from curate.stages.score.prompts import PromptLibrary
    from curate.stages.score.stage import content_fingerprint, stage_fingerprint

    lib = PromptLibrary()
    base = score_config()
    content = content_fingerprint(base, judge, lib)
    # Engine plumbing changes nothing; thresholds change decisions only; prompts change scores.
    same = score_config(engine="openai", batch_size=7, concurrency=3, tensor_parallel_size=2)
    assert content_fingerprint(same, judge, lib) == content
    assert stage_fingerprint(same, content) == stage_fingerprint(base, content)
    stricter = score_config(quality_threshold=8)
    assert content_fingerprint(stricter, judge, lib) == content
    assert stage_fingerprint(stricter, content) != stage_fingerprint(base, content)
    (tmp_path / "general.md").write_text("Mine.\n{metadata}\n{conversation}")
    assert content_fingerprint(base, judge, PromptLibrary(tmp_path)) != content
