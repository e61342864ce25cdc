"""The score stage on the real engine: vLLM on the CPU with the tiny random judge.

Random weights make the scores meaningless, so these tests check mechanics: every request
gives a valid score, label probabilities equal a transformers forward pass, requests sharing
a prompt hit the prefix cache, thresholds reach the ledger (re-decided from the memo, without
a request), an interrupted run resumes from the memo to the same output, and the
OpenAI-compatible server agrees with the offline engine.
"""

from __future__ import annotations

import math
import shutil

import pyarrow.parquet as pq
import pytest

from curate.core.folder import RunFolder
from curate.core.memo import Memo
from curate.stages.score.labels import LABELS
from curate.stages.score.stage import CACHE_SCHEMA, STAGE, ScoreStage
from tests.conftest import run_stages
from tests.stages.score.conftest import planted_filter, score_config

pytestmark = pytest.mark.slow

# The small run's filters kept every sample and found no repetition suspect: scope "all" gives
# every sample both checks.
SCOPE = {"repetition_scope": "all"}


def _copy(src, tmp_path, name="run"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return RunFolder(dst)


def cache_path(run: RunFolder, shard: str):
    return Memo(run, STAGE, shard, CACHE_SCHEMA).path


def score(run, cfg, scorer=None, judge=None, on_chunk=None):
    """Run the score stage through the engine (with the shared engine unless ``judge``)."""
    stage = ScoreStage(cfg, judge or scorer.model)
    stage.scorer = scorer
    stage.on_chunk = on_chunk
    return run_stages(run, stage)[STAGE], stage


class Delta:
    """Engine totals since it was made (the shared engine keeps counting across tests)."""

    def __init__(self, stats) -> None:
        self.stats = stats
        self.start = (stats.requests, stats.prompt_tokens, stats.cached_tokens)

    @property
    def requests(self) -> int:
        return self.stats.requests - self.start[0]

    @property
    def cache_hit_rate(self) -> float:
        prompt = self.stats.prompt_tokens - self.start[1]
        return (self.stats.cached_tokens - self.start[2]) / prompt


@pytest.fixture(scope="module")
def scored(small_run, scorer, tmp_path_factory):
    """The small run scored once, uninterrupted, with default thresholds."""
    run = _copy(small_run, tmp_path_factory.mktemp("scored"))
    engine = Delta(scorer.stats)
    summary, _ = score(run, score_config(**SCOPE), scorer)
    return run, summary, engine


def test_every_request_gives_a_valid_score(scored, judge_server_started):
    # (judge_server_started: the server boots in the background while these tests run.)
    run, summary, engine = scored
    samples = run.read("samples")
    scores = run.read("scores")
    assert scores.num_rows == samples.num_rows == summary.rows_in
    assert summary.rows_in == summary.rows_kept + summary.rows_rejected
    assert sorted(summary.redone) == run.shards("samples") == sorted(run.markers(STAGE))
    assert run.stats(STAGE)["rows_in"] == summary.rows_in
    rows = scores.to_pylist()
    for r in rows:
        for check in ("quality", "repetition"):  # scope all: everything is checked
            assert r[f"{check}_score"] in range(11) and r[f"{check}_reason"] is None
            assert math.isclose(sum(r[f"{check}_probs"]), 1.0, abs_tol=1e-5)
            expected = sum(s * p for s, p in enumerate(r[f"{check}_probs"]))
            assert r[f"{check}_expected"] == pytest.approx(expected, abs=1e-4)
    assert {r["quality_prompt"] for r in rows} == {"chart", "programming", "disciplinary"}
    assert engine.requests >= 2 * samples.num_rows  # plus the follow-ups
    assert engine.cache_hit_rate > 0.5
    cached = sum(pq.read_table(cache_path(run, s)).num_rows for s in run.shards("samples"))
    assert cached == 2 * samples.num_rows  # raw results kept for re-deciding


def test_requests_are_ordered_by_prompt_and_share_its_prefix(small_run, scorer):
    run = RunFolder(small_run)
    samples = run.read("samples").to_pylist()
    jobs = scorer.jobs(samples, lambda s: True)
    scorer.render(jobs)
    names = [j.prompt_name for j in jobs]
    groups = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    assert len(groups) == len(set(names)) == 4  # three domains + repetition, each contiguous
    before = scorer.stats.cached_tokens
    outs = scorer.engine.run([_req(j) for j in jobs if j.prompt_name == "chart"][:8])
    rubric = len(scorer.tokenizer(scorer.library.get("chart").rubric).input_ids)
    assert all(o.cached_tokens >= rubric // 2 for o in outs[1:])  # whole blocks of the rubric
    assert scorer.stats.cached_tokens > before


def _req(job):
    from curate.stages.score.engines import EngineRequest

    return EngineRequest(job.text, job.ids)


def test_label_probabilities_equal_a_transformers_forward_pass(small_run, scorer, judge):
    import torch
    from transformers import AutoModelForCausalLM

    samples = RunFolder(small_run).read("samples").to_pylist()[:3]
    jobs = scorer.jobs(samples, lambda s: False)
    results = scorer.score(jobs)  # renders them
    model = AutoModelForCausalLM.from_pretrained(judge, dtype=torch.float32).eval()
    labels = scorer.labels
    one = next(iter(labels.next))  # the ambiguous first token ("1")
    for job in jobs:
        with torch.no_grad():
            first = model(torch.tensor([job.ids])).logits[0, -1]
            after_one = model(torch.tensor([[*job.ids, one]])).logits[0, -1]
        p_first = torch.softmax(first[sorted(labels.first)], 0)
        p_first = dict(zip(sorted(labels.first), p_first.tolist(), strict=True))
        cont = sorted(labels.next[one])
        p_cont = dict(zip(cont, torch.softmax(after_one[cont], 0).tolist(), strict=True))
        ref = [0.0] * 11
        for tid, p in p_first.items():
            if tid == one:
                for cid, q in p_cont.items():
                    ref[int(labels.next[one][cid])] += p * q
            else:
                ref[int(labels.first[tid])] += p
        got = results[job.key].reading
        assert got.probs == pytest.approx(ref, abs=2e-4)
        # The stored score is the most probable label, not the constrained greedy choice
        # (best first token, then its best continuation); equal up to the engine's rounding.
        assert ref[got.score] >= max(ref) - 5e-4


def test_probe_and_constrained_readouts_give_the_same_probabilities(small_run, scorer):
    """The default probe (one request per sample) and the constrained choice with follow-ups
    read the same 11 probabilities; the probe sends exactly one request per sample."""
    samples = RunFolder(small_run).read("samples").to_pylist()[:6]
    jobs = scorer.jobs(samples, lambda s: False)
    engine = scorer._engine()
    assert engine.probing
    before = Delta(scorer.stats)
    probed = scorer.score(jobs)
    assert before.requests == len(jobs)
    engine.probing, engine._params = False, {}
    try:
        constrained = scorer.score(jobs)
    finally:
        engine.probing, engine._params = True, {}
    assert before.requests > 2 * len(jobs)  # the choice's outputs needed follow-ups
    for job in jobs:
        a, b = probed[job.key].reading, constrained[job.key].reading
        assert a.probs == pytest.approx(b.probs, abs=2e-4)
        assert a.expected == pytest.approx(b.expected, abs=2e-3)


def test_the_probe_decodes_as_many_steps_as_a_choice_constrained_label(small_run, scorer):
    """Why the probe costs the baseline's forward work: a label decoded under a choice
    constraint (bench/score.py's baseline) ends by sampling EOS, so every label takes two
    decode steps, as the probe always does. Should vLLM end a finished grammar without that
    step, the baseline gets a step cheaper than the probe and README's claim must change."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    samples = RunFolder(small_run).read("samples").to_pylist()[:8]
    jobs = scorer.jobs(samples, lambda s: False)
    before = scorer.stats.output_tokens
    scorer.score(jobs)  # renders them
    assert scorer.stats.output_tokens - before == 2 * len(jobs)
    choice = StructuredOutputsParams(choice=[str(s) for s in range(11)])
    params = SamplingParams(max_tokens=2, temperature=0.0, structured_outputs=choice)
    outs = scorer.engine.llm.generate(
        [{"prompt_token_ids": j.ids} for j in jobs], params, use_tqdm=False
    )
    for out in outs:
        comp = out.outputs[0]
        assert comp.text in LABELS
        assert len(comp.token_ids) == 2  # "7" + EOS, or "1" "0"


def test_thresholds_reach_the_ledger(scored, scorer, tmp_path):
    run = _copy(scored[0].path, tmp_path)
    cfg = score_config(
        quality_thresholds={"chart": 11}, repetition_thresholds={"code_text": 11}, **SCOPE
    )
    engine = Delta(scorer.stats)
    summary, _ = score(run, cfg, scorer)
    # New thresholds: every shard is decided again, from the memo's raw scores.
    assert summary.shards_skipped == 0 and sorted(summary.redone) == run.shards("samples")
    assert engine.requests == 0
    scores = run.read("scores").to_pylist()
    ledger = run.ledger("score").to_pylist()
    chart = [r for r in scores if r["domain"] == "chart"]
    code = [r for r in scores if r["dataset"] == "code_text"]
    assert chart and all(r["decision"] == "reject" for r in chart)
    assert code and all(r["decision"] == "review" for r in code)
    assert summary.rows_rejected == len(chart) and summary.rows_flagged == len(code)
    assert summary.rows_in == summary.rows_kept + summary.rows_rejected
    q = [e for e in ledger if e["rule"] == "quality_below_threshold"]
    assert {e["sample_id"] for e in q} == {r["sample_id"] for r in chart}
    assert all(e["severity"] == "reject" and e["threshold"] == 11 for e in q)
    assert "domain=chart, prompt=chart, score=" in q[0]["detail"]
    rep = [e for e in ledger if e["rule"] == "repetition_below_threshold"]
    assert {e["sample_id"] for e in rep} == {r["sample_id"] for r in code}
    assert all(e["severity"] == "flag" for e in rep)
    # Re-running skips every finished shard.
    again, _ = score(run, cfg, scorer)
    assert again.redone == [] and again.shards_skipped == again.shards == 3
    assert engine.requests == 0
    assert (again.rows_rejected, again.rows_flagged) == (len(chart), len(code))


def test_filter_rejects_are_skipped_and_only_suspects_get_the_repetition_check(
    small_run, scorer, tmp_path
):
    run = _copy(small_run, tmp_path)
    planted_filter(run.path, reject=lambda i: i % 5 == 0, suspect=lambda i: i % 3 == 0)
    summary, _ = score(run, score_config(), scorer)
    for shard in run.shards("samples"):
        ids = run.read("samples", [shard])["sample_id"].to_pylist()
        rows = {r["sample_id"]: r for r in run.read("scores", [shard]).to_pylist()}
        assert set(rows) == {s for i, s in enumerate(ids) if i % 5}
        for i, sid in enumerate(ids):
            if i % 5:
                assert rows[sid]["repetition_checked"] == (i % 3 == 0)
                assert (rows[sid]["repetition_score"] is None) == (i % 3 != 0)
    assert summary.rows_in == run.read("scores").num_rows
    # The filter's rejections are its own: score neither counts nor ledgers them.
    rejected = {e["sample_id"] for e in run.ledger("filter").to_pylist()}
    assert rejected and not rejected & {e["sample_id"] for e in run.ledger(STAGE).to_pylist()}
    assert summary.rows_in + len(rejected) == run.read("samples").num_rows


class Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_output(small_run, scorer, scored, tmp_path):
    reference, _, _ = scored
    run = _copy(small_run, tmp_path)
    cfg = score_config(batch_size=32, **SCOPE)
    chunks = {"n": 0}

    def stop_after_three(jobs, stats):
        chunks["n"] += 1
        if chunks["n"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        score(run, cfg, scorer, on_chunk=stop_after_three)
    done_shards = [s for s in run.shards("samples") if run.marker_path(STAGE, s).exists()]
    partial = [
        s for s in run.shards("samples") if cache_path(run, s).exists() and s not in done_shards
    ]
    assert len(partial) == 1
    saved = pq.read_table(cache_path(run, partial[0])).num_rows
    assert saved > 0

    total = sum(2 * run.read("samples", [s]).num_rows for s in run.shards("samples"))
    already = saved + sum(2 * run.read("samples", [s]).num_rows for s in done_shards)
    seen = {"main": 0}

    def count(jobs, stats):
        seen["main"] += len(jobs)

    summary, _ = score(run, cfg, scorer, on_chunk=count)
    assert seen["main"] == total - already  # only the missing requests were scored
    assert sorted(summary.redone) == sorted(set(run.shards("samples")) - set(done_shards))
    got, want = run.read("scores"), reference.read("scores")
    assert got.column_names == want.column_names
    for name in got.column_names:
        a, b = got[name].to_pylist(), want[name].to_pylist()
        if name.endswith(("_probs", "_expected")):
            assert _close(a, b, 1e-5), name
        else:
            assert a == b, name
    assert run.ledger("score").to_pylist() == reference.ledger("score").to_pylist()


def _close(a, b, tol) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    return abs(a - b) <= tol


def _one_shard(src, tmp_path, keep="chart_qa-00000"):
    """A copy of ``src`` whose score stage sees one shard (the others' samples are gone)."""
    run = _copy(src, tmp_path)
    for shard in run.shards("samples"):
        if shard != keep:
            run.shard_path("samples", shard).unlink()
    return run


def test_server_agrees_with_the_offline_engine(small_run, scored, judge, judge_server, tmp_path):
    reference, _, _ = scored
    run = _one_shard(small_run, tmp_path)
    cfg = score_config(engine="openai", server_url=judge_server, concurrency=8, **SCOPE)
    summary, stage = score(run, cfg, judge=judge)  # its own scorer: the server's client
    client = stage.scorer
    stage.close()  # as a pipeline does
    assert stage.scorer is None and client.engine is None
    got = run.read("scores").to_pylist()
    want = reference.read("scores", ["chart_qa-00000"]).to_pylist()
    assert [r["sample_id"] for r in got] == [r["sample_id"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert g["quality_score"] == w["quality_score"]
        assert g["repetition_score"] == w["repetition_score"]
        assert g["quality_probs"] == pytest.approx(w["quality_probs"], abs=1e-4)
        assert g["repetition_probs"] == pytest.approx(w["repetition_probs"], abs=1e-4)
    assert summary.redone == ["chart_qa-00000"] and summary.rows_in == len(got)
    stats = client.stats  # kept after the engine closed
    assert stats.requests > 2 * len(got)  # the follow-ups went through the server too
    assert stats.cache_hit_rate is not None and stats.cache_hit_rate > 0.3


def test_cli_scores_through_the_server(demo_dir, judge, judge_server, tmp_path):
    """`curate score` with the judge behind a server, on a run ingested and filtered by
    `curate run` (one dataset: a meta JSON of the demo's code_text alone)."""
    import json

    from typer.testing import CliRunner

    from curate.cli.main import app

    meta = json.loads((demo_dir / "meta.json").read_text())["code_text"]
    for key in ("root", "annotation"):
        meta[key] = str(demo_dir / meta[key])
    meta_path = tmp_path / "meta.json"
    meta_path.write_text(json.dumps({"code_text": meta}))
    run = RunFolder(tmp_path / "run")
    pipeline = tmp_path / "pipeline.yaml"  # JSON is YAML
    pipeline.write_text(
        json.dumps(
            {
                "run": str(run.path),
                "meta": str(meta_path),
                "stages": {"ingest": {"shard_lines": 40}, "filter": {}},
            }
        )
    )
    score_sets = [
        "engine=openai",
        f"server_url={judge_server}",
        "max_model_len=2048",
        "batch_size=64",
        "repetition_scope=all",
    ]
    commands = [
        ["run", str(pipeline)],
        # No --config: the pipeline the run last ran with, plus a score section.
        ["score", "--run", str(run.path), "--judge", str(judge)]
        + [arg for kv in score_sets for arg in ("--set", kv)],
    ]
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)
    assert "score redone 1 of 1 shards" in result.output
    assert "quality scores per domain" in result.output
    ledger = run.ledger("filter").to_pylist()
    filtered = {e["sample_id"] for e in ledger if e["severity"] == "reject"}
    scores = run.read("scores").to_pylist()
    assert len(scores) + len(filtered) == run.read("samples").num_rows
    assert all(r["quality_score"] in range(11) and r["repetition_checked"] for r in scores)
    assert run.info()["pipeline"]["stages"]["score"]["engine"] == "openai"


def test_closing_the_engine_gives_torch_its_threads_back(scorer):
    """vLLM's CPU worker turns torch.set_num_threads into a no-op for the whole process; a
    DataLoader worker forked after that hangs. (Runs last: it closes the shared engine.)"""
    import torch

    original, threads = scorer.engine._torch_threads
    assert torch.set_num_threads is not original  # patched while the engine lives
    scorer.close()
    assert torch.set_num_threads is original and torch.get_num_threads() == threads
    from torch.utils.data import DataLoader

    batches = DataLoader(list(range(4)), batch_size=2, num_workers=2, timeout=60)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3]]
