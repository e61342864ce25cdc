"""Ingest: one test per rejection reason, the count invariant, duplicates, shards, Parquet."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.core.folder import RunFolder
from curate.core.records import sample_id
from curate.demo.images import write_png_bomb
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.meta import MetaError, load_meta
from curate.stages.ingest.stage import IngestStage
from tests.conftest import run_stages

OK_TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]


def _line(**kw) -> bytes:
    return orjson.dumps({"conversations": OK_TURNS, **kw})


# One annotation line per reason; the image folder is prepared in ``_dataset``.
CASES = {
    "line_too_long": b'{"x": "' + b"a" * 5000 + b'"}',
    "blank_line": b"   ",
    "invalid_utf8": b'{"conversations": "\xff\xfe"}',
    "malformed_json": b'{"conversations": [',
    "not_an_object": b"[1, 2, 3]",
    "missing_conversations": orjson.dumps({"image": "ok.png"}),
    "malformed_turn": orjson.dumps({"conversations": [{"from": "human"}]}),
    "unknown_role": orjson.dumps({"conversations": [{"from": "robot", "value": "hi"}]}),
    "no_user_turn": orjson.dumps({"conversations": [{"from": "gpt", "value": "hi"}]}),
    "no_assistant_turn": orjson.dumps({"conversations": [{"from": "human", "value": "hi"}]}),
    "malformed_image_field": _line(image=42),
    "malformed_video_field": _line(video=["a"]),
    "image_and_video": _line(image="ok.png", video="clip"),
    "video_placeholder_mismatch": orjson.dumps(
        {
            "video": "clip",
            "conversations": [
                {"from": "human", "value": "<video>\n<video>\nWhat?"},
                {"from": "gpt", "value": "x"},
            ],
        }
    ),
    "image_count_mismatch": _line(image=["ok.png", "ok.png"]),
    "path_outside_root": _line(image="../outside.png"),
    "image_missing": _line(image="nope.png"),
    "symlink_loop": _line(image="loop_a.png"),
    "image_not_a_file": _line(image="adir"),
    "image_unreadable": _line(image="garbage.png"),
    "image_too_large": _line(image="bomb.png"),
    "video_unreadable": orjson.dumps(
        {
            "video": "empty_clip",
            "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}],
        }
    ),
}


def _dataset(tmp_path, lines: list[bytes], fmt: str = "jsonl") -> str:
    root = tmp_path / "root"
    for sub in ("adir", "clip", "empty_clip"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48)).save(root / "ok.png")
    for k in range(3):
        Image.new("RGB", (32, 32)).save(root / "clip" / f"f{k}.jpg")
    (root / "garbage.png").write_bytes(b"not an image at all" * 10)
    write_png_bomb(root / "bomb.png")
    for a, b in (("loop_a.png", "loop_b.png"), ("loop_b.png", "loop_a.png")):
        if not (root / a).is_symlink():
            os.symlink(b, root / a)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    if fmt == "jsonl":
        ann = tmp_path / "ann.jsonl"
        ann.write_bytes(b"\n".join(lines) + b"\n")
    else:
        ann = tmp_path / "ann.parquet"
        pq.write_table(pa.Table.from_pylist([orjson.loads(x) for x in lines]), ann)
    meta = tmp_path / "meta.json"
    meta.write_bytes(
        orjson.dumps({"ds": {"root": "root", "annotation": ann.name, "domain": "ocr"}})
    )
    return str(meta)


def ingest(meta, run: RunFolder, cfg: IngestConfig):
    """Ingest ``meta`` into ``run`` through the engine; returns the stage's summary."""
    return run_stages(run, IngestStage(cfg, meta))["ingest"]


