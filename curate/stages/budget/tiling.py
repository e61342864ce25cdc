"""InternVL's dynamic high-resolution tiling, exactly.

The grid rule (``find_closest_aspect_ratio`` / ``dynamic_preprocess`` in InternVL's
``internvl/train/dataset.py``): candidate grids are all (cols, rows) with
``min_tiles <= cols*rows <= max_tiles``, ordered by tile count; the chosen grid is the one
whose cols/rows is closest to width/height; on an exact tie a later (larger) grid wins only if
the image area exceeds half the grid's pixel area. A thumbnail (the whole image at
image_size²) follows the tiles when the grid has more than one tile.

The candidate list is built the way InternVL builds it (a set of tuples sorted by tile count),
so even ties between grids of equal tile count resolve in the same order.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image

IMAGE_SIZE = 448
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5  # pixel unshuffle: 2x2 patches -> 1 token


def tokens_per_tile(
    image_size: int = IMAGE_SIZE,
    patch_size: int = PATCH_SIZE,
    downsample_ratio: float = DOWNSAMPLE_RATIO,
) -> int:
    """Visual tokens one tile costs: (448/14)² · 0.5² = 256 for InternVL 2.5."""
    return int((image_size // patch_size) ** 2 * downsample_ratio**2)


@lru_cache(maxsize=256)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, in InternVL's order."""
    ratios = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return tuple(sorted(ratios, key=lambda r: r[0] * r[1]))


def select_grid(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = IMAGE_SIZE,
) -> tuple[int, int]:
    """The (cols, rows) tile grid InternVL resizes a width x height image to."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def has_thumbnail(cols: int, rows: int, use_thumbnail: bool = True) -> bool:
    return use_thumbnail and cols * rows != 1


def count_tiles(
    width: int,
    height: int,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> int:
    """Tiles of one image: the grid's cols·rows, plus the thumbnail when there is one."""
    cols, rows = select_grid(
        width, height, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size
    )
    return cols * rows + int(has_thumbnail(cols, rows, use_thumbnail))


def multi_image_max_tiles(max_tiles: int, n_images: int) -> int:
    """Per-image tile cap of a multi-image sample: max(1, n_max // N_images)."""
    return max(1, max_tiles // max(1, n_images))


def crop_tiles(
    image: Image.Image,
    cols: int,
    rows: int,
    *,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Resize to the grid, cut row-major tiles, append the thumbnail: InternVL's pixel path."""
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = []
    for i in range(cols * rows):
        left, top = (i % cols) * image_size, (i // cols) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if has_thumbnail(cols, rows, use_thumbnail):
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def dynamic_preprocess(
    image: Image.Image,
    *,
    min_tiles: int = 1,
    max_tiles: int = 12,
    image_size: int = IMAGE_SIZE,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """InternVL's ``dynamic_preprocess``: choose the grid from the decoded image, then tile it."""
    cols, rows = select_grid(
        *image.size, min_tiles=min_tiles, max_tiles=max_tiles, image_size=image_size
    )
    return crop_tiles(image, cols, rows, image_size=image_size, use_thumbnail=use_thumbnail)
