"""The pack stage on the budgeted demo run: coverage, caps, manifest consistency, review,
determinism, over-cap handling, outcome rows, export."""

from __future__ import annotations

import shutil

import numpy as np
import orjson
import polars as pl
import pytest

from curate.core.chat import IGNORE_INDEX, IMG_CONTEXT, IMG_END, IMG_START
from curate.core.folder import RunFolder
from curate.core.io import read_json
from curate.core.stage import ShardInput
from curate.core.status import add_decisions
from curate.stages.budget.stage import load_tokenizer
from curate.stages.pack.config import PackConfig
from curate.stages.pack.export import export_hf, export_internvl
from curate.stages.pack.manifest import tiles_of
from curate.stages.pack.stage import PackStage, truncate_row
from curate.stages.pack.store import TokenStore, resolve_pack
from curate.stages.pack.tokenize import TokenizeStage
from tests.conftest import run_stages

CFG = dict(max_tokens=8192, max_tiles=40, packs_per_shard=7)


def pack(run: RunFolder, cfg: PackConfig, tokenizer, respects=("filter", "score")):
    """Tokenize and pack ``run`` through the engine; returns pack's StageSummary."""
    stages = (TokenizeStage(cfg, tokenizer), PackStage(cfg, tokenizer, respects=respects))
    return run_stages(run, *stages)["pack"]


