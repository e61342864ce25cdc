"""Packs → micro-batches: tiles as the budget counts them, JPEG augmentation, order, checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from curate.core.chat import IGNORE_INDEX
from curate.stages.budget.tiling import count_tiles, dynamic_preprocess, has_thumbnail, select_grid
from curate.stages.train.data import (
    JPEG_QUALITIES,
    PackBatches,
    StepLayout,
    make_loader,
    normalize,
    pack_rng,
    read_packs,
    rebuild_tiles,
    shift_targets,
)
from curate.stages.train.synthetic import image_entry, make_sample, pack_rows, write_packs

KW = dict(image_size=448, tokens_per_tile=256)


def _dataset(table, token_ids, **kw):
    return PackBatches(
        table,
        StepLayout(len(table), **kw.pop("layout", {})),
        end_step=kw.pop("end_step", len(table)),
        image_token_id=token_ids.img_context,
        **KW,
        **kw,
    )


def _demo_images(demo_dir):
    """Photos at every demo size (4:3, 16:9, portrait, panorama, very tall, tiny) + an icon."""
    photos = sorted((demo_dir / "images" / "general_vqa").glob("photo_000*.jpg"))
    return photos + sorted((demo_dir / "images" / "general_vqa").glob("icon_*.png"))[:1]


def test_tiles_match_the_budget(demo_dir, token_ids, tmp_path):
    """Tiles rebuilt from the recorded grid = the budget's count and InternVL's order."""
    paths = _demo_images(demo_dir)
    assert len(paths) >= 8
    entries, expected = [], []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")
        cols, rows = select_grid(*rgb.size, max_tiles=12)
        entry = image_entry(p, cols, rows, thumbnail=has_thumbnail(cols, rows))
        tiles = rebuild_tiles(entry, image_size=448)
        reference = dynamic_preprocess(rgb, max_tiles=12)  # InternVL's pixel path
        assert len(tiles) == count_tiles(*rgb.size, max_tiles=12) == len(reference)
        for a, b in zip(tiles, reference, strict=True):
            assert a.size == (448, 448) and np.array_equal(np.asarray(a), np.asarray(b))
        entries.append(entry)
        expected.extend(reference)
    # Through the dataset: one sample with every image, tiles in token order.
    rng = np.random.default_rng(0)
    sample = make_sample(rng, token_ids, prompt_tokens=5, answer_tokens=3, images=entries)
    write_packs([[sample]], tmp_path / "packs")
    batch = _dataset(read_packs(tmp_path / "packs"), token_ids, augment=False)[0]
    assert batch["n_tiles"] == len(expected) == sample.tiles
    assert torch.equal(batch["pixel_values"], normalize(expected, 448))
    assert int((batch["input_ids"] == token_ids.img_context).sum()) == 256 * len(expected)


def test_normalize_is_imagenet():
    tile = Image.new("RGB", (448, 448), (255, 0, 128))
    x = normalize([tile], 448)
    assert x.shape == (1, 3, 448, 448)
    want = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(want), atol=1e-6)


def test_jpeg_qualities(token_ids, tiny_images, tmp_path):
    rng = np.random.default_rng(1)
    aug = image_entry(tiny_images[0], 2, 1, data_augment=True)  # 2 tiles + thumbnail
    plain = image_entry(tiny_images[1], 1, 2, data_augment=False)
    samples = [
        make_sample(rng, token_ids, prompt_tokens=4, answer_tokens=3, images=[aug, plain, aug])
        for _ in range(2)
    ]
    write_packs([samples[:1], samples[1:]], tmp_path / "packs")
    table = read_packs(tmp_path / "packs")
    ds = _dataset(table, token_ids, end_step=4)  # 2 epochs of 2 packs
    batch = ds[0]
    q = batch["jpeg_quality"].tolist()
    assert len(q) == batch["n_tiles"] == 9
    assert q[3:6] == [-1, -1, -1]  # not augmented
    aug_q = q[:3] + q[6:]  # thumbnails (3rd tile of each image) included
    assert all(JPEG_QUALITIES[0] <= x <= JPEG_QUALITIES[1] for x in aug_q)
    # Tiles really were re-encoded; the plain image's were not.
    clean = _dataset(table, token_ids, augment=False)[0]["pixel_values"]
    assert not torch.equal(batch["pixel_values"][:3], clean[:3])
    assert torch.equal(batch["pixel_values"][3:6], clean[3:6])
    # Deterministic per (seed, pack_id, epoch), not per call.
    assert ds[0]["jpeg_quality"].tolist() == q
    assert ds[2]["jpeg_quality"].tolist() != q or ds[3]["jpeg_quality"].tolist() != q
    # The draw is uniform over 75..100 inclusive.
    draws = np.concatenate([pack_rng(0, i, 0).integers(75, 101, 20) for i in range(200)])
    assert draws.min() == 75 and draws.max() == 100 and len(np.unique(draws)) == 26


def test_loader_same_with_workers(tiny_run, token_ids):
    table = read_packs(tiny_run / "packs")
    ds = _dataset(table, token_ids, layout={"batch_packs": 2})
    ds.end_step = 2
    a = list(make_loader(ds, workers=0, seed=0))
    b = list(make_loader(ds, workers=2, seed=0))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x["pack_ids"] == y["pack_ids"]
        for k in ("input_ids", "targets", "weights", "pixel_values", "jpeg_quality"):
            assert torch.equal(x[k], y[k]), k


def test_positions_restart_and_targets_stay_inside_samples(tiny_run, token_ids):
    table = read_packs(tiny_run / "packs")
    batch = _dataset(table, token_ids, layout={"batch_packs": 4}, end_step=1)[0]
    lens = batch["seq_lens"].tolist()
    assert sum(lens) == batch["n_tokens"] == len(batch["input_ids"])
    starts = np.cumsum([0, *lens[:-1]])
    pos = batch["position_ids"].numpy()
    assert (pos[starts] == 0).all() and pos.max() == max(lens) - 1
    ends = np.cumsum(lens) - 1
    assert (batch["targets"].numpy()[ends] == IGNORE_INDEX).all()
    labels = np.array([2, IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7])
    assert shift_targets(labels, np.array([3, 3])).tolist() == [-100, 5, -100, -100, 7, -100]


def test_layout_partitions_each_step():
    layout = StepLayout(n_packs=10, batch_packs=2, accum=3, world=2, seed=0)
    assert layout.packs_per_step == 12 and layout.steps_for_epochs(1.0) == 1
    for step in range(3):
        parts = [s for r in range(2) for a in range(3) for s in layout.micro_slots(step, r, a)]
        assert sorted(parts) == sorted(layout.step_slots(step))
    stream = layout.slots(0, 20)
    assert [i for i, e in stream[:10]] == list(range(10))  # epoch 0 in pack_id order
    assert sorted(i for i, e in stream[10:]) == list(range(10))  # epoch 1: a permutation
    assert {e for _, e in stream[10:]} == {1}


def test_manifest_inconsistencies_are_errors(token_ids, tiny_images):
    rng = np.random.default_rng(0)
    s = make_sample(
        rng, token_ids, prompt_tokens=4, answer_tokens=3, images=[image_entry(tiny_images[0], 1, 1)]
    )
    good = pack_rows([[s]])
    bad_sup = good.set_column(
        good.schema.get_field_index("supervised"),
        "supervised",
        pa.array([[99]], type=pa.list_(pa.int32())),
    )
    with pytest.raises(ValueError, match="supervised"):
        _dataset(bad_sup, token_ids)[0]
    two_tiles = [{**good.column("images")[0].as_py()[0], "cols": 2}]
    bad_img = good.set_column(
        good.schema.get_field_index("images"),
        "images",
        pa.array([two_tiles], type=good.schema.field("images").type),
    )
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        _dataset(bad_img, token_ids, augment=False)[0]


def test_unreadable_image_skips_its_sample_and_names_it(token_ids, tiny_images, tmp_path):
    """An image that broke after curation: its sample leaves the batch (tokens, labels, other
    images), the others train as before, and the batch names what was skipped."""
    import shutil

    rng = np.random.default_rng(3)
    broken = tmp_path / "broken.jpg"
    shutil.copy(tiny_images[0], broken)
    broken.write_bytes(broken.read_bytes()[:200])  # truncated after the header

    def sample(name, n, *paths):
        images = [image_entry(p, 1, 1) for p in paths]
        return make_sample(
            rng, token_ids, prompt_tokens=n, answer_tokens=3, images=images, sample_id=name
        )

    first = sample("first", 4, tiny_images[1])
    bad = sample("bad", 5, tiny_images[2], broken)
    last = sample("last", 6, tiny_images[3])
    whole = _dataset(pack_rows([[first, last]]), token_ids, augment=False)[0]
    batch = _dataset(pack_rows([[first, bad, last]]), token_ids, augment=False)[0]
    (skip,) = batch["skipped"]
    assert skip["sample_id"] == "bad" and "broken.jpg" in skip["detail"]
    for key in ("input_ids", "position_ids", "targets", "weights", "seq_lens", "pixel_values"):
        assert torch.equal(batch[key], whole[key]), key
    assert _dataset(pack_rows([[first, last]]), token_ids)[0]["skipped"] == []
