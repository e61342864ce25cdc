"""Each unique image is decoded once per run: later shards and reruns read what decoding found
from the run's cache; a changed file is decoded again; the stats say how much was decoded."""

from __future__ import annotations

from pathlib import Path

from curate.core.folder import RunFolder
from curate.stages.filters.config import FilterConfig
from curate.stages.filters.images import (
    CACHE_DIR,
    COMPACT_PARTS,
    PixelCache,
    compact_cache,
    read_cache_stats,
)
from tests.stages.filters.helpers import image, make_run, run_filter, sample


def _run_sharing_images(tmp: Path) -> tuple[RunFolder, list[dict]]:
    """Three shards of four samples; every shard uses the same three images."""
    images = [image(tmp / "img" / f"{i}.png", 64, 48, seed=i) for i in range(3)]
    rows = [
        sample(f"Picture number {k}.", images=[images[k % 3]], line=k + 1, sid=f"s{k}")
        for k in range(12)
    ]
    return make_run(tmp / "run", rows, shard_size=4), images


def test_images_decoded_once_across_shards_and_reruns(tmp_path):
    run, images = _run_sharing_images(tmp_path)
    run_filter(run, FilterConfig(workers=1))
    first = read_cache_stats(run.path)
    assert (first["images"], first["decoded"], first["hits"]) == (9, 3, 6)
    assert first["images_per_s"] > 0

    # A threshold changes: every shard runs again, nothing is decoded.
    run_filter(run, FilterConfig(workers=1, rules={"image_blank": {"threshold": 3.0}}))
    again = read_cache_stats(run.path)
    assert (again["decoded"], again["hits"], again["hit_rate"]) == (0, 9, 1.0)

    # One image is replaced by a blank one (other size, other mtime): it alone is decoded
    # again, and the samples using it are now flagged.
    image(Path(images[0]["path"]), 64, 48, blank=True)
    summary = run_filter(run, FilterConfig(workers=1, rules={"image_blank": {"threshold": 2.5}}))
    changed = read_cache_stats(run.path)
    assert (changed["decoded"], changed["hits"]) == (1, 8)
    assert summary.by_rule == {"flag:image_blank": 4}


def test_cache_parts_are_compacted(tmp_path):
    paths = [image(tmp_path / f"{i}.png", 40, 40, seed=i)["path"] for i in range(COMPACT_PARTS + 2)]
    for i, path in enumerate(paths):  # one part file per shard
        cache = PixelCache(tmp_path)
        cache.load([path])
        cache.save(f"shard-{i}")
    folder = tmp_path / CACHE_DIR
    assert len(list(folder.glob("*.parquet"))) == len(paths)
    compact_cache(tmp_path)
    assert len(list(folder.glob("*.parquet"))) == 1
    cache = PixelCache(tmp_path)
    cache.load(paths)
    assert (cache.stats.hits, cache.stats.decoded) == (len(paths), 0)


def test_without_a_run_folder_nothing_is_written(tmp_path):
    path = image(tmp_path / "a.png", 40, 40)["path"]
    cache = PixelCache()
    cache.load([path, path])
    cache.save("s")
    assert cache[path].readable and cache.stats.decoded == 1
    assert not (tmp_path / "_cache").exists()
