"""``.json`` annotation files holding one array of samples (LLaVA-style), read in chunks."""

from __future__ import annotations

import json
import tempfile

import orjson
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from curate.core.folder import RunFolder
from curate.core.records import sample_id
from curate.stages.ingest.config import IngestConfig
from curate.stages.ingest.jsonarray import scan_array
from curate.stages.ingest.meta import MetaError, load_meta
from curate.stages.ingest.stage import IngestStage, plan, process_shard
from tests.conftest import run_stages

TURNS = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]


def _sample(k: int, **kw) -> dict:
    return {"id": k, "image": "ok.png", "conversations": TURNS, **kw}


def _meta(tmp_path, data: bytes) -> str:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    Image.new("RGB", (64, 48)).save(root / "ok.png")
    (tmp_path / "ann.json").write_bytes(data)
    meta = tmp_path / "meta.json"
    meta.write_bytes(orjson.dumps({"ds": {"root": "root", "annotation": "ann.json"}}))
    return str(meta)


def _ingest(tmp_path, data: bytes, **cfg):
    run = RunFolder(tmp_path / "run")
    summary = run_stages(run, IngestStage(IngestConfig(**cfg), _meta(tmp_path, data)))["ingest"]
    return run, summary


def _scan(data: bytes, chunk_bytes: int):
    """scan_array on ``data``; hypothesis tests cannot take pytest's per-test tmp_path."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(data)
        f.flush()
        return scan_array(f.name, b"ds\x00", chunk_bytes)


def _elements(data: bytes, chunk_bytes: int):
    index = _scan(data, chunk_bytes)
    return [data[s:e] for s, e in index.spans.tolist()], index


@pytest.mark.parametrize("indent", [2, None])
def test_array_elements_become_samples(tmp_path, indent):
    """Pretty-printed (LLaVA's own files) and compact: one sample per element, numbered from
    1, ids of the element's bytes; no duplicate or malformed rows."""
    samples = [_sample(k) for k in range(5)]
    data = json.dumps(samples, indent=indent).encode()
    run, summary = _ingest(tmp_path, data)
    assert (summary.rows_in, summary.rows_kept, summary.rows_rejected) == (5, 5, 0)
    rows = run.read("samples").to_pylist()
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert [orjson.loads(r["extra"])["id"] for r in rows] == list(range(5))
    element = json.dumps(samples[2], indent=indent)
    if indent:  # the element as it sits in the array: indented one level more
        element = element.replace("\n", "\n  ")
    assert rows[2]["sample_id"] == sample_id("ds", element.encode())


def test_quotes_brackets_and_backslashes_inside_strings(tmp_path):
    texts = ['a "]" b', "\\", "\\\\", 'x\\"', "[{,}]", "},{", "\\\\\\]"]
    samples = [_sample(k, note=t) for k, t in enumerate(texts)]
    data = json.dumps(samples, indent=1).encode()
    assert b'"a \\"]\\" b"' in data and b'\\\\\\\\"' in data  # the cases named in the issue
    run, summary = _ingest(tmp_path, data)
    assert summary.rows_kept == len(texts) and summary.rows_rejected == 0
    notes = [orjson.loads(r["extra"])["note"] for r in run.read("samples").to_pylist()]
    assert notes == texts


def test_every_chunk_edge_inside_escapes():
    """Backslash runs of every length before quotes and brackets, cut at every byte."""
    doc = [{"k": "\\" * n + tail} for n in range(5) for tail in ('"', "]", "", '",') if n or tail]
    data = json.dumps(doc).encode()
    for chunk_bytes in range(1, 24):
        elements, _ = _elements(data, chunk_bytes)
        assert [json.loads(e) for e in elements] == doc, chunk_bytes


# Strings full of the bytes the scanner looks at, so chunk edges fall between them.
TRICKY = st.text(alphabet=st.sampled_from(list('"\\[]{},: \n\tab') + ["é", "\u2028"]), max_size=10)
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
    max_leaves=10,
)
LAYOUT = st.sampled_from([{}, {"indent": 2}, {"indent": 0}, {"separators": (",", ":")}])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(VALUES, max_size=8), LAYOUT, st.booleans(), st.integers(1, 40))
def test_scanner_agrees_with_json_load(doc, layout, ascii_only, chunk_bytes):
    """Any document, any chunk size (down to one byte: every chunk edge falls inside a string
    or an escape somewhere): the elements are json.load's, and so are their ids."""
    data = json.dumps(doc, ensure_ascii=ascii_only, **layout).encode()
    elements, index = _elements(data, chunk_bytes)
    assert [json.loads(e) for e in elements] == doc and not index.truncated
    assert all(e == e.strip() for e in elements)
    assert index.hashes.tolist() == [xxhash.xxh3_64_intdigest(b"ds\x00" + e) for e in elements]
    assert index.hashes.tolist() == _scan(data, 1 << 20).hashes.tolist()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(VALUES, min_size=1, max_size=6), LAYOUT, st.data())
