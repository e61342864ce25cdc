"""Export the kept samples for users who train elsewhere.

- ``internvl``: a meta JSON + one JSONL per dataset that InternVL's own training scripts read
  unchanged (root, repeat_time, max_dynamic_patch and data_augment carried over);
- ``hf``: a Hugging Face dataset (``save_to_disk``) with images as paths or embedded bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import polars as pl

from curate.core.folder import RunFolder
from curate.core.io import read_json, write_bytes_atomic
from curate.core.status import sample_status


def kept_samples(run: RunFolder, flagged: str = "exclude") -> list[dict]:
    """Sample rows whose status is keep, in dataset and line order."""
    keep = (
        sample_status(run, flagged=flagged).filter(pl.col("status") == "keep").select("sample_id")
    )
    samples = pl.from_arrow(run.read("samples")).join(keep, on="sample_id", how="semi")
    return samples.sort(["dataset", "line"]).to_dicts()


def _repeat_times(run: RunFolder, datasets: dict) -> dict[str, float]:
    table = run.path / "repeat" / "budget_table.json"
    if table.exists():  # the factor budget used (the mixture solver's, when it ran)
        return {r["dataset"]: r["repeat_time"] for r in read_json(table)}
    return {name: d["repeat_time"] for name, d in datasets.items()}


def to_annotation(sample: dict, root: str) -> dict:
    """The sample as an InternVL annotation line, image paths relative to its root again."""
    record = orjson.loads(sample["extra"]) if sample["extra"] else {}
    real_root = os.path.realpath(root)
    if sample["kind"] == "video":
        record["video"] = sample["video"]
    elif sample["images"]:
        paths = [os.path.relpath(im["path"], real_root) for im in sample["images"]]
        record["image"] = paths[0] if sample["kind"] == "image" else paths
        if sample["kind"] == "image":
            record["width"], record["height"] = (
                sample["images"][0]["width"],
                sample["images"][0]["height"],
            )
    record["conversations"] = [
        {"from": t["role"], "value": t["text"]} for t in sample["conversations"]
    ]
    return record


def export_internvl(run: RunFolder, out: str | Path, flagged: str = "exclude") -> Path:
    out = Path(out)
    datasets = run.datasets()
    repeat = _repeat_times(run, datasets)
    by_ds: dict[str, list[bytes]] = {name: [] for name in datasets}
    for s in kept_samples(run, flagged):
        by_ds[s["dataset"]].append(orjson.dumps(to_annotation(s, datasets[s["dataset"]]["root"])))
    meta = {}
    for name, lines in by_ds.items():
        ann = out / "annotations" / f"{name}.jsonl"
        write_bytes_atomic(b"\n".join(lines) + (b"\n" if lines else b""), ann)
        d = datasets[name]
        meta[name] = {
            "root": d["root"],
            "annotation": str(ann.resolve()),
            "data_augment": d["data_augment"],
            "max_dynamic_patch": d["max_dynamic_patch"] or 12,
            "repeat_time": repeat[name],
            "length": len(lines),
        }
    write_bytes_atomic(orjson.dumps(meta, option=orjson.OPT_INDENT_2), out / "meta.json")
    return out / "meta.json"


def export_hf(
    run: RunFolder, out: str | Path, flagged: str = "exclude", embed_images: bool = False
) -> Path:
    import datasets as hf

    copies = pl.read_parquet(run.path / "repeat" / "copies.parquet").select("sample_id", "copies")
    n_copies = dict(copies.iter_rows())
    rows = kept_samples(run, flagged)
    image_feature = hf.Image() if embed_images else hf.Value("string")
    features = hf.Features(
        {
            "sample_id": hf.Value("string"),
            "dataset": hf.Value("string"),
            "domain": hf.Value("string"),
            "kind": hf.Value("string"),
            "conversations": [{"from": hf.Value("string"), "value": hf.Value("string")}],
            "images": [image_feature],
            "copies": hf.Value("int32"),
        }
    )
    data = {
        "sample_id": [r["sample_id"] for r in rows],
        "dataset": [r["dataset"] for r in rows],
        "domain": [r["domain"] for r in rows],
        "kind": [r["kind"] for r in rows],
        "conversations": [
            [{"from": t["role"], "value": t["text"]} for t in r["conversations"]] for r in rows
        ],
        "images": [[im["path"] for im in r["images"]] for r in rows],
        "copies": [n_copies.get(r["sample_id"], 1) for r in rows],
    }
    ds = hf.Dataset.from_dict(data, features=features)
    ds.save_to_disk(str(out))
    return Path(out)
