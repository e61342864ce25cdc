"""The pack manifest: the contract between curation and training.

One row per pack. ``input_ids``/``labels`` are the concatenated samples (labels −100 where not
trained); ``seq_lens[k]`` is the k-th sample's token count, so ``cu_seqlens`` is their running
sum and position ids restart at every sample; ``supervised[k]`` is the k-th sample's trained
token count (loss weights). ``images`` lists every image in token order with the grid it was
budgeted at, so the trainer rebuilds exactly ``cols·rows (+1 thumbnail)`` tiles per image and
its ``<IMG_CONTEXT>`` count matches.
"""

from __future__ import annotations

import pyarrow as pa

PACK_IMAGE_TYPE = pa.struct(
    [
        ("sample_index", pa.int32()),  # which sample of the pack the image belongs to
        ("path", pa.string()),
        ("cols", pa.int16()),
        ("rows", pa.int16()),
        ("thumbnail", pa.bool_()),
        ("data_augment", pa.bool_()),  # random JPEG re-compression of its tiles in training
    ]
)

PACK_SCHEMA = pa.schema(
    [
        ("pack_id", pa.int64()),  # position in the (seed-shuffled) training order
        ("sample_ids", pa.list_(pa.string())),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("seq_lens", pa.list_(pa.int32())),
        ("supervised", pa.list_(pa.int32())),
        ("images", pa.list_(PACK_IMAGE_TYPE)),
        ("n_tokens", pa.int32()),
        ("n_tiles", pa.int32()),
    ]
)


def tiles_of(image: dict) -> int:
    """Tiles one manifest image expands to."""
    return image["cols"] * image["rows"] + int(image["thumbnail"])


# What pack writes: PACK_SCHEMA and each pack's estimated training FLOPs (curate.stages.pack.
# balance). The trainer reads PACK_SCHEMA's columns only, so manifests made elsewhere still load.
MANIFEST_SCHEMA = PACK_SCHEMA.append(pa.field("cost_flops", pa.float64()))
