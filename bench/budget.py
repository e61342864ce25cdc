"""Header-only budgeting vs decoding every image and tiling it as InternVL's dataloader does.

    python bench/budget.py [--images 300] [--repeat 3]

Both sides get the same files (JPEG and PNG photos, documents and charts of realistic sizes)
and must produce the same tile counts; the InternVL side decodes (``convert('RGB')``) and runs
``dynamic_preprocess`` (resize + crops + thumbnail), which is what its dataloader does before
the tensor transform — so the ratio printed is a lower bound of the real difference.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from PIL import Image

from curate.core.images import read_image_size
from curate.demo import images as synth
from curate.stages.budget.tiling import count_tiles, dynamic_preprocess

SIZES = [
    (1024, 768),
    (1280, 720),
    (1920, 1080),
    (600, 900),
    (800, 800),
    (2400, 600),
    (850, 1100),
    (640, 480),
    (1600, 1200),
    (300, 1800),
]


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        path = folder / (f"im{i:05d}.jpg" if i % 3 else f"im{i:05d}.png")
        synth.save(synth.photo(rng, w, h), path)
        paths.append(path)
    return paths


def header_only(paths: list[Path]) -> list[int]:
    return [count_tiles(*read_image_size(str(p))) for p in paths]


def decode_and_tile(paths: list[Path]) -> list[int]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(len(dynamic_preprocess(im.convert("RGB"))))
    return out


def best_of(fn, paths: list[Path], repeat: int) -> tuple[float, list[int]]:
    best, result = float("inf"), []
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(paths)
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images)
        t_header, tiles_a = best_of(header_only, paths, args.repeat)
        t_decode, tiles_b = best_of(decode_and_tile, paths, max(1, args.repeat - 2))
    assert tiles_a == tiles_b, "header-only and decoded tilings disagree"
    n = len(paths)
    print(f"{n} images, {sum(tiles_a)} tiles (identical on both sides)")
    print(f"{'method':<34}{'seconds':>10}{'images/s':>12}")
    print(f"{'curate header-only':<34}{t_header:>10.3f}{n / t_header:>12.0f}")
    print(f"{'decode + dynamic_preprocess':<34}{t_decode:>10.3f}{n / t_decode:>12.1f}")
    print(f"speed-up: {t_decode / t_header:.0f}x")


if __name__ == "__main__":
    main()