def _run(tmp_path, lines, **cfg):
    run = RunFolder(tmp_path / "run")
    summary = ingest(_dataset(tmp_path, lines), run, IngestConfig(max_line_bytes=4096, **cfg))
    return run, summary


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_rejection_reason(tmp_path, rule):
    run, summary = _run(tmp_path, [_line(image="ok.png"), CASES[rule]])
    ledger = run.ledger("ingest").to_pylist()
    assert [e["rule"] for e in ledger] == [rule]
    assert ledger[0]["line"] == 2 and ledger[0]["severity"] == "reject"
    assert "ann.jsonl:2" in ledger[0]["detail"]
    assert (summary.rows_in, summary.rows_kept, summary.rows_rejected) == (2, 1, 1)


def test_all_problems_of_a_line_are_kept(tmp_path):
    run, _ = _run(
        tmp_path,
        [
            _line(
                image=["nope.png", "../outside.png"],
                conversations=[
                    {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\n"},
                    {"from": "gpt", "value": "x"},
                ],
            )
        ],
    )
    assert sorted(e["rule"] for e in run.ledger().to_pylist()) == [
        "image_missing",
        "path_outside_root",
    ]


def test_duplicates_across_shards_keep_first(tmp_path):
    a, b = _line(image="ok.png", id=1), _line(image="ok.png", id=2)
    run, summary = _run(tmp_path, [a, b, a, b, a], shard_lines=2)
    assert summary.shards == 3 and summary.rows_kept == 2 and summary.rows_rejected == 3
    ledger = run.ledger().to_pylist()
    samples = run.read("samples").to_pylist()
    assert [s["line"] for s in samples] == [1, 2]
    id1, id2 = samples[0]["sample_id"], samples[1]["sample_id"]
    assert (id1, id2) == (sample_id("ds", a), sample_id("ds", b))  # first copies: ids as ever
    assert {(e["line"], e["detail"]) for e in ledger} == {
        (3, f"same content as line 1 (sample {id1})"),
        (4, f"same content as line 2 (sample {id2})"),
        (5, f"same content as line 1 (sample {id1})"),
    }
    # Every line has an id of its own: a decision on a duplicate cannot reach its first copy.
    by_line = {e["line"]: e["sample_id"] for e in ledger}
    assert by_line == {3: sample_id("ds", a, 1), 4: sample_id("ds", b, 1), 5: sample_id("ds", a, 2)}
    assert len({id1, id2, *by_line.values()}) == 5


def test_repeated_blank_lines_get_ids_of_their_own(tmp_path):
    run, _ = _run(tmp_path, [b"", _line(image="ok.png"), b"  ", b""])
    ledger = run.ledger().to_pylist()
    assert [e["rule"] for e in ledger] == ["blank_line"] * 3
    assert len({e["sample_id"] for e in ledger}) == 3


def test_rows_normalised(tmp_path):
    video = orjson.dumps(
        {
            "video": "clip",
            "conversations": [
                {"from": "human", "value": "Describe."},
                {"from": "gpt", "value": "x"},
            ],
        }
    )
    run, _ = _run(
        tmp_path,
        [
            _line(image="ok.png", id=7, width=1),
            orjson.dumps(
                {
                    "conversations": [
                        {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "yo"},
                    ]
                }
            ),
            video,
        ],
    )
    single, text, vid = run.read("samples").to_pylist()
    assert single["kind"] == "image" and single["domain"] == "ocr"
    assert single["images"] == [
        {"path": os.path.realpath(tmp_path / "root/ok.png"), "width": 64, "height": 48}
    ]
    assert orjson.loads(single["extra"]) == {"id": 7, "width": 1}
    assert text["kind"] == "text" and text["images"] == []
    assert vid["kind"] == "video" and len(vid["images"]) == 3
    assert vid["conversations"][0]["text"] == "<video>\nDescribe."  # InternVL inserts it


def test_single_image_without_placeholder_gets_one(tmp_path):
    run, _ = _run(
        tmp_path,
        [
            _line(
                image="ok.png",
                conversations=[{"from": "human", "value": "What?"}, {"from": "gpt", "value": "x"}],
            )
        ],
    )
    assert run.read("samples").to_pylist()[0]["conversations"][0]["text"] == "<image>\nWhat?"


def test_parquet_annotations(tmp_path):
    lines = [_line(image="ok.png", id=i) for i in range(3)] + [_line(image="nope.png")]
    meta = _dataset(tmp_path, lines, fmt="parquet")
    summary = ingest(meta, RunFolder(tmp_path / "run"), IngestConfig())
    assert (summary.rows_in, summary.rows_kept, summary.rows_rejected) == (4, 3, 1)


def test_resume_skips_finished_shards_and_keeps_counts(tmp_path):
    lines = [_line(image="ok.png", id=i) for i in range(10)]
    run, first = _run(tmp_path, lines, shard_lines=3)
    shard = run.shards()[1]
    run.marker_path("ingest", shard).unlink()  # as if the run died before its marker
    run2, second = _run(tmp_path, lines, shard_lines=3)
    assert second.redone == [shard] and second.shards_skipped == first.shards - 1
    assert (second.rows_in, second.rows_kept) == (10, 10)
    assert len(run2.read("samples")) == 10


def test_count_invariant_on_demo(ingested_run):
    run = RunFolder(ingested_run)
    stats = run.stats("ingest")
    assert stats["rows_in"] == stats["rows_kept"] + stats["rows_rejected"]
    rejected_ids = {(e["dataset"], e["line"]) for e in run.ledger("ingest").to_pylist()}
    kept = {(s["dataset"], s["line"]) for s in run.read("samples").to_pylist()}
    assert not rejected_ids & kept
    assert len(rejected_ids) + len(kept) == stats["rows_in"]
    for ds, (n_in, n_kept, n_rej, n_flagged) in stats["by_dataset"].items():
        assert n_in == n_kept + n_rej and n_flagged <= n_kept, ds


def test_meta_errors(tmp_path):
    (tmp_path / "m.json").write_text('{"ds": {"root": ".", "annotation": "missing.jsonl"}}')
    with pytest.raises(MetaError, match="annotation file not found"):
        load_meta(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"ds": {"root": ".", "annotation": "m.json", "bogus": 1}}')
    with pytest.raises(MetaError, match="unknown keys"):
        load_meta(tmp_path / "m.json")
    with pytest.raises(MetaError, match="not found"):
        load_meta(tmp_path / "nope.json")


def test_parallel_workers_give_identical_outputs(demo_dir, tmp_path):
    from curate.core.io import read_json

    outs = []
    for workers in (1, 2):
        run = RunFolder(tmp_path / f"w{workers}")
        ingest(str(demo_dir / "meta.json"), run, IngestConfig(shard_lines=40, workers=workers))
        outs.append(run)
    assert outs[0].read("samples").equals(outs[1].read("samples"))
    assert outs[0].ledger().equals(outs[1].ledger())
    for name in ("rows_in", "rows_kept", "rows_rejected", "by_dataset", "by_rule"):
        assert (
            read_json(outs[0].stats_path("ingest"))[name]
            == read_json(outs[1].stats_path("ingest"))[name]
        )


def test_parquet_shards_read_only_their_row_groups(tmp_path):
    lines = [_line(image="ok.png", id=i) for i in range(23)]
    jsonl_meta = _dataset(tmp_path / "j", lines)
    pq_meta = _dataset(tmp_path / "p", lines, fmt="parquet")
    ann = tmp_path / "p" / "ann.parquet"
    pq.write_table(pq.read_table(ann), ann, row_group_size=4)  # groups straddle the shards
    a, b = RunFolder(tmp_path / "ra"), RunFolder(tmp_path / "rb")
    ingest(jsonl_meta, a, IngestConfig(shard_lines=5))
    ingest(pq_meta, b, IngestConfig(shard_lines=5))
    ids = [orjson.loads(r["extra"])["id"] for r in b.read("samples").to_pylist()]
    assert ids == list(range(23)) and len(b.shards()) == 5
    assert [s["line"] for s in a.read("samples").to_pylist()] == list(range(1, 24))


def test_dataset_names_that_are_not_file_names_keep_their_own_shards(tmp_path):
    """Names whose shard files would collide (``a b`` / ``a_b``) or be hidden (``.x``)."""
    names = ["a_b", "a b", "a/b", ".hidden", "..", "x" * 300]
    meta = {}
    for k, name in enumerate(names):
        ann = tmp_path / f"ann{k}.jsonl"
        lines = [
            orjson.dumps({"conversations": [{"from": "human", "value": f"{k}.{i}"}, OK_TURNS[1]]})
            for i in range(k + 1)
        ]
        ann.write_bytes(b"\n".join(lines) + b"\n")
        meta[name] = {"root": ".", "annotation": ann.name}
    (tmp_path / "meta.json").write_bytes(orjson.dumps(meta))
    run = RunFolder(tmp_path / "run")
    summary = ingest(str(tmp_path / "meta.json"), run, IngestConfig())
    assert summary.by_dataset == {n: [k + 1, k + 1, 0, 0] for k, n in enumerate(names)}
    assert len(run.shards()) == len(names) and run.shards() == sorted(run.markers("ingest"))
    assert not any(s.startswith(".") for s in run.shards())
    assert run.shards()[:1] == ["a_b-00000"]  # a plain name keeps its plain shard names
    assert sorted(run.read("samples")["dataset"].to_pylist()) == sorted(
        n for k, n in enumerate(names) for _ in range(k + 1)
    )


def test_meta_field_types_are_checked_at_load(tmp_path):
    """One schema for the meta JSON: a wrong type is a MetaError naming dataset and field."""
    (tmp_path / "a.jsonl").write_bytes(b"")
    entry = {"root": ".", "annotation": "a.jsonl", "max_dynamic_patch": "6"}
    (tmp_path / "m.json").write_bytes(orjson.dumps({"docs": entry}))
    with pytest.raises(MetaError) as e:
        load_meta(tmp_path / "m.json")
    message = str(e.value)
    assert "'docs'" in message and "max_dynamic_patch" in message and "'6'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_dynamic_patch", "6"),
        ("max_dynamic_patch", 6.5),
        ("max_dynamic_patch", 0),
        ("min_dynamic_patch", "1"),
        ("min_dynamic_patch", True),
        ("repeat_time", "2"),
        ("repeat_time", 0),
        ("repeat_time", -1),
        ("data_augment", "yes"),
        ("length", "10"),
        ("domain", 5),
        ("root", 3),
        ("annotation", None),
    ],
)
def test_each_meta_field_type(tmp_path, field, value):
    (tmp_path / "a.jsonl").write_bytes(b"")
    entry = {"root": ".", "annotation": "a.jsonl", field: value}
    (tmp_path / "m.json").write_bytes(orjson.dumps({"docs": entry}))
    with pytest.raises(MetaError, match=rf"dataset 'docs'.*{field}"):
        load_meta(tmp_path / "m.json")


