"""The pack manifest: the contract between curation and training.

Two layouts, one row per pack. The pack stage writes the reference layout (REF_PACK_SCHEMA):
each sample is named by its ``tokens/`` shard and row, with the length it is packed at (less
than its full length when truncated) and how many of its images it keeps; the trainer reads
its ids from the tokens store (``curate.stages.pack.store``), so the manifest is a few
integers per sample, whatever the samples hold. The inline layout (PACK_SCHEMA), which a
manifest made by hand or by another tool may use, carries the ids themselves: ``input_ids`` /
``labels`` are the concatenated samples (labels −100 where not trained) and ``images`` lists
every image in token order with the grid it was budgeted at.

In both, ``seq_lens[k]`` is the k-th sample's token count, so ``cu_seqlens`` is their running
sum and position ids restart at every sample; ``supervised[k]`` is the k-th sample's trained
token count (loss weights). The trainer rebuilds exactly ``cols·rows (+1 thumbnail)`` tiles
per image, and checks that its ``<IMG_CONTEXT>`` count matches.
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

REF_PACK_SCHEMA = pa.schema(
    [
        ("pack_id", pa.int64()),
        ("sample_ids", pa.list_(pa.string())),
        ("token_shards", pa.list_(pa.string())),  # the sample's shard of tokens/
        ("token_rows", pa.list_(pa.int32())),  # its row in that shard
        ("seq_lens", pa.list_(pa.int32())),  # tokens packed (< the row's: truncated)
        ("supervised", pa.list_(pa.int32())),
        ("image_counts", pa.list_(pa.int16())),  # images kept (a truncated sample: the first)
        ("n_tokens", pa.int32()),
        ("n_tiles", pa.int32()),
        ("cost_flops", pa.float64()),
    ]
)
# Where a reference manifest's tokens are, relative to its folder (schema metadata).
TOKENS_FOLDER_KEY = b"curate.tokens_folder"
TOKENS_IDENTITY_KEY = b"curate.tokens_identity"  # digest of the tokens shards it refers to


def is_reference(schema: pa.Schema) -> bool:
    return "token_rows" in schema.names
