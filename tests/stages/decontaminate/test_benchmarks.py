"""Benchmarks in every format read to the same items; bad ones stop with one line; the index
matches by 13-gram, by whole short question, and by image distance."""

from __future__ import annotations

import io
import random

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.demo import images as img
from curate.stages.decontaminate.benchmarks import BenchmarkError, load_benchmarks
from curate.stages.decontaminate.config import Benchmark
from curate.stages.decontaminate.index import BenchmarkIndex
from curate.stages.neardup.images import phash_file

Q = "Which of the coloured shapes in this picture lies closest to the upper left corner of it?"


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> bytes:
    return img.jpeg_bytes(img.scene(random.Random(5), 640, 480))


def _parquet(path, picture, image_type=None):
    image_type = image_type or pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "qid": ["a1", "a2"],
            "query": [Q, "Short one?"],
            "image": pa.array([{"bytes": picture, "path": None}, None], image_type),
        }
    )
    pq.write_table(table, path)


def test_internvl_parquet_and_hf_folders_give_the_same_items(tmp_path, picture):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(picture)
    lines = [
        {
            "id": "a1",
            "image": "x.jpg",
            "conversations": [{"from": "human", "value": "<image>\n" + Q}],
        },
        {"id": "a2", "conversations": [{"from": "human", "value": "Short one?"}]},
    ]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(orjson.dumps(x) for x in lines))
    meta = {"bench": {"root": "img", "annotation": "b.jsonl"}}
    (tmp_path / "meta.json").write_bytes(orjson.dumps(meta))
    _parquet(tmp_path / "b.parquet", picture)
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_parquet(str(tmp_path / "b.parquet"))
    hf.save_to_disk(str(tmp_path / "hf"))
    cols = {"question": "query", "id": "qid"}
    found = load_benchmarks(
        [
            Benchmark(name="meta", path=tmp_path / "meta.json"),
            Benchmark(name="jsonl", path=tmp_path / "b.jsonl", root=tmp_path / "img"),
            Benchmark(name="parquet", path=tmp_path / "b.parquet", **cols),
            Benchmark(name="hf", path=tmp_path / "hf", **cols),
        ]
    )
    h = phash_file(io.BytesIO(picture))
    for name in ("meta", "jsonl", "parquet", "hf"):
        rows = [k for k, b in enumerate(found.benchmark) if b == name]
        assert [found.item[k] for k in rows] == ["a1", "a2"], name
        assert found.image_hashes[rows[0]] == [h] and found.image_hashes[rows[1]] == [], name
        assert Q in found.questions[rows[0]][0], name


def test_bad_benchmarks_stop_with_one_line(tmp_path, picture):
    with pytest.raises(BenchmarkError, match="benchmark 'gone': no file or folder"):
        load_benchmarks([Benchmark(name="gone", path=tmp_path / "nope.parquet")])
    _parquet(tmp_path / "b.parquet", picture)
    with pytest.raises(BenchmarkError, match=r"no column\(s\) \['question'\]; columns: \['qid'"):
        load_benchmarks([Benchmark(name="cols", path=tmp_path / "b.parquet", id="qid")])


def test_index_matches_13_grams_whole_short_questions_and_images(tmp_path, picture):
    _parquet(tmp_path / "b.parquet", picture)
    found = load_benchmarks(
        [Benchmark(name="b", path=tmp_path / "b.parquet", question="query", id="qid")]
    )
    index = BenchmarkIndex.build(found, ngram=13, min_words=2, image_distance=4)
    words = Q.split()
    assert index.text_match(["Please: " + " ".join(words[2:15]) + " thanks"])[0] == 0
    assert index.text_match([" ".join(words[:12])]) is None  # 12 words < 13
    assert index.text_match(["a SHORT one, right"])[0] == 1  # 2 words >= min_words 2
    strict = BenchmarkIndex.build(found, ngram=13, min_words=3, image_distance=4)
    assert strict.text_match(["a short one"]) is None
    h = phash_file(io.BytesIO(picture))
    pos, items, dist = index.image_matches([h ^ 0b1011, h ^ (2**40 - 1)])
    assert pos.tolist() == [0] and items.tolist() == [0] and dist.tolist() == [3]