def test_meta_values_of_the_right_types_load(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")
    entry = {
        "root": ".",
        "annotation": "a.jsonl",
        "data_augment": False,
        "max_dynamic_patch": 6,
        "min_dynamic_patch": 2,
        "repeat_time": 2,
        "length": 0,
        "domain": "ocr",
    }
    (tmp_path / "m.json").write_bytes(orjson.dumps({"docs": entry, "other": 1}))
    with pytest.raises(MetaError, match="dataset 'other'"):
        load_meta(tmp_path / "m.json")
    (tmp_path / "m.json").write_bytes(orjson.dumps({"docs": entry}))
    (spec,) = load_meta(tmp_path / "m.json")
    assert (spec.max_dynamic_patch, spec.min_dynamic_patch, spec.repeat_time) == (6, 2, 2.0)
    entry |= {"min_dynamic_patch": 8}
    (tmp_path / "m.json").write_bytes(orjson.dumps({"docs": entry}))
    with pytest.raises(MetaError, match="min_dynamic_patch 8 .*max_dynamic_patch 6"):
        load_meta(tmp_path / "m.json")


def test_unset_tiling_fields_stay_unset(tmp_path):
    """A meta entry without min/max_dynamic_patch leaves them to the pipeline (None)."""
    (tmp_path / "a.jsonl").write_bytes(b"")
    (tmp_path / "m.json").write_bytes(orjson.dumps({"d": {"root": ".", "annotation": "a.jsonl"}}))
    (spec,) = load_meta(tmp_path / "m.json")
    assert spec.max_dynamic_patch is None and spec.min_dynamic_patch is None


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("shard_lines", [1, 50])
def test_utf8_bom_on_the_first_line_is_accepted(tmp_path, shard_lines):
    first, second = _line(image="ok.png", id=1), _line(image="ok.png", id=2)
    meta = _dataset(tmp_path, [first, second, first])
    ann = tmp_path / "ann.jsonl"
    ann.write_bytes(BOM + ann.read_bytes())
    run = RunFolder(tmp_path / "run")
    summary = ingest(meta, run, IngestConfig(shard_lines=shard_lines))
    assert (summary.rows_in, summary.rows_kept, summary.rows_rejected) == (3, 2, 1)
    samples = run.read("samples").to_pylist()
    assert [orjson.loads(s["extra"])["id"] for s in samples] == [1, 2]
    # The BOM is not part of the line: line 3 is the same line as line 1.
    (dup,) = run.ledger("ingest").to_pylist()
    assert (dup["line"], dup["rule"]) == (3, "duplicate_sample") and "line 1" in dup["detail"]


def test_bom_on_a_later_line_is_still_malformed(tmp_path):
    run, _ = _run(tmp_path, [_line(image="ok.png"), BOM + _line(image="ok.png", id=2)])
    assert [e["rule"] for e in run.ledger("ingest").to_pylist()] == ["malformed_json"]


@pytest.mark.parametrize("empty", ["", []])
def test_empty_image_field_is_text_only(tmp_path, empty):
    """InternVL reads a line whose image is "" (or []) as pure text."""
    text = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    run, summary = _run(tmp_path, [_line(image=empty, conversations=text)])
    assert summary.rows_kept == 1
    (row,) = run.read("samples").to_pylist()
    assert row["kind"] == "text" and row["images"] == [] and row["video"] is None


def test_empty_video_field_is_text_only(tmp_path):
    text = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    run, summary = _run(tmp_path, [_line(video="", conversations=text)])
    (row,) = run.read("samples").to_pylist()
    assert summary.rows_kept == 1 and row["kind"] == "text" and row["video"] is None


def test_empty_image_with_a_placeholder_is_a_count_mismatch(tmp_path):
    run, _ = _run(tmp_path, [_line(image="")])
    assert [e["rule"] for e in run.ledger("ingest").to_pylist()] == ["image_count_mismatch"]


def test_symlink_loop_is_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("d2", root / "d1")
    os.symlink("d1", root / "d2")
    run, _ = _run(tmp_path, [_line(image="loop_a.png"), _line(image="d1/x.png", id=2)])
    first, second = run.ledger("ingest").to_pylist()
    assert first["rule"] == second["rule"] == "symlink_loop"
    assert "loop_a.png -> loop_b.png -> loop_a.png" in first["detail"]
    assert "d1 -> d2 -> d1" in second["detail"]


def test_video_folder_in_a_symlink_loop_is_named(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("v2", root / "v1")
    os.symlink("v1", root / "v2")
    video = {"video": "v1", "conversations": [{"from": "human", "value": "What?"}, OK_TURNS[1]]}
    run, _ = _run(tmp_path, [orjson.dumps(video)])
    (entry,) = run.ledger("ingest").to_pylist()
    assert entry["rule"] == "symlink_loop" and "v1 -> v2 -> v1" in entry["detail"]


def test_a_rejected_line_shows_its_raw_start_escaped_and_cut(tmp_path):
    """A line that never becomes a sample: its first ledger row carries the start of the raw
    line (control bytes and invalid UTF-8 escaped, cut), so the report can show what it held."""
    broken = b'{"id": 7, "conversations": [\x00 "caf\xc3\xa9 \xff' + b"x" * 500
    run, _ = _run(tmp_path, [_line(image="ok.png"), broken, b"   "])
    rows = {e["line"]: e for e in run.ledger("ingest").to_pylist()}
    detail = rows[2]["detail"]
    assert rows[2]["rule"] in ("invalid_utf8", "malformed_json")
    raw = detail.split(" | raw: ", 1)[1]
    assert raw.startswith('{"id": 7, "conversations": [\\x00 "café \\xff')
    assert raw.endswith("…") and len(raw) == 201 and "\x00" not in detail
    assert " | raw: " not in rows[3]["detail"]  # a blank line has nothing to show


def test_an_unchanged_annotation_file_is_not_read_again(tmp_path, monkeypatch):
    """The plan cache: a later command finds the file's size, mtime and inode unchanged and
    does not read it; an edit (even one of the same size) plans it anew."""
    import curate.stages.ingest.stage as ingest_stage

    meta = _dataset(tmp_path, [_line(image="ok.png", id=k) for k in range(5)])
    run = RunFolder(tmp_path / "run")
    first = ingest(meta, run, IngestConfig(shard_lines=2))
    assert first.rows_kept == 5

    def no_reading(*args, **kwargs):
        raise AssertionError("the annotation file was read again")

    monkeypatch.setattr(ingest_stage, "_read_lines", no_reading)
    again = ingest(meta, run, IngestConfig(shard_lines=2))
    assert again.redone == [] and len(list((run.path / "_cache" / "ingest").iterdir())) == 1
    monkeypatch.undo()

    ann = tmp_path / "ann.jsonl"
    before = ann.stat()
    ann.write_bytes(ann.read_bytes().replace(b'"id":4', b'"id":7'))  # same size
    os.utime(ann, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    changed = ingest(meta, run, IngestConfig(shard_lines=2))
    assert changed.redone == ["ds-00002"]
    assert len(list((run.path / "_cache" / "ingest").iterdir())) == 1  # the old entry is gone
    ids = {r["extra"] for r in run.read("samples").to_pylist()}
    assert any('"id":7' in x for x in ids) and not any('"id":4' in x for x in ids)


def test_plan_cache_entries_round_trip_every_task_field(tmp_path):
    """What the cache stores gives back the same tasks (a .json array's byte spans too)."""
    import numpy as np

    from curate.stages.ingest.stage import _tasks_from_bytes, _tasks_to_bytes, plan

    lines = [_line(image="ok.png", id=k % 3) for k in range(7)]
    meta = _dataset(tmp_path, lines)
    arr = tmp_path / "arr.json"
    arr.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]")
    spec = orjson.loads(Path(meta).read_bytes())
    spec["arr"] = {**spec["ds"], "annotation": arr.name}
    Path(meta).write_bytes(orjson.dumps(spec))
    tasks, _ = plan(load_meta(meta), shard_lines=3)
    for task in tasks.values():
        (back,) = _tasks_from_bytes(_tasks_to_bytes([task]), task.spec)
        for name in task.__dataclass_fields__:
            a, b = getattr(task, name), getattr(back, name)
            assert np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b, name
    assert any(t.spans is not None for t in tasks.values())
    assert any(t.duplicates for t in tasks.values())
