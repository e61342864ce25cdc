"""Image anomalies: too small, extreme aspect ratio (from the sizes ingest read from headers),
and, by decoding the pixels, unreadable files (a truncated JPEG passes a header read) and
near-uniform (blank) images.

Decoding is cheap here: JPEGs are decoded at 1/8 scale straight from their DCT coefficients
(Pillow's ``draft``), and the blank test looks at a 64-pixel thumbnail.

InternVL (and curate's trainer) calls ``convert("RGB")``, which clips 16-bit and float modes
(``I;16``, ``I``, ``F``) to 0..255: a 16-bit grey scan becomes almost all white in training while
its few dark pixels keep the thumbnail's spread above the blank threshold. Such images get their
own measure, the share of pixels the conversion clips, and blankness is measured on the
converted image, as the trainer sees it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

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
                seen = im if mode in _GREY_SAFE_MODES else im.convert("RGB")  # the trainer's view
                grey = seen.convert("L")
                grey.thumbnail((thumb_px, thumb_px))
                values = np.asarray(grey, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - any decoder failure means the image is unusable
        return Pixels(False, error=f"{type(e).__name__}: {e}")
    return Pixels(True, float(values.std()) if values.size else 0.0, mode=mode, clipped=clipped)


def _clipped_share(im: Image.Image) -> float:
    values = np.asarray(im)
    return float(((values > 255) | (values < 0)).mean()) if values.size else 0.0


def clipped_mode(mode: str) -> bool:
    """Whether convert("RGB") clips this mode's values at 255 (16-bit and float images)."""
    return mode.startswith("I") or mode == "F"


def image_metrics(
    images: list[list[dict]],
    decode: bool,
    thumb_px: int = THUMB_PX,
    cache: dict[str, Pixels] | None = None,
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
    cache = {} if cache is None else cache
    for i, imgs in enumerate(images):
        if not imgs:
            continue
        sides = [(im["width"], im["height"]) for im in imgs]
        out["min_image_side"][i] = min(min(w, h) for w, h in sides)
        out["max_aspect_ratio"][i] = max(max(w, h) / max(min(w, h), 1) for w, h in sides)
        if not decode:
            continue
        found = []
        for im in imgs:
            path = im["path"]
            if path not in cache:
                cache[path] = inspect_pixels(path, thumb_px)
            found.append(cache[path])
        out["unreadable_images"][i] = sum(not p.readable for p in found)
        stds = [p.std for p in found if p.readable]
        if stds:
            out["min_image_std"][i] = min(stds)
            out["max_clipped_share"][i] = max(p.clipped for p in found if p.readable)
    return out


def unreadable_detail(imgs: list[dict], cache: dict[str, Pixels]) -> str:
    bad = [
        f"{im['path']} ({cache[im['path']].error})"
        for im in imgs
        if im["path"] in cache and not cache[im["path"]].readable
    ]
    return "cannot decode " + "; ".join(bad)
