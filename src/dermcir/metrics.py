"""Retrieval metrics as pure functions of a score matrix and labels (the seed's Eq. 10–14).

Conventions: ``scores[i, j]`` is how well database item ``j`` matches query ``i`` (higher is better); a database item
is relevant to a query when their labels are equal. Ties are broken pessimistically for the query (a tied
irrelevant item ranks above a tied relevant one) so that a constant scorer cannot look good. So on tie-free rows
average precision equals scikit-learn's ``average_precision_score``, and on tied ones it is at most that (scikit-learn
counts a tied group at the precision of the whole group). A query with no relevant database item is left out of every
figure.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np


def _check(scores: np.ndarray, query_labels: Sequence, db_labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2D array of shape (n_queries, n_database), got shape {scores.shape}")
    if isinstance(query_labels, (set, frozenset)) or isinstance(db_labels, (set, frozenset)):
        raise TypeError("labels must be in the order of the score matrix's rows and columns, not a set")
    # a generator has no length numpy can read: it is read once, in order
    q, d = (np.asarray(list(labels) if not hasattr(labels, "__len__") else labels)
            for labels in (query_labels, db_labels))
    if q.ndim != 1 or d.ndim != 1:
        raise ValueError(f"labels must be one value per query and per database item, got shapes {q.shape} and "
                         f"{d.shape}")
    if scores.shape != (len(q), len(d)):
        raise ValueError(
            f"scores has shape {scores.shape} but there are {len(q)} query labels and {len(d)} database labels"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores, q[:, None] == d[None, :]


def _ranked_relevance(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    # Sort by score descending; among ties irrelevant first (pessimistic), hence the secondary key.
    order = np.lexsort((relevant.astype(np.int8), -scores), axis=1)
    return np.take_along_axis(relevant, order, axis=1)


def average_precision(scores: np.ndarray, query_labels: Sequence, db_labels: Sequence) -> np.ndarray:
    """Average precision of every query over the full ranking (Eq. 10–11); NaN for a query with no relevant item."""
    scores, relevant = _check(scores, query_labels, db_labels)
    ranked = _ranked_relevance(scores, relevant)
    hits = np.cumsum(ranked, axis=1)
    ranks = np.arange(1, ranked.shape[1] + 1)
    n_rel = ranked.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, (ranked * hits / ranks).sum(axis=1) / n_rel, np.nan)


def mean_average_precision(scores: np.ndarray, query_labels: Sequence, db_labels: Sequence) -> float:
    """Mean of :func:`average_precision` over queries that have at least one relevant item (Eq. 12)."""
    ap = average_precision(scores, query_labels, db_labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def accuracy_at_k(scores: np.ndarray, query_labels: Sequence, db_labels: Sequence, k: int) -> float:
    """Fraction of queries with at least one relevant item among the top ``k`` (Eq. 13–14).

    Over the queries mAP averages too (those with a relevant item in the database; NaN when none has one): a query
    that cannot succeed would otherwise count as a miss here while mAP leaves it out."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, got {k!r}")
    scores, relevant = _check(scores, query_labels, db_labels)
    answerable = relevant.any(axis=1)
    if not answerable.any():
        return float("nan")
    ranked = _ranked_relevance(scores[answerable], relevant[answerable])
    return float(ranked[:, :k].any(axis=1).mean())


def retrieval_metrics(
    scores: np.ndarray, query_labels: Sequence, db_labels: Sequence, ks: Sequence[int] = (1, 2, 4)
) -> dict[str, float]:
    """``{"mAP": ..., "Acc@1": ..., ...}`` in percent."""
    out = {"mAP": 100.0 * mean_average_precision(scores, query_labels, db_labels)}
    for k in ks:
        out[f"Acc@{k}"] = 100.0 * accuracy_at_k(scores, query_labels, db_labels, k)
    return out
