"""Spectral and hierarchical clustering of experts, and the clusters merge methods return."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cluster:
    """Experts (slot indices of the current checkpoint) merged into one; `anchor` is the alignment target."""

    anchor: int
    members: tuple[int, ...]  # sorted, includes the anchor

    def weights(self, basis: np.ndarray) -> tuple[float, ...]:
        """Averaging weights proportional to `basis` (selection counts, output shares; equal if all are 0)."""
        freq = np.asarray([max(float(basis[m]), 0.0) for m in self.members])
        if freq.sum() <= 0:
            return tuple(1.0 / len(self.members) for _ in self.members)
        return tuple(float(f) for f in freq / freq.sum())


def spectral_embedding(similarity: np.ndarray, dims: int) -> np.ndarray:
    """Rows of the `dims` eigenvectors of the normalised graph Laplacian with the smallest eigenvalues.

    L = I - D^-1/2 S D^-1/2 (Ng, Jordan & Weiss); rows are scaled to unit length before k-means.
    """
    affinity = np.clip(np.asarray(similarity, dtype=np.float64), 0.0, None)
    affinity = (affinity + affinity.T) / 2
    degree = affinity.sum(axis=1)
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0)), 0.0)
    laplacian = np.eye(len(affinity)) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    _, vectors = np.linalg.eigh(laplacian)
    embedding = vectors[:, :dims]
    norms = np.linalg.norm(embedding, axis=1, keepdims=True)
    return embedding / np.where(norms > 0, norms, 1.0)


def spectral_labels(similarity: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Cluster labels 0..count-1 for every expert; each label used at least once; same seed, same labels."""
    from sklearn.cluster import KMeans

    n = len(similarity)
    if count >= n:
        return np.arange(n)
    embedding = spectral_embedding(similarity, count)
    labels = KMeans(n_clusters=count, n_init=10, random_state=seed).fit_predict(embedding)
    return _fill_empty(np.asarray(labels), count, similarity)


def hierarchical_labels(features: np.ndarray, count: int) -> np.ndarray:
    """Labels 0..count-1: average-linkage agglomerative clustering of feature rows (Euclidean), cut at `count`.

    scipy's linkage and cut_tree are deterministic; cut_tree gives exactly `count` clusters (ties included).
    """
    from scipy.cluster.hierarchy import cut_tree, linkage

    n = len(features)
    if count >= n:
        return np.arange(n)
    tree = linkage(np.asarray(features, dtype=np.float64).reshape(n, -1), method="average", metric="euclidean")
    return cut_tree(tree, n_clusters=count).reshape(-1)


def _fill_empty(labels: np.ndarray, count: int, similarity: np.ndarray) -> np.ndarray:
    """k-means can leave a cluster empty when experts coincide; split off the least-fitting member instead."""
    labels = labels.copy()
    for empty in [c for c in range(count) if not (labels == c).any()]:
        sizes = np.bincount(labels, minlength=count)
        biggest = int(np.argmax(sizes))
        members = np.flatnonzero(labels == biggest)
        fit = [similarity[m, members].sum() - similarity[m, m] for m in members]
        labels[members[int(np.argmin(fit))]] = empty
    return labels


def clusters_from_labels(labels: np.ndarray, frequency: np.ndarray) -> list[Cluster]:
    """Group experts by label; each group's anchor is its most frequently selected expert (lowest id on ties)."""
    clusters = []
    for label in sorted(set(int(x) for x in labels)):
        members = tuple(int(m) for m in np.flatnonzero(labels == label))
        anchor = max(members, key=lambda m: (float(frequency[m]), -m))
        clusters.append(Cluster(anchor, members))
    return sorted(clusters, key=lambda c: c.anchor)


def mean_similarity(cluster: Cluster, similarity: np.ndarray) -> float:
    """Mean pairwise similarity within a cluster (1.0 for a single expert)."""
    members = list(cluster.members)
    if len(members) < 2:
        return 1.0
    block = similarity[np.ix_(members, members)]
    return float((block.sum() - np.trace(block)) / (len(members) * (len(members) - 1)))
