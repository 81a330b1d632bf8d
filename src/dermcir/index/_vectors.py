"""The FAISS side of the index: exact inner product by default, HNSW for large collections.

Scores are inner products because Eq. 9's fused score is ``⟨φ_q, φ_t⟩``. Every target vector is a concatenation of
six unit vectors, so all targets have the same norm and inner-product ranking equals cosine ranking; that is what lets
an HNSW graph built on inner products find the true neighbours.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

INDEX_KINDS = ("flat", "hnsw")


@dataclass(frozen=True)
class VectorParams:
    """How the vector search is built and queried (saved in the manifest)."""

    kind: str = "flat"  # "flat": exact inner product; "hnsw": approximate graph search for large collections
    hnsw_m: int = 32  # HNSW graph degree: more = better recall, more memory and build time
    # Build-time beam width. faiss's default (40) gave recall@10 0.81-0.91 on 10^6 synthetic clustered vectors; 100
    # gives 0.997 at ef_search 128 for a 1.8x longer build (docs/search.md, "Measured figures").
    ef_construction: int = 100
    # Query-time beam width (recall/latency trade-off). Read from the manifest; --add/--remove keep it, so changing it
    # takes a rebuild (only the graph's search parameter would change, but no command writes it alone).
    ef_search: int = 128

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"index kind {self.kind!r} is not known; choose one of {', '.join(INDEX_KINDS)}")
        # faiss's HNSW needs at least 2 links per node: with hnsw_m=1 adding vectors crashes the process (segfault)
        for name, least in (("hnsw_m", 2), ("ef_construction", 1), ("ef_search", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be a whole number ≥ {least}, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy's integers count; the manifest is JSON


def _as_matrix(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"vectors must have shape (n, {dim or 'dim'}), got {x.shape}")
    return x


def build_vector_index(vectors: np.ndarray, params: VectorParams) -> faiss.Index:
    """A FAISS inner-product index holding ``vectors`` with ids ``0..n-1`` (their rows)."""
    x = _as_matrix(vectors)
    if params.kind == "flat":
        index = faiss.IndexFlatIP(x.shape[1])
    else:
        index = faiss.IndexHNSWFlat(x.shape[1], params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
    if len(x):
        index.add(x)
    return index


def extend_vector_index(index: faiss.Index, vectors: np.ndarray) -> None:
    """Append rows to an index (both kinds support appending without a rebuild)."""
    x = _as_matrix(vectors, index.d)
    if len(x):
        index.add(x)


def search_vectors(
    index: faiss.Index, queries: np.ndarray, k: int, params: VectorParams
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows by inner product: ``(scores (Q, k), rows (Q, k))``, best first; equal scores in row order.

    Equal scores (one image indexed under two ids) come in the order of their rows, the order the cases were added,
    whatever ``k``: faiss's heap returns ties in an order that depends on ``k``, so the first result changed with it.
    To know which tied rows make the top ``k``, one row more is asked for, and more while the ties go on past it.

    Search parameters are passed per call rather than set on the index, so concurrent searches share no mutable
    state.
    """
    q = _as_matrix(queries, index.d)
    k = min(k, index.ntotal)
    if k <= 0:
        return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    wanted = min(k + 1, index.ntotal)
    while True:
        ef = max(params.ef_search, wanted)
        search_params = faiss.SearchParametersHNSW(efSearch=ef) if params.kind == "hnsw" else None
        scores, rows = index.search(q, wanted, params=search_params)
        tied_past_k = (rows[:, -1] >= 0) & (scores[:, -1] >= scores[:, k - 1])
        if wanted >= index.ntotal or not tied_past_k.any():
            break
        wanted = min(2 * wanted, index.ntotal)
    # best first, ties by row; a missing neighbour (row -1, which HNSW may return) last
    order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), np.where(rows < 0, np.inf, -scores)), axis=1)
    take = order[:, :k]
    return np.take_along_axis(scores, take, axis=1), np.take_along_axis(rows, take, axis=1)


def write_vector_index(index: faiss.Index, path: Path) -> None:
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as exc:  # a full disk: faiss's C++ message names neither the file nor the cause's kind
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OSError(f"{path}: could not be written ({reason})") from None


def read_vector_index(path: Path, dim: int, count: int) -> faiss.Index:
    """Read a saved index, checking that it matches the manifest."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the index version is incomplete")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:  # faiss's message (a C++ assertion) does not name the file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: corrupt or unreadable FAISS index ({reason}); rebuild the index with `dermcir index`"
        ) from None
    if index.d != dim or index.ntotal != count:
        raise ValueError(f"{path}: holds {index.ntotal} vectors of width {index.d}, the manifest says {count} of {dim}")
    return index
