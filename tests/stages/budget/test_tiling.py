"""Tile grids against an independent transcription of InternVL's rule (not the code under test)."""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from curate.stages.budget.tiling import (
    count_tiles,
    crop_tiles,
    dynamic_preprocess,
    multi_image_max_tiles,
    select_grid,
    tokens_per_tile,
)


def reference_grid(width, height, min_num, max_num, image_size):
    """InternVL's dynamic_preprocess + find_closest_aspect_ratio, transcribed from its source."""
    aspect_ratio = width / height
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 (kept as InternVL writes it)
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


SIDES = [1, 7, 64, 200, 224, 300, 447, 448, 449, 500, 640, 672, 896, 1000, 1344, 1920, 4000, 10000]


@pytest.mark.parametrize("max_num", [1, 2, 4, 6, 8, 12, 24, 40])
def test_grid_parity_wide(max_num):
    for w, h in itertools.product(SIDES, SIDES):
        assert select_grid(w, h, max_tiles=max_num) == reference_grid(w, h, 1, max_num, 448), (w, h)


def test_grid_parity_ties_and_min_tiles():
    # Exact ratio ties (aspect 1.25 sits between 2/1 and 1/2 ... and between many grids).
    sizes = [(5 * k, 4 * k) for k in (10, 100, 300, 600)] + [(3 * k, 2 * k) for k in (50, 500)]
    sizes += [(k, k) for k in (100, 448, 700, 2000)] + [(2 * k, k) for k in (100, 300, 900)]
    for (w, h), lo, hi, size in itertools.product(sizes, (1, 2, 3), (6, 12), (224, 448)):
        assert select_grid(w, h, min_tiles=lo, max_tiles=hi, image_size=size) == reference_grid(
            w, h, lo, hi, size
        )


def test_known_cases():
    assert select_grid(640, 500) == (4, 3)  # aspect ratio only: 12 tiles + thumbnail
    assert count_tiles(640, 500) == 13
    assert count_tiles(448, 448) == 1  # a single tile gets no thumbnail
    assert count_tiles(640, 500, use_thumbnail=False) == 12
    assert select_grid(2400, 300, max_tiles=12) == (8, 1)
    assert tokens_per_tile() == 256


def test_multi_image_cap():
    assert multi_image_max_tiles(12, 1) == 12
    assert multi_image_max_tiles(12, 5) == 2
    assert multi_image_max_tiles(12, 13) == 1
    assert multi_image_max_tiles(6, 4) == 1


def test_crop_tiles_row_major_and_thumbnail():
    im = Image.new("RGB", (896, 448))
    im.paste((255, 0, 0), (0, 0, 448, 448))
    im.paste((0, 0, 255), (448, 0, 896, 448))
    tiles = dynamic_preprocess(im, max_tiles=12)
    assert [t.size for t in tiles] == [(448, 448)] * 3  # 2x1 grid + thumbnail
    assert tiles[0].getpixel((10, 10)) == (255, 0, 0)
    assert tiles[1].getpixel((10, 10)) == (0, 0, 255)
    assert len(crop_tiles(im, 3, 2)) == 7
