"""Synthetic images of many sizes and aspect ratios: charts, documents, photo-like noise,
panoramas, icons, video frames; plus the broken files the pipeline must catch."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def photo(rng: random.Random, width: int, height: int) -> Image.Image:
    """Smooth colour gradients plus noise: compresses like a photo, not like a flat fill."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            128
            + 100
            * np.sin(x / max(width, 1) * nrng.uniform(2, 8) + c)
            * np.cos(y / max(height, 1) * 3)
            for c in range(3)
        ],
        axis=-1,
    )
    noisy = base + nrng.normal(0, 18, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def chart(
    rng: random.Random, labels: list[str], values: list[int], width: int = 640, height: int = 480
) -> Image.Image:
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    top = max(values)
    bar_w = (width - 80) // len(values)
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        x0 = 50 + i * bar_w
        y0 = height - 40 - int((height - 90) * v / top)
        d.rectangle(
            [x0 + 6, y0, x0 + bar_w - 6, height - 40],
            fill=rng.choice(["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee"]),
        )
        d.text((x0 + 8, height - 34), lab, fill="black", font=_font(14))
        d.text((x0 + 8, y0 - 18), str(v), fill="black", font=_font(14))
    d.line([45, 20, 45, height - 40, width - 20, height - 40], fill="black", width=2)
    return im


def document(lines: list[str], width: int = 850, height: int = 1100) -> Image.Image:
    im = Image.new("RGB", (width, height), (250, 248, 240))
    d = ImageDraw.Draw(im)
    for i, line in enumerate(lines):
        d.text((60, 60 + i * 34), line, fill=(20, 20, 20), font=_font(22))
    return im


def icon(rng: random.Random, side: int) -> Image.Image:
    im = Image.new("RGB", (side, side), rng.choice(["white", "black", "navy"]))
    ImageDraw.Draw(im).ellipse([side // 4, side // 4, 3 * side // 4, 3 * side // 4], fill="orange")
    return im


def blank(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (255, 255, 255))


def save(im: Image.Image, path: Path, quality: int = 88) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=quality)
    else:
        im.save(path)


def write_truncated_jpeg(im: Image.Image, path: Path) -> None:
    """A JPEG whose header is intact but whose pixel data stops halfway."""
    save(im, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_garbage(path: Path, rng: random.Random) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(rng.randrange(256) for _ in range(512)))


def write_png_bomb(path: Path, width: int = 60_000, height: int = 60_000) -> None:
    """A tiny PNG whose header declares 3.6 gigapixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\x00" * 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def scene(rng: random.Random, width: int, height: int) -> Image.Image:
    """A gradient with a few solid shapes: structure a perceptual hash can tell apart (the
    noise photos above are all alike at 32×32), for the planted near-duplicate images."""
    nrng = np.random.default_rng(rng.randrange(2**32))
    y, x = np.mgrid[0:height, 0:width]
    c0 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
    c1 = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
    t = x / width * rng.uniform(-1, 1) + y / height * rng.uniform(-1, 1)
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    base = c0 * (1 - t[..., None]) + c1 * t[..., None] + nrng.normal(0, 6, (height, width, 3))
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    for _ in range(rng.randint(3, 7)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = (
            x0 + rng.randint(width // 8, width // 2),
            y0 + rng.randint(height // 8, height // 2),
        )
        fill = tuple(rng.randrange(256) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return im


def resized(im: Image.Image, factor: float) -> Image.Image:
    w, h = im.size
    return im.resize(
        (max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS
    )


def cropped(im: Image.Image, margin: float) -> Image.Image:
    """``im`` less ``margin`` of its width and height on every side."""
    w, h = im.size
    dx, dy = round(w * margin), round(h * margin)
    return im.crop((dx, dy, w - dx, h - dy))


def jpeg_bytes(im: Image.Image, quality: int = 88) -> bytes:
    import io

    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
