"""Text signatures: normalisation, turn-wise shingles, rensa MinHash, LSH bands, candidates."""

from __future__ import annotations

import numpy as np

from curate.stages.neardup.config import NearDupConfig, NearDupOverride, Shingle
from curate.stages.neardup.groups import bucket_edges, first_per_component
from curate.stages.neardup.text import (
    band_keys,
    conversation_shingles,
    minhash_matrix,
    normalise,
    optimal_bands,
)

W3 = Shingle(unit="word", size=3)


def _turns(*texts):
    return [{"role": "human" if i % 2 == 0 else "gpt", "text": t} for i, t in enumerate(texts)]


def test_normalise_drops_placeholders_punctuation_and_whitespace():
    assert normalise("Image-1: <image>\nWhat  IS this?!") == "what is this"


def test_reordered_turns_give_the_same_set_and_edits_do_not_matter():
    a = conversation_shingles(
        _turns("Q one here now.", "Answer one is long.", "Q two?", "A two."), W3
    )
    b = conversation_shingles(
        _turns("Q two?", "A two.", "Q one here now.", "Answer one, is long!"), W3
    )
    assert a == b


def test_estimated_jaccard_tracks_the_true_one():
    words = [f"w{i}" for i in range(60)]
    sets = [
        conversation_shingles(_turns(" ".join(words)), W3),
        conversation_shingles(_turns(" ".join(words[:50] + ["x"] * 10)), W3),
    ]
    true = len(set(sets[0]) & set(sets[1])) / len(set(sets[0]) | set(sets[1]))
    sig = minhash_matrix(sets, 256, 1)
    assert abs((sig[0] == sig[1]).mean() - true) < 0.1
    assert (minhash_matrix(sets, 256, 1) == sig).all()  # deterministic


def test_band_keys_separate_shingle_settings():
    sig = minhash_matrix([["a b c"]], 32, 1)
    assert not (band_keys(sig, 4, "word3") == band_keys(sig, 4, "char5")).any()


def test_optimal_bands_make_the_threshold_likely_a_candidate():
    b = optimal_bands(0.7, 128)
    r = 128 // b
    assert 1 - (1 - 0.7**r) ** b > 0.9
    assert 1 - (1 - 0.3**r) ** b < 0.05


def test_overrides_resolve_dataset_over_domain():
    cfg = NearDupConfig(
        overrides={"ocr": NearDupOverride(threshold=0.9), "docs": NearDupOverride(threshold=0.8)}
    )
    assert cfg.resolve("docs", "ocr").threshold == 0.8
    assert cfg.resolve("other", "ocr").threshold == 0.9
    assert cfg.resolve("other", None).threshold == 0.7


def test_bucket_edges_pairs_small_buckets_and_stars_large_ones():
    keys = np.array([5, 5, 5, 9, 7, 7, 7, 7], dtype=np.uint64)
    members = np.arange(8)
    order = np.array([2, 1, 0, 0, 3, 2, 1, 0])
    small = bucket_edges(keys, members, order, pair_limit=4)
    pairs = set(zip(small.a.tolist(), small.b.tolist(), strict=True))
    assert {(2, 1), (2, 0), (1, 0)} <= pairs and len(pairs) == 3 + 6
    star = bucket_edges(keys, members, order, pair_limit=3)
    pairs = set(zip(star.a.tolist(), star.b.tolist(), strict=True))
    assert {(7, 6), (7, 5), (7, 4)} <= pairs and len(pairs) == 3 + 3


def test_bucket_edges_with_bands_pairs_a_key_within_its_band_only():
    keys = np.array([5, 5, 5, 5, 5], dtype=np.uint64)
    bands = np.array([0, 1, 0, 1, 2], dtype=np.uint16)
    edges = bucket_edges(keys, np.arange(5), np.arange(5), pair_limit=32, bands=bands)
    assert set(zip(edges.a.tolist(), edges.b.tolist(), strict=True)) == {(0, 2), (1, 3)}


def test_first_per_component_follows_the_order():
    labels = np.array([0, 0, 1, 1, 0])
    order = np.array([5, 3, 9, 1, 4])
    assert first_per_component(labels, order).tolist() == [1, 1, 3, 3, 1]
