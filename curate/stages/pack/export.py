"""Export the kept samples for users who train elsewhere.

- ``internvl``: a meta JSON + one JSONL per entry that InternVL's own training scripts read
  unchanged, and that ``curate ingest`` re-ingests into the same samples with the same copies;
- ``hf``: a Hugging Face dataset (``save_to_disk``) with images as paths or embedded bytes.

Copies. The run's repeat stage decided each sample's copies (``repeat/copies.parquet``: InternVL
mode ``int(r)``, or the first ``int(n·r)`` lines of the original file when r < 1; stable mode
floor(r) plus one by a seeded hash). Writing the dataset's factor back would not give those
copies again: r < 1 would subsample the already-subsampled file a second time, a fractional r
> 1 is no valid InternVL factor (its loader asserts an int), and the stable hash depends on
sample ids that change with the file. So the InternVL export bakes the copies in:

- a sample with 0 copies (not drawn under r < 1) is not written;
- a dataset's samples are grouped by their copy count k; the group with the smallest k keeps
  the dataset's name, every other group becomes its own entry ``<name>@x<k>``; each entry's
  ``repeat_time`` is its k, an integer (1 reads every line once, k > 1 repeats them k times
  under both repeat modes);
- every entry keeps the dataset's ``root``, ``domain``, ``data_augment`` and, where the meta
  set them, ``max_dynamic_patch`` and ``min_dynamic_patch`` (unset: the trainer's or the
  pipeline's own value applies, as it did in the run); ``length`` is the entry's line count.

Re-ingest the export without the mixture solver (``target_tokens``): its factors are already in
the copies. A run without a repeat stage exports InternVL's copies of its meta ``repeat_time``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import orjson
import polars as pl
from PIL import Image, UnidentifiedImageError

from curate.core.errors import CurateError
from curate.core.folder import RunFolder
from curate.core.io import write_bytes_atomic
from curate.core.status import sample_status
from curate.stages.budget.repeat import internvl_copies

# Per-dataset fields written when the run's meta set them (None: the trainer's default).
OPTIONAL_TILING = ("max_dynamic_patch", "min_dynamic_patch")
EXIF_ORIENTATION = 0x0112


class ExportError(CurateError):
    """The run cannot be exported as asked."""


def kept_samples(run: RunFolder, flagged: str = "exclude") -> list[dict]:
    """Sample rows whose status is keep, in dataset and line order, each with its ``copies``."""
    keep = (
        sample_status(run, flagged=flagged).filter(pl.col("status") == "keep").select("sample_id")
    )
    samples = pl.from_arrow(run.read("samples")).join(keep, on="sample_id", how="semi")
    samples = samples.sort(["dataset", "line"])
    return samples.with_columns(copies=_copies(run, samples)).to_dicts()


def _copies(run: RunFolder, samples: pl.DataFrame) -> pl.Series:
    """Each sample's copies as the repeat stage decided them, which pack packs (a sample
    missing there counts 1, as in pack); without a repeat stage, InternVL's copies under the
    meta's repeat_time."""
    path = run.path / "repeat" / "copies.parquet"
    if path.exists():
        table = pl.read_parquet(path).select("sample_id", "copies")
        joined = samples.select("sample_id").join(table, on="sample_id", how="left")
        return joined["copies"].fill_null(1).cast(pl.Int32)
    datasets = run.datasets()
    copies = np.zeros(len(samples), dtype=np.int32)
    for (name,), part in samples.with_row_index("row").group_by(["dataset"]):
        d = datasets[name]
        rows = part["row"].to_numpy()
        copies[rows] = internvl_copies(part["line"].to_numpy(), d["lines"], d["repeat_time"])
    return pl.Series("copies", copies)


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


def entry_name(dataset: str, copies: int, smallest: int) -> str:
    """The meta entry of a dataset's samples with ``copies`` copies: the dataset's own name for
    its smallest copy count, ``<dataset>@x<copies>`` for the others."""
    return dataset if copies == smallest else f"{dataset}@x{copies}"


def _groups(samples: Iterable[dict], names: Iterable[str]) -> dict[str, dict[int, list[dict]]]:
    """Per dataset (every one of the run, in meta order), its drawn samples by copy count."""
    groups: dict[str, dict[int, list[dict]]] = {name: {} for name in names}
    for s in samples:
        if s["copies"] >= 1:
            groups[s["dataset"]].setdefault(s["copies"], []).append(s)
    return groups


def _meta_entry(dataset: dict, annotation: Path, copies: int, length: int) -> dict:
    """A meta entry with every field the run knew of the dataset; integral numbers as ints
    (InternVL asserts a repeat_time above 1 is an int)."""
    entry = {
        "root": dataset["root"],
        "annotation": str(annotation.resolve()),
        "data_augment": dataset["data_augment"],
        "repeat_time": int(copies),
        "length": length,
        "domain": dataset["domain"],
    }
    for key in OPTIONAL_TILING:
        if dataset.get(key) is not None:
            entry[key] = int(dataset[key])
    return entry


