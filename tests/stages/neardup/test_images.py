"""pHash on Pillow + numpy: imagehash's bits without draft decoding; within the near-duplicate
distance under each planted transform and far apart for different pictures; each file
decoded once."""

from __future__ import annotations

import random

import numpy as np
import pytest

from curate.demo import images as img
from curate.stages.neardup.images import (
    HashCache,
    ImageHashError,
    hamming,
    hash_bands,
    phash_file,
)

DISTANCE = 4  # NearDupConfig's default


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    rng = random.Random(3)
    paths = []
    for k in range(12):
        w, h = rng.choice([(800, 600), (640, 480), (600, 900)])
        path = folder / f"s{k}.jpg"
        img.save(img.scene(rng, w, h), path, quality=92)
        paths.append(path)
    return paths


def test_bits_equal_imagehash_without_draft(scenes):
    imagehash = pytest.importorskip("imagehash")
    from PIL import Image

    for p in scenes:
        theirs = int(str(imagehash.phash(Image.open(p))), 16)
        assert phash_file(str(p), draft=False) == theirs


@pytest.mark.parametrize(
    "transform",
    [
        lambda im, p: img.save(img.resized(im, 0.6), p),
        lambda im, p: img.save(im, p, quality=35),
        lambda im, p: img.save(img.cropped(im, 0.01), p),
    ],
    ids=["resized", "jpeg_q35", "cropped_1pct"],
)
def test_transforms_stay_within_the_distance(scenes, tmp_path, transform):
    from PIL import Image

    for k, p in enumerate(scenes[:8]):
        out = tmp_path / f"t{k}.jpg"
        transform(Image.open(p).convert("RGB"), out)
        assert hamming(phash_file(str(p)), phash_file(str(out))) <= DISTANCE, p.name


def test_different_pictures_are_far_apart(scenes):
    h = np.array([phash_file(str(p)) for p in scenes], dtype=np.uint64)
    d = hamming(h[:, None], h[None, :])
    assert d[np.triu_indices(len(h), 1)].min() > 2 * DISTANCE


def test_pigeonhole_bands_share_one_band_within_the_distance():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 200, dtype=np.uint64)
    for flips in range(DISTANCE + 1):
        other = base.copy()
        for i in range(len(other)):
            for bit in rng.choice(64, flips, replace=False):
                other[i] ^= np.uint64(1) << np.uint64(int(bit))
        a, b = hash_bands(base, DISTANCE + 1), hash_bands(other, DISTANCE + 1)
        assert (a == b).any(axis=1).all()


def test_cache_decodes_each_file_once_and_again_when_it_changes(scenes):
    import os

    cache = HashCache()
    first = cache.hashes([str(scenes[0])] * 50 + [str(scenes[1])])
    assert cache.decoded == 2 and len(set(first)) == 2
    cache.hashes([str(scenes[0])])
    assert cache.decoded == 2
    st = os.stat(scenes[0])
    os.utime(scenes[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    cache.hashes([str(scenes[0])])
    assert cache.decoded == 3


def test_undecodable_file_gets_no_hash(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert HashCache().hashes([str(bad), str(tmp_path / "missing.jpg")]) == [None, None]
    with pytest.raises(ImageHashError):
        phash_file(str(bad))
