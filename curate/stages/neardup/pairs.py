"""Candidate pairs from shared keys, and clusters from verified pairs (text and images)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Edges:
    """Candidate or verified pairs (a before b in the kept order), as row indices."""

    a: np.ndarray
    b: np.ndarray

    @classmethod
    def empty(cls) -> Edges:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.a)

    def unique(self) -> Edges:
        """Each pair once (row indices below 2^32: a pair is one uint64)."""
        if not len(self):
            return self
        key = np.unique((self.a.astype(np.uint64) << np.uint64(32)) | self.b.astype(np.uint64))
        return Edges(
            (key >> np.uint64(32)).astype(np.int64), (key & np.uint64(2**32 - 1)).astype(np.int64)
        )

    @classmethod
    def concat(cls, parts: list[Edges]) -> Edges:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.a for p in parts]), np.concatenate([p.b for p in parts]))


def bucket_edges(
    keys: np.ndarray,
    members: np.ndarray,
    order: np.ndarray,
    pair_limit: int,
    bands: np.ndarray | None = None,
) -> Edges:
    """Pairs of members that share a key (and a band, when ``bands`` is given): every pair in
    a bucket of at most ``pair_limit``, each member with the bucket's first in a larger one;
    ``a`` comes before ``b`` in ``order``."""
    shared = _shared(keys)
    if not shared.all():  # most keys are their sample's alone: sort only the rest
        keys, members, order = keys[shared], members[shared], order[shared]
        bands = None if bands is None else bands[shared]
    if len(keys) < 2:
        # No pair. The empty arrays keep the members' dtype: uint64 hashes concatenated with
        # int64 row numbers would become floats.
        return Edges(members[:0], members[:0])
    if bands is None:
        o = np.lexsort((order, keys))
        k, m = keys[o], members[o]
        new = k[1:] != k[:-1]
    else:
        o = np.lexsort((order, keys, bands))
        k, m = keys[o], members[o]
        new = (k[1:] != k[:-1]) | (bands[o][1:] != bands[o][:-1])
    starts = np.flatnonzero(np.r_[True, new])
    sizes = np.diff(np.r_[starts, len(k)])
    parts = []
    for size in np.unique(sizes[(sizes > 1) & (sizes <= pair_limit)]):
        s = starts[sizes == size]
        i, j = np.triu_indices(int(size), 1)
        parts.append(Edges(m[(s[:, None] + i).ravel()], m[(s[:, None] + j).ravel()]))
    big = sizes > pair_limit
    if big.any():
        first = np.repeat(starts[big], sizes[big] - 1)
        offs = np.concatenate([np.arange(1, z) for z in sizes[big]])
        parts.append(Edges(m[first], m[first + offs]))
    return Edges.concat(parts)


def _shared(keys: np.ndarray) -> np.ndarray:
    """Whether each key occurs more than once."""
    o = np.argsort(keys)
    k = keys[o]
    same = k[1:] == k[:-1]
    out = np.zeros(len(keys), bool)
    out[o] = np.r_[same, False] | np.r_[False, same]
    return out


def components(edges: Edges) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, component label per node) of the graph the edges make: only the nodes of an
    edge, so its size follows the pairs, not the run."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.unique(np.concatenate([edges.a, edges.b]))
    ia, ib = np.searchsorted(nodes, edges.a), np.searchsorted(nodes, edges.b)
    graph = coo_matrix((np.ones(len(ia), np.int8), (ia, ib)), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    return nodes, labels


def first_per_component(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each node, the position of its component's first node in ``order``."""
    o = np.lexsort((order, labels))
    starts = np.r_[True, labels[o][1:] != labels[o][:-1]]
    first_of_sorted = o[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    out = np.empty_like(o)
    out[o] = first_of_sorted
    return out
