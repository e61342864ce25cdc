"""Image anomalies: too small, extreme aspect ratio (from the sizes ingest read from headers),
and, by decoding the pixels, unreadable files (a truncated JPEG passes a header read) and
near-uniform (blank) images.

Decoding is the stage's largest cost, so each unique image is decoded once per run, at the
smallest scale the checks need: JPEGs at 1/8 scale straight from their DCT coefficients
(Pillow's ``draft``), other formats reduced by an integer factor (``Image.reduce``, a box
filter) before the grey conversion, the blank test on a 64-pixel thumbnail. What decoding
found is kept in ``RUN/_cache/filter/`` (``PixelCache``), keyed by the image's resolved path,
size and modification time: later shards and reruns (a threshold changed) read it instead of
decoding.

InternVL (and curate's trainer) calls ``convert("RGB")``, which clips 16-bit and float modes
(``I;16``, ``I``, ``F``) to 0..255: a 16-bit grey scan becomes almost all white in training while
its few dark pixels keep the thumbnail's spread above the blank threshold. Such images get their
own measure, the share of pixels the conversion clips, and blankness is measured on the
converted image, as the trainer sees it.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from curate.core.io import write_bytes_atomic, write_parquet_atomic

THUMB_PX = 64


@dataclass(frozen=True, slots=True)
class Pixels:
    """What decoding one image found: readable or why not, and its grey-level spread."""

    readable: bool
    std: float = float("nan")  # standard deviation of the grey levels (0..255) of a thumbnail
    error: str = ""
    mode: str = ""  # Pillow mode of the file, e.g. "I;16"
    clipped: float = 0.0  # share of pixels convert("RGB") clips to 0 or 255 (16-bit, float)


# Modes that the trainer's convert("RGB") already gives the same grey levels as convert("L").
_GREY_SAFE_MODES = {"1", "L", "RGB"}


def inspect_pixels(path: str, thumb_px: int = THUMB_PX) -> Pixels:
    """Decode ``path`` fully (at reduced scale where the format allows) and measure its spread."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.draft("L", (thumb_px, thumb_px))  # JPEG only: DCT scaling, whole file read
                im.load()
                mode = im.mode
                clipped = _clipped_share(im) if clipped_mode(mode) else 0.0
                small = _reduced(im, thumb_px)
                seen = small if mode in _GREY_SAFE_MODES else small.convert("RGB")  # the trainer's
                grey = seen.convert("L")
                grey.thumbnail((thumb_px, thumb_px))
                values = np.asarray(grey, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - any decoder failure means the image is unusable
        return Pixels(False, error=f"{type(e).__name__}: {e}")
    return Pixels(True, float(values.std()) if values.size else 0.0, mode=mode, clipped=clipped)


def _reduced(im: Image.Image, thumb_px: int) -> Image.Image:
    """The image shrunk by the largest integer factor that keeps it >= 2 thumbnails wide (a box
    filter over the decoded pixels: what is converted and thumbnailed next is small)."""
    factor = min(im.size) // (2 * thumb_px)
    if factor < 2 or im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F"):
        return im
    if im.mode == "P":
        im = im.convert("RGB")
    elif im.mode == "1":
        im = im.convert("L")
    return im.reduce(factor)


def _clipped_share(im: Image.Image) -> float:
    values = np.asarray(im)
    return float(((values > 255) | (values < 0)).mean()) if values.size else 0.0


def clipped_mode(mode: str) -> bool:
    """Whether convert("RGB") clips this mode's values at 255 (16-bit and float images)."""
    return mode.startswith("I") or mode == "F"


def image_metrics(
    images: list[list[dict]], decode: bool, pixels: PixelCache | None = None
) -> dict[str, np.ndarray]:
    """Per sample (NaN where it has no image): smallest side, largest aspect ratio, unreadable
    images, the smallest grey-level spread and the largest clipped share among its images."""
    n = len(images)
    out = {
        k: np.full(n, np.nan)
        for k in (
            "min_image_side",
            "max_aspect_ratio",
            "unreadable_images",
            "min_image_std",
            "max_clipped_share",
        )
    }
    pixels = PixelCache() if pixels is None else pixels
    if decode:
        pixels.load([im["path"] for imgs in images for im in imgs])
    for i, imgs in enumerate(images):
        if not imgs:
            continue
        sides = [(im["width"], im["height"]) for im in imgs]
        out["min_image_side"][i] = min(min(w, h) for w, h in sides)
        out["max_aspect_ratio"][i] = max(max(w, h) / max(min(w, h), 1) for w, h in sides)
        if not decode:
            continue
        found = [pixels[im["path"]] for im in imgs]
        out["unreadable_images"][i] = sum(not p.readable for p in found)
        stds = [p.std for p in found if p.readable]
        if stds:
            out["min_image_std"][i] = min(stds)
            out["max_clipped_share"][i] = max(p.clipped for p in found if p.readable)
    return out


# --- decode each image once per run ------------------------------------------------------------

# The folder holds what this version of the measures found; a change of the measures (or of
# THUMB_PX) gets a new folder name, so nothing stale is read.
CACHE_DIR = Path("_cache") / "filter" / f"pixels-v1-{THUMB_PX}px"
CACHE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("readable", pa.bool_()),
        ("std", pa.float64()),
        ("error", pa.string()),
        ("mode", pa.string()),
        ("clipped", pa.float64()),
    ]
)
COMPACT_PARTS = 16  # more part files than this are merged into one before shards run