def test_a_file_cut_anywhere_keeps_its_complete_elements(doc, layout, draw):
    """Truncation never raises: the elements whose comma made it are kept as they were, the
    rest of the file is one last element marked truncated."""
    data = json.dumps(doc, **layout).encode()
    cut = draw.draw(st.integers(1, len(data) - 1))  # inside the array: before its ']'
    elements, index = _elements(data[:cut], draw.draw(st.integers(1, 16)))
    assert index.truncated and elements
    complete = elements[:-1]
    assert [json.loads(e) for e in complete] == doc[: len(complete)]


@pytest.mark.parametrize("data", [b"[]", b"[ \n ]\n", b"\xef\xbb\xbf\n[\n]"])
def test_empty_array(tmp_path, data):
    run, summary = _ingest(tmp_path, data)
    assert (summary.rows_in, summary.shards) == (0, 1) and len(run.ledger()) == 0


@pytest.mark.parametrize("indent", [2, None])
def test_truncated_array_keeps_complete_elements(tmp_path, indent):
    data = json.dumps([_sample(k) for k in range(4)], indent=indent).encode()
    cut = data.rindex(b'"conversations"')  # inside the last element
    run, summary = _ingest(tmp_path, data[:cut])
    assert (summary.rows_in, summary.rows_kept, summary.rows_rejected) == (4, 3, 1)
    (entry,) = run.ledger().to_pylist()
    assert (entry["line"], entry["rule"]) == (4, "malformed_json")
    assert "ann.json element 4" in entry["detail"] and "closing ']'" in entry["detail"]


def test_array_cut_after_a_comma_reports_the_cut(tmp_path):
    data = json.dumps([_sample(1), _sample(2)]).encode()
    run, summary = _ingest(tmp_path, data[: data.index(b'}, {"id"') + 2])
    assert (summary.rows_in, summary.rows_kept) == (2, 1)
    assert [e["rule"] for e in run.ledger().to_pylist()] == ["malformed_json"]


def test_utf8_bom_before_the_array(tmp_path):
    data = b"\xef\xbb\xbf" + json.dumps([_sample(1), _sample(2)], indent=2).encode()
    _, summary = _ingest(tmp_path, data)
    assert (summary.rows_in, summary.rows_kept) == (2, 2)


@pytest.mark.parametrize(
    "data, says",
    [
        (json.dumps({"a": _sample(1), "b": _sample(2)}, indent=2).encode(), "over several"),
        (b'\n{\n  "conversations": []\n}\n', "over several"),
        (b'"just a string"', "starts with '\"'"),
        (b"42\n", "starts with '4'"),
    ],
)
def test_a_json_file_that_is_not_an_array_is_refused(tmp_path, data, says):
    stage = IngestStage(IngestConfig(), _meta(tmp_path, data))
    with pytest.raises(MetaError) as e:
        stage.tasks()
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "ann.json") in message and says in message
    assert "array of samples" in message and "'ds'" in message


def test_more_data_after_the_array_is_refused(tmp_path):
    data = json.dumps([_sample(1)]).encode() + b"\n" + json.dumps([_sample(2)]).encode()
    with pytest.raises(MetaError, match=r"ann.json: the array ends at byte \d+ but more data"):
        IngestStage(IngestConfig(), _meta(tmp_path, data)).tasks()


def test_jsonl_named_json_is_read_as_jsonl(tmp_path):
    """The same lines as JSONL named .json and as a compact array: the same samples, ids and
    line numbers (an element's id is its bytes' hash, as a line's is)."""
    lines = [orjson.dumps(_sample(k)) for k in range(3)] + [b'{"conversations": [']
    as_jsonl = b"\n".join(lines) + b"\n"
    as_array = b"[" + b",\n".join(lines[:3]) + b"]"
    runs = []
    for name, data in (("jsonl", as_jsonl), ("array", as_array)):
        (tmp_path / name).mkdir()
        runs.append(_ingest(tmp_path / name, data))
    (jsonl, summary), (array, _) = runs
    assert (summary.rows_in, summary.rows_kept, summary.rows_rejected) == (4, 3, 1)
    columns = ["sample_id", "line", "conversations", "extra"]  # the image roots differ
    assert jsonl.read("samples").select(columns).equals(array.read("samples").select(columns))
    (entry,) = jsonl.ledger().to_pylist()
    assert entry["rule"] == "malformed_json" and "ann.json:4" in entry["detail"]
    # A first line that is itself broken JSONL is still JSONL, not a refused object.
    (tmp_path / "b").mkdir()
    run, summary = _ingest(tmp_path / "b", b'{"a": [}\n' + lines[0] + b"\n")
    assert (summary.rows_in, summary.rows_kept) == (2, 1)


