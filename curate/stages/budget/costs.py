"""Per-sample tile and token costs (pure functions over sample rows)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curate.stages.budget.tiling import has_thumbnail, multi_image_max_tiles, select_grid


@dataclass(frozen=True)
class TilingParams:
    max_tiles: int = 12
    min_tiles: int = 1
    image_size: int = 448
    use_thumbnail: bool = True
    video_frames: int = 8


def frame_indices(n_available: int, n_wanted: int) -> list[int]:
    """Frames picked from a video: the middle of ``n_wanted`` equal intervals (InternVL's
    'middle' sampling), or every frame when there are fewer.

    InternVL's ``get_frame_indices``: interval k covers frames ``[edge_k, edge_{k+1} - 1]``
    (edges ``linspace(0, n_available, n + 1)`` truncated to int) and its middle is
    ``(start + end) // 2`` with that inclusive end.
    """
    n = min(n_available, n_wanted)
    edges = np.linspace(0, n_available, num=n + 1).astype(int)
    return [int((a + b - 1) // 2) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def image_grids(images: list[dict], kind: str, p: TilingParams) -> tuple[list[dict], list[int]]:
    """Grid per image used in training ({cols, rows, thumbnail}) and, for video, frame indices.

    Single image: n_max tiles; multi-image: max(1, n_max // N) each; video frame: one tile.
    """
    if kind == "video":
        picks = frame_indices(len(images), p.video_frames)
        return [{"cols": 1, "rows": 1, "thumbnail": False} for _ in picks], picks
    cap = multi_image_max_tiles(p.max_tiles, len(images)) if len(images) > 1 else p.max_tiles
    grids = []
    for im in images:
        cols, rows = select_grid(
            im["width"],
            im["height"],
            min_tiles=min(p.min_tiles, cap),
            max_tiles=cap,
            image_size=p.image_size,
        )
        grids.append(
            {"cols": cols, "rows": rows, "thumbnail": has_thumbnail(cols, rows, p.use_thumbnail)}
        )
    return grids, []


def grid_tiles(grid: dict) -> int:
    return grid["cols"] * grid["rows"] + int(grid["thumbnail"])