def export_internvl(run: RunFolder, out: str | Path, flagged: str = "exclude") -> Path:
    """Write ``out/meta.json`` and ``out/annotations/<entry>.jsonl`` (naming: module doc)."""
    out = Path(out)
    datasets = run.datasets()
    meta: dict[str, dict] = {}
    for name, by_copies in _groups(kept_samples(run, flagged), datasets).items():
        smallest = min(by_copies, default=1)  # a dataset with nothing left: an empty entry
        for copies in sorted(by_copies) or [1]:
            entry = entry_name(name, copies, smallest)
            if entry in meta or (entry != name and entry in datasets):
                raise ExportError(
                    f"cannot export dataset {name!r}: its entry name {entry!r} for samples "
                    f"with {copies} copies is already a dataset of the run; rename one"
                )
            root = datasets[name]["root"]
            lines = [orjson.dumps(to_annotation(s, root)) for s in by_copies.get(copies, [])]
            ann = out / "annotations" / f"{entry}.jsonl"
            write_bytes_atomic(b"\n".join(lines) + (b"\n" if lines else b""), ann)
            meta[entry] = _meta_entry(datasets[name], ann, copies, len(lines))
    write_bytes_atomic(orjson.dumps(meta, option=orjson.OPT_INDENT_2), out / "meta.json")
    return out / "meta.json"


# -- hf ----------------------------------------------------------------------------------------
def _jpeg_orientation_offset(data: bytes) -> tuple[int, str] | None:
    """Where the EXIF orientation value of a JPEG lies, and the EXIF byte order; None if the
    first Exif segment before the pixels has none."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after this
            return None
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body, end = pos + 4, pos + 2 + length
        if marker == 0xE1 and data[body : body + 6] == b"Exif\x00\x00":
            return _tiff_orientation_offset(data, body + 6, min(end, len(data)))  # Pillow reads
        pos = end  # the first Exif segment only, as Pillow does
    return None


def _tiff_orientation_offset(data: bytes, tiff: int, end: int) -> tuple[int, str] | None:
    order = {b"II": "little", b"MM": "big"}.get(data[tiff : tiff + 2])
    if order is None:
        return None

    def uint(at: int, size: int) -> int | None:
        return int.from_bytes(data[at : at + size], order) if at + size <= end else None

    ifd = uint(tiff + 4, 4)
    count = uint(tiff + ifd, 2) if ifd is not None else None
    for i in range(count or 0):
        entry = tiff + ifd + 2 + 12 * i
        if uint(entry, 2) == EXIF_ORIENTATION:
            short, one = uint(entry + 2, 2) == 3, uint(entry + 4, 4) == 1
            return (entry + 8, order) if short and one and entry + 10 <= end else None
    return None


def _orientation(image: str | io.BytesIO) -> int | None:
    with Image.open(image) as im:  # the header only: no pixel is decoded
        return im.getexif().get(EXIF_ORIENTATION)


def unrotated_image_bytes(path: str) -> bytes | None:
    """Bytes of the image at ``path`` that decode, EXIF applied or not, to the pixels
    InternVL reads (``Image.open(path).convert('RGB')``, orientation ignored); None when the
    file's own bytes already do (no orientation, or orientation 1).

    A JPEG keeps its bytes with the orientation value set to 1 (lossless: the pixel data is
    untouched); any other oriented image is stored as the RGB pixels InternVL sees, as PNG.
    """
    try:
        if _orientation(path) in (None, 1):
            return None
        data = Path(path).read_bytes()
    except (OSError, UnidentifiedImageError) as e:  # changed since ingest read it
        raise ExportError(f"cannot embed image {path}: {type(e).__name__}: {e}") from None
    where = _jpeg_orientation_offset(data) if data[:2] == b"\xff\xd8" else None
    if where is not None:
        offset, order = where
        patched = data[:offset] + (1).to_bytes(2, order) + data[offset + 2 :]
        if _orientation(io.BytesIO(patched)) == 1:
            return patched
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(buf, "PNG")  # no EXIF written: nothing for a reader to apply
    return buf.getvalue()


def _hf_image(path: str) -> dict:
    """An image value for ``datasets.Image``: the path (save_to_disk embeds the file as it is)
    unless its EXIF orientation would turn it on decode; then the unturned bytes, no path
    (a path to an existing file would make datasets embed the file instead)."""
    data = unrotated_image_bytes(path)
    return {"path": path, "bytes": None} if data is None else {"path": None, "bytes": data}


def export_hf(
    run: RunFolder, out: str | Path, flagged: str = "exclude", embed_images: bool = False
) -> Path:
    """Every kept sample as a row with its ``copies`` (0: not drawn under a repeat factor
    below 1) and ``domain``; images as absolute paths, or embedded with ``embed_images``.

    ``datasets`` applies an image's EXIF orientation when it decodes it; InternVL does not, and
    the run budgeted the stored size. Embedded images are therefore stored so that they decode
    to InternVL's pixels at the budgeted size (``unrotated_image_bytes``).
    """
    import datasets as hf

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
    image = _hf_image if embed_images else (lambda path: path)
    data = {
        "sample_id": [r["sample_id"] for r in rows],
        "dataset": [r["dataset"] for r in rows],
        "domain": [r["domain"] for r in rows],
        "kind": [r["kind"] for r in rows],
        "conversations": [
            [{"from": t["role"], "value": t["text"]} for t in r["conversations"]] for r in rows
        ],
        "images": [[image(im["path"]) for im in r["images"]] for r in rows],
        "copies": [r["copies"] for r in rows],
    }
    ds = hf.Dataset.from_dict(data, features=features)
    ds.save_to_disk(str(out))
    return Path(out)