def test_duplicates_inside_an_array(tmp_path):
    a, b = _sample(1), _sample(2)
    data = json.dumps([a, b, a, b, a], indent=2).encode()
    run, summary = _ingest(tmp_path, data, shard_lines=2)
    assert (summary.rows_kept, summary.rows_rejected) == (2, 3)
    first = {r["line"]: r["sample_id"] for r in run.read("samples").to_pylist()}
    ledger = run.ledger().to_pylist()
    assert [(e["line"], e["rule"]) for e in ledger] == [(n, "duplicate_sample") for n in (3, 4, 5)]
    assert ledger[0]["detail"] == f"same content as element 1 (sample {first[1]})"
    assert ledger[1]["detail"] == f"same content as element 2 (sample {first[2]})"
    assert len({*first.values(), *(e["sample_id"] for e in ledger)}) == 5


def test_empty_elements_are_malformed(tmp_path):
    data = b"[" + orjson.dumps(_sample(1)) + b", ," + orjson.dumps(_sample(2)) + b",]"
    run, summary = _ingest(tmp_path, data)
    assert (summary.rows_in, summary.rows_kept) == (4, 2)
    rules = [(e["line"], e["rule"]) for e in run.ledger().to_pylist()]
    assert rules == [(2, "malformed_json"), (4, "malformed_json")]
    assert len({e["sample_id"] for e in run.ledger().to_pylist()}) == 2


def test_element_too_long_is_not_read(tmp_path):
    big = _sample(2, note="x" * 5000)
    data = json.dumps([_sample(1), big, big]).encode()
    run, _ = _ingest(tmp_path, data, max_line_bytes=4096)
    too_long, dup = run.ledger().to_pylist()
    element = json.dumps(big).encode()
    assert (too_long["rule"], too_long["value"]) == ("line_too_long", len(element))
    assert too_long["sample_id"] == sample_id("ds", element)
    assert dup["rule"] == "duplicate_sample" and dup["sample_id"] == sample_id("ds", element, 1)
    assert dup["detail"] == f"same content as element 2 (sample {too_long['sample_id']})"


@pytest.mark.parametrize("shard_lines", [1, 2, 3])
def test_sharded_equals_unsharded(tmp_path, shard_lines):
    """Shards of 1-3 elements, chunks of 7 bytes: the same rows as one shard, with the
    duplicates across shards and the cut-off last element."""
    samples = [_sample(k % 3, note='a "]" \\') for k in range(7)] + [{"conversations": 1}]
    data = json.dumps(samples, indent=2).encode()
    data = data[: data.rindex(b": 1")]  # the file is cut inside its last element
    meta = _meta(tmp_path, data)
    whole, _ = plan(load_meta(meta), 100)
    cut, _ = plan(load_meta(meta), shard_lines, chunk_bytes=7)
    assert len(cut) == -(-len(samples) // shard_lines)
    out = [process_shard(t, IngestConfig()) for t in whole.values()]
    parts = [process_shard(t, IngestConfig()) for t in cut.values()]
    for name in ("rows", "ledger"):
        rows = [r for p in parts for r in getattr(p, name).to_pylist()]
        assert rows == getattr(out[0], name).to_pylist()
    assert sum(p.rows_in for p in parts) == out[0].rows_in == len(samples)
    rules = [e["rule"] for e in out[0].ledger.to_pylist()]
    assert rules == ["duplicate_sample"] * 4 + ["malformed_json"]


def test_editing_one_element_redoes_one_shard(tmp_path):
    samples = [_sample(k) for k in range(6)]
    run, first = _ingest(tmp_path, json.dumps(samples, indent=2).encode(), shard_lines=2)
    samples[3]["id"] = 33333
    # Element 4 grows: the elements after it move, but their shard is not redone.
    _, second = _ingest(tmp_path, json.dumps(samples, indent=2).encode(), shard_lines=2)
    assert second.redone == [run.shards()[1]] and second.rows_kept == 6
    ids = [orjson.loads(r["extra"])["id"] for r in run.read("samples").to_pylist()]
    assert ids == [0, 1, 2, 33333, 4, 5]