def image_key(path: str) -> str | None:
    """An image's identity for the cache: resolved path, size and modification time (None if
    it cannot be stat'ed: such a file is decoded, and fails, every time)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except (OSError, ValueError):
        return None
    return f"{real}\x00{st.st_size}\x00{st.st_mtime_ns}"


@dataclass
class DecodeStats:
    """One shard's image lookups: unique images, those found in the run's cache, decoded."""

    images: int = 0
    hits: int = 0
    decoded: int = 0
    decode_s: float = 0.0  # CPU seconds spent decoding


class PixelCache:
    """What decoding found per image path, for one shard: from memory, from the run's cache
    files (``RUN/_cache/filter/``), or by decoding (then written back by ``save``). Without a
    run folder it is a plain in-memory cache."""

    def __init__(self, run_path: str | os.PathLike[str] | None = None, thumb_px: int = THUMB_PX):
        self.folder = Path(run_path) / CACHE_DIR if run_path is not None else None
        self.thumb_px = thumb_px
        self.stats = DecodeStats()
        self._by_path: dict[str, Pixels] = {}
        self._new: dict[str, Pixels] = {}  # by key: decoded here, not yet saved

    def __contains__(self, path: str) -> bool:
        return path in self._by_path

    def __getitem__(self, path: str) -> Pixels:
        return self._by_path[path]

    def load(self, paths: list[str]) -> None:
        """Make every path's measures available (each unique image decoded at most once)."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._by_path]
        if not todo:
            return
        keys = {p: image_key(p) for p in todo}
        stored = self._read({k for k in keys.values() if k})
        self.stats.images += len(todo)
        for p in todo:
            key = keys[p]
            if key in stored:
                self._by_path[p] = stored[key]
                self.stats.hits += 1
                continue
            t0 = time.process_time()
            px = inspect_pixels(p, self.thumb_px)
            self.stats.decode_s += time.process_time() - t0
            self.stats.decoded += 1
            self._by_path[p] = px
            if key:
                self._new[key] = px

    def _read(self, keys: set[str]) -> dict[str, Pixels]:
        files = _cache_files(self.folder)
        if not keys or not files:
            return {}
        table = pads.dataset(files, schema=CACHE_SCHEMA, format="parquet").to_table(
            filter=pc.field("key").isin(pa.array(sorted(keys), pa.string()))
        )
        return {
            r["key"]: Pixels(r["readable"], r["std"], r["error"], r["mode"], r["clipped"])
            for r in table.to_pylist()
        }

    def save(self, shard: str) -> None:
        """Write what this shard decoded (a new part file) and its stats, atomically."""
        if self.folder is None:
            return
        if self._new:
            rows = [{"key": k, **asdict(v)} for k, v in self._new.items()]
            part = self.folder / f"part-{shard}-{uuid.uuid4().hex[:12]}.parquet"
            write_parquet_atomic(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), part)
            self._new = {}
        write_bytes_atomic(
            orjson.dumps(asdict(self.stats)), self.folder / "stats" / f"{shard}.json"
        )


def _cache_files(folder: Path | None) -> list[str]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(str(p) for p in folder.glob("*.parquet") if not p.name.startswith("."))


def compact_cache(run_path: str | os.PathLike[str]) -> None:
    """Merge the cache's part files into one when there are many (call it while no shard runs:
    the engine's prepare step), so a shard opens a few files, not one per earlier shard."""
    folder = Path(run_path) / CACHE_DIR
    files = _cache_files(folder)
    if len(files) <= COMPACT_PARTS:
        return
    table = pads.dataset(files, schema=CACHE_SCHEMA, format="parquet").to_table()
    seen: set[str] = set()
    first = [i for i, k in enumerate(table.column("key").to_pylist()) if not _seen(k, seen)]
    # The merged file is in place before the parts go: a crash in between leaves duplicates,
    # which lookups tolerate, never a missing entry.
    write_parquet_atomic(table.take(first), folder / f"base-{uuid.uuid4().hex[:12]}.parquet")
    for f in files:
        Path(f).unlink(missing_ok=True)


def _seen(key: str, seen: set[str]) -> bool:
    if key in seen:
        return True
    seen.add(key)
    return False


def read_cache_stats(run_path: str | os.PathLike[str]) -> dict:
    """The image decoding of the filter stage, summed over each shard's last run: unique
    images per shard looked up, cache hits, decodes, hit rate, decoded images per CPU second."""
    total = DecodeStats()
    folder = Path(run_path) / CACHE_DIR / "stats"
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if p.name.startswith("."):
            continue
        s = orjson.loads(p.read_bytes())
        total.images += s["images"]
        total.hits += s["hits"]
        total.decoded += s["decoded"]
        total.decode_s += s["decode_s"]
    out = asdict(total)
    out["hit_rate"] = total.hits / total.images if total.images else 0.0
    out["images_per_s"] = total.decoded / total.decode_s if total.decode_s else 0.0
    return out


def unreadable_detail(imgs: list[dict], pixels: PixelCache) -> str:
    bad = [
        f"{im['path']} ({pixels[im['path']].error})"
        for im in imgs
        if im["path"] in pixels and not pixels[im["path"]].readable
    ]
    return "cannot decode " + "; ".join(bad)
