"""Near-duplicates across every dataset: text (MinHash-LSH) and images (pHash + band LSH).

Three engine steps (pipeline section ``neardup:``):

- ``signatures`` (per shard): MinHash and band keys of each conversation, pHash of each image;
- ``neardup_groups`` (global, out of core): candidate pairs from shared band keys, Jaccard and
  image checks, clusters, the kept sample of each; image reuse clusters;
- ``neardup`` (per shard): the ``near_duplicate`` ledger rows.
"""