@pytest.fixture(scope="module")
def packed(budgeted_run, tokenizer_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("pack") / "run"
    shutil.copytree(budgeted_run, run)
    summary = pack(RunFolder(run), PackConfig(**CFG), tokenizer_dir)
    return RunFolder(run), summary.report


def _manifest(run: RunFolder) -> list[dict]:
    return run.read("packs").to_pylist()


def _resolved(run: RunFolder, tokenizer_dir) -> list[dict]:
    """The manifest's packs with their ids, labels and images read back from ``tokens/``, as
    the trainer reads them."""
    context = load_tokenizer(tokenizer_dir).convert_tokens_to_ids(IMG_CONTEXT)
    store = TokenStore(run.path / "tokens")
    out = []
    for p in _manifest(run):
        ids, labels, images = resolve_pack(store, p, context)
        out.append({**p, "input_ids": ids.tolist(), "labels": labels.tolist(), "images": images})
    return out


def _packed_ids(run: RunFolder) -> set[str]:
    return {s for p in _manifest(run) for s in p["sample_ids"]}


def _copies(run: RunFolder) -> dict[str, int]:
    path = run.path / "repeat" / "copies.parquet"
    return dict(pl.read_parquet(path).select("sample_id", "copies").iter_rows())


def test_every_copy_exactly_once_and_caps(packed):
    run, report = packed
    packs = _manifest(run)
    copies = _copies(run)
    seen = pl.Series([s for p in packs for s in p["sample_ids"]]).value_counts()
    unreadable = set(run.ledger("tokenize")["sample_id"].to_pylist())  # the truncated JPEG
    assert len(unreadable) == 1
    expected = {k: v for k, v in copies.items() if v > 0 and k not in unreadable}
    assert dict(seen.iter_rows()) == expected
    assert all(p["n_tokens"] <= 8192 and p["n_tiles"] <= 40 for p in packs)
    assert report["packs"] == len(packs) and len(run.shards("packs")) == -(-len(packs) // 7)
    assert report["ratio_to_lower_bound"] <= 1.1
    zero = sum(1 for v in copies.values() if v == 0)  # math_text has repeat_time 0.5
    assert report["samples_not_drawn"] == zero > 0
    assert report["samples_packed"] == len({s for p in packs for s in p["sample_ids"]})
    # The report is saved with the stage's stats and its marker.
    assert read_json(run.stats_path("pack"))["report"] == report
    assert run.marker("pack", "all")["report"] == report


def test_outcome_rows_say_what_was_packed(packed):
    """pack/all.parquet: one row per kept sample with its copies packed; the engine's counts
    agree with the report."""
    run, report = packed
    outcomes = run.read("pack").to_pylist()
    assert len(outcomes) == len({o["sample_id"] for o in outcomes}) == report["samples_in"]
    seen = pl.Series([s for p in _manifest(run) for s in p["sample_ids"]]).value_counts()
    packed_copies = dict(seen.iter_rows())
    for o in outcomes:
        assert o["copies"] == packed_copies.get(o["sample_id"], 0)
    assert sum(o["copies"] for o in outcomes) == report["copies_packed"]
    assert sum(o["copies"] > 0 for o in outcomes) == report["samples_packed"]
    assert sum(o["copies"] == 0 for o in outcomes) == report["samples_not_drawn"]
    assert not any(o["truncated"] for o in outcomes)
    lines = {s["sample_id"]: s["line"] for s in run.read("samples").to_pylist()}
    assert all(o["line"] == lines[o["sample_id"]] for o in outcomes)
    stats = read_json(run.stats_path("pack"))
    assert stats["kind"] == "global" and stats["rows_in"] == report["samples_in"]
    assert stats["rows_rejected"] == report["samples_rejected"] == 0
    assert stats["rows_kept"] == stats["rows_in"]


def test_lengths_images_and_labels_agree(packed, tokenizer_dir):
    run, _ = packed
    tok = load_tokenizer(tokenizer_dir)
    ctx, start, end = (tok.convert_tokens_to_ids(t) for t in (IMG_CONTEXT, IMG_START, IMG_END))
    for p in _resolved(run, tokenizer_dir):
        ids = np.array(p["input_ids"])
        assert len(ids) == len(p["labels"]) == sum(p["seq_lens"]) == p["n_tokens"]
        cu = np.concatenate([[0], np.cumsum(p["seq_lens"])])
        for k in range(len(p["seq_lens"])):
            seg_ids = ids[cu[k] : cu[k + 1]]
            seg_labels = np.array(p["labels"][cu[k] : cu[k + 1]])
            imgs = [im for im in p["images"] if im["sample_index"] == k]
            assert (seg_ids == ctx).sum() == 256 * sum(tiles_of(im) for im in imgs)
            assert (seg_ids == start).sum() == (seg_ids == end).sum() == len(imgs)
            assert (seg_labels != IGNORE_INDEX).sum() == p["supervised"][k] > 0
            assert not np.isin(seg_labels, [ctx, start, end]).any()  # images are never trained
        assert p["n_tiles"] == sum(tiles_of(im) for im in p["images"])


def test_same_seed_same_manifest(packed, budgeted_run, tokenizer_dir, run_copy):
    run, _ = packed
    again = RunFolder(run_copy(budgeted_run))
    summary = pack(again, PackConfig(**CFG), tokenizer_dir)
    assert summary.redone == ["all"]
    assert again.read("packs").equals(run.read("packs"))
    assert pack(again, PackConfig(**CFG), tokenizer_dir).redone == []  # up to date: skipped
    summary = pack(again, PackConfig(**CFG, seed=1), tokenizer_dir)
    assert summary.redone == ["all"]
    assert not again.read("packs").equals(run.read("packs"))


def test_over_cap_samples_go_to_ledger(budgeted_run, tokenizer_dir, run_copy):
    run = RunFolder(run_copy(budgeted_run))
    summary = pack(run, PackConfig(max_tokens=3000, max_tiles=12), tokenizer_dir)
    report = summary.report
    ledger = run.ledger("pack").to_pylist()
    assert (run.path / "ledger" / "pack" / "all.parquet").exists()
    assert report["samples_rejected"] == len(ledger) > 0
    assert {e["rule"] for e in ledger} == {"over_token_cap", "over_tile_cap"}
    for e in ledger:
        assert e["stage"] == "pack" and e["severity"] == "reject"
        assert e["value"] > e["threshold"] and "caps 3000 tokens, 12 tiles" in e["detail"]
    packed_ids = _packed_ids(run)
    assert not packed_ids & {e["sample_id"] for e in ledger}
    assert report["samples_in"] == (
        report["samples_packed"] + report["samples_not_drawn"] + report["samples_rejected"]
    )
    assert report["samples_packed"] == len(packed_ids)
    lines = {s["sample_id"]: s["line"] for s in run.read("samples").to_pylist()}
    assert all(e["line"] == lines[e["sample_id"]] for e in ledger)
    # The engine counts the rejects as pack's own, by rule; the outcome rows leave them out.
    assert summary.rows_rejected == len(ledger)
    assert summary.rows_kept + summary.rows_rejected == summary.rows_in == report["samples_in"]
    by_rule = {f"reject:{r}": sum(e["rule"] == r for e in ledger) for r in {"over_token_cap"}}
    assert summary.by_rule["reject:over_token_cap"] == by_rule["reject:over_token_cap"]
    assert not {o["sample_id"] for o in run.read("pack").to_pylist()} & {
        e["sample_id"] for e in ledger
    }


def test_status_comes_from_upstream_only(packed, budgeted_run, tokenizer_dir, run_copy):
    """Pack's own over-cap rejects never count against a sample on the next run: at a larger
    cap the first rerun packs them, as a fresh run at that cap does."""
    fresh_run, fresh = packed
    run = RunFolder(run_copy(budgeted_run))
    small = pack(run, PackConfig(**{**CFG, "max_tokens": 2000}), tokenizer_dir).report
    over_cap = {e["sample_id"] for e in run.ledger("pack").to_pylist()}
    assert small["samples_rejected"] == len(over_cap) > 0
    assert not over_cap & _packed_ids(run)
    assert small["samples_in"] == fresh["samples_in"]  # pack's ledger is not its input

    summary = pack(run, PackConfig(**CFG), tokenizer_dir)
    assert summary.redone == ["all"]
    report = summary.report
    assert over_cap <= _packed_ids(run)
    assert report["samples_rejected"] == fresh["samples_rejected"] == 0
    assert run.ledger("pack").num_rows == 0
    assert report["samples_packed"] == fresh["samples_packed"] > small["samples_packed"]
    assert report == fresh
    # The small cap's extra manifest shards went with the swap: the manifest is a fresh run's.
    assert run.read("packs").equals(fresh_run.read("packs"))
    assert run.shards("packs") == fresh_run.shards("packs")
    assert not (run.path / ".staging" / "pack").exists()


def test_truncate_never_cuts_inside_an_image():
    img = [1, 7, 7, 7, 2]  # <img> ctx ctx ctx </img>
    row = {
        "input_ids": [5, 5] + img + [6, 6, 6, 6],
        "labels": [-100] * 7 + [6, 6, 6, 6],
        "images": [{"cols": 1, "rows": 1, "thumbnail": False}],
        "n_tokens": 11,
    }
    assert truncate_row(row, 4, 1, 2) is None  # cut before the image leaves nothing to train
    row2 = {**row, "input_ids": [5, 6] + img + [6], "labels": [-100, 6] + [-100] * 5 + [6]}
    cut = truncate_row(row2, 5, 1, 2)
    assert cut["input_ids"] == [5, 6] and cut["images"] == [] and cut["tiles"] == 0
    assert cut["n_supervised"] == 1


def test_truncate_mode_packs_long_samples(budgeted_run, tokenizer_dir, run_copy):
    run = RunFolder(run_copy(budgeted_run))
    # Text-only answers longer than 200 tokens are cut; image samples whose cut leaves no
    # answer (images come first) are rejected instead.
    report = pack(
        run, PackConfig(max_tokens=200, max_tiles=40, over_cap="truncate"), tokenizer_dir
    ).report
    assert report["samples_truncated"] > 0 and report["samples_rejected"] > 0
    assert all(p["n_tokens"] <= 200 for p in _manifest(run))
    # What the trainer reads back is truncate_row's cut of the full row, sample by sample.
    start, end = (
        load_tokenizer(tokenizer_dir).convert_tokens_to_ids(t) for t in (IMG_START, IMG_END)
    )
    full = _full_rows(run, tokenizer_dir)
    for p in _resolved(run, tokenizer_dir):
        cu = np.concatenate([[0], np.cumsum(p["seq_lens"])])
        for k, sample_id in enumerate(p["sample_ids"]):
            want = full[sample_id]
            if p["seq_lens"][k] < want["n_tokens"]:
                want = truncate_row(want, 200, start, end)
            assert p["input_ids"][cu[k] : cu[k + 1]] == want["input_ids"]
            assert p["labels"][cu[k] : cu[k + 1]] == want["labels"]
            got = [im["path"] for im in p["images"] if im["sample_index"] == k]
            assert got == [im["path"] for im in want["images"]]
    assert "input_ids" not in run.read("packs").column_names  # the manifest holds no ids
    assert all(s > 0 for p in _manifest(run) for s in p["supervised"])
    # Outcome rows mark the truncated samples; they are packed, not in the ledger.
    outcomes = run.read("pack").to_pylist()
    truncated = {o["sample_id"] for o in outcomes if o["truncated"]}
    assert len(truncated) == report["samples_truncated"]
    drawn = {o["sample_id"] for o in outcomes if o["truncated"] and o["copies"] > 0}
    assert drawn and drawn <= _packed_ids(run)
    assert not truncated & {e["sample_id"] for e in run.ledger("pack").to_pylist()}


def _full_rows(run: RunFolder, tokenizer_dir) -> dict[str, dict]:
    """Every sample's training row with its image context runs (not compacted), made afresh."""
    from curate.stages.budget.stage import cached_batch_tokenizer
    from curate.stages.pack.tokenize import tokenize_rows

    samples = run.read("samples").to_pylist()
    budgets = {b["sample_id"]: b for b in run.read("budget").to_pylist()}
    samples = [s for s in samples if s["sample_id"] in budgets]
    augment = {s["dataset"]: False for s in samples}
    rows = tokenize_rows(
        samples,
        budgets,
        cached_batch_tokenizer(str(tokenizer_dir.resolve())),
        augment=augment,
        system_prompt=PackConfig(**CFG).system_prompt,
    )
    return {
        r["sample_id"]: {**r, "input_ids": list(r["input_ids"]), "labels": list(r["labels"])}
        for r in rows
    }


def test_packs_read_back_the_full_tokenisation(packed, tokenizer_dir):
    """Each packed sample's ids and labels, read back from the compact tokens store, are the
    template tokeniser's full output (context runs included), and its images are its own."""
    run, _ = packed
    full = _full_rows(run, tokenizer_dir)
    stored = run.read("tokens", columns=["input_ids", "n_tokens"])
    compact = sum(len(x) for x in stored.column("input_ids").to_pylist())
    assert compact < 0.5 * sum(stored.column("n_tokens").to_pylist())  # the store is compact
    for p in _resolved(run, tokenizer_dir):
        cu = np.concatenate([[0], np.cumsum(p["seq_lens"])])
        for k, sample_id in enumerate(p["sample_ids"]):
            want = full[sample_id]
            assert p["input_ids"][cu[k] : cu[k + 1]] == want["input_ids"]
            assert p["labels"][cu[k] : cu[k + 1]] == want["labels"]
            got = [
                {f: im[f] for f in ("path", "cols", "rows", "thumbnail")}
                for im in p["images"]
                if im["sample_index"] == k
            ]
            assert got == [
                {f: im[f] for f in ("path", "cols", "rows", "thumbnail")} for im in want["images"]
            ]


def test_tokenize_reuses_the_budget_ids_exactly(packed, tokenizer_dir):
    """Tokenize takes the budget's compact ids (made with its tokenizer and system prompt)
    instead of tokenising again: the same rows as tokenising afresh. Under another system
    prompt it tokenises again."""
    run, _ = packed
    cfg = PackConfig(**CFG)
    reuse = TokenizeStage(cfg, tokenizer_dir)
    again = TokenizeStage(cfg, tokenizer_dir, reuse_budget_ids=False)
    other = TokenizeStage(PackConfig(**CFG, system_prompt="Be brief."), tokenizer_dir)
    for stage in (reuse, again, other):
        stage.prepare(run)
    for shard in run.shards("tokens"):
        inp = ShardInput(str(run.path), shard, ())
        budget = inp.table("budget")
        assert reuse._budget_has_ids(budget) and not other._budget_has_ids(budget)
        a, b = reuse.process(inp), again.process(inp)
        assert a.rows.equals(b.rows) and a.ledger.equals(b.ledger)
        c = other.process(inp)
        assert c.rows.column("sample_id").equals(a.rows.column("sample_id"))
        assert not c.rows.column("input_ids").equals(a.rows.column("input_ids"))


def test_review_decisions_change_what_is_packed(budgeted_run, tokenizer_dir, run_copy):
    run = RunFolder(run_copy(budgeted_run))
    samples = run.read("samples").to_pylist()
    victim, restored = samples[0], samples[1]
    # A later stage rejected `restored` and flagged `flagged`; review restores one, drops another.
    from curate.core.io import write_parquet_atomic
    from curate.core.records import LedgerEntry, ledger_table
    from tests.conftest import mark_planted

    flagged = samples[2]
    write_parquet_atomic(
        ledger_table(
            [
                LedgerEntry(
                    restored["sample_id"], restored["dataset"], restored["line"], "filter", "x"
                ),
                LedgerEntry(
                    flagged["sample_id"], flagged["dataset"], flagged["line"], "filter", "y", "flag"
                ),
            ]
        ),
        run.ledger_path("filter", "manual"),
    )
    mark_planted(run, "filter", "manual")
    cfg = PackConfig(max_tokens=8192, max_tiles=40)
    report = pack(run, cfg, tokenizer_dir).report
    ids = _packed_ids(run)
    assert restored["sample_id"] not in ids and flagged["sample_id"] not in ids
    assert victim["sample_id"] in ids
    # + 1: the demo's truncated JPEG, rejected by tokenize (no filter stage decoded it)
    assert report["samples_excluded"] == {
        "reject": 1 + 1,
        "flag": 1,
    }
    add_decisions(
        run,
        [
            {"sample_id": restored["sample_id"], "decision": "keep", "note": "fine"},
            {"sample_id": victim["sample_id"], "decision": "reject", "note": "bad"},
        ],
    )
    assert pack(run, cfg, tokenizer_dir).redone == ["all"]  # a decision is one of pack's inputs
    ids = _packed_ids(run)
    assert restored["sample_id"] in ids and victim["sample_id"] not in ids
    assert flagged["sample_id"] not in ids  # flagged and unreviewed: not packed by default
    add_decisions(run, [{"dataset": flagged["dataset"], "rule": "y", "decision": "keep"}])
    pack(run, cfg, tokenizer_dir)
    assert flagged["sample_id"] in _packed_ids(run)


def test_internvl_algorithm_by_name(budgeted_run, tokenizer_dir, run_copy, packed):
    run = RunFolder(run_copy(budgeted_run))
    report = pack(
        run, PackConfig(max_tokens=8192, max_tiles=40, algorithm="internvl"), tokenizer_dir
    ).report
    assert report["algorithm"] == "internvl" and report["packs"] >= packed[1]["packs"]


def test_export_internvl_round_trip(packed, tmp_path):
    from curate.stages.ingest.config import IngestConfig
    from curate.stages.ingest.stage import IngestStage

    run, report = packed
    meta = export_internvl(run, tmp_path / "export")
    spec = orjson.loads(meta.read_bytes())
    assert spec["doc_ocr"]["repeat_time"] == 2 and spec["chart_qa"]["max_dynamic_patch"] == 6
    again = RunFolder(tmp_path / "again")
    summary = run_stages(again, IngestStage(IngestConfig(), meta))["ingest"]
    # the samples not drawn under math_text's r = 0.5 are not exported (0 copies)
    assert summary.rows_rejected == 0 and summary.rows_in == report["samples_packed"]
    packed_ids = {o["sample_id"] for o in run.read("pack").to_pylist() if o["copies"] > 0}
    before = {
        (s["dataset"], tuple(i["path"] for i in s["images"]))
        for s in run.read("samples").to_pylist()
        if s["sample_id"] in packed_ids
    }
    after = {
        (s["dataset"], tuple(i["path"] for i in s["images"]))
        for s in again.read("samples").to_pylist()
    }
    assert before == after


def test_export_hf(packed, tmp_path):
    import datasets

    run, report = packed
    export_hf(run, tmp_path / "hf", embed_images=False)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert len(ds) == report["samples_in"]  # every kept sample, drawn or not (copies 0)
    assert set(ds.column_names) >= {"sample_id", "conversations", "images", "copies"}
