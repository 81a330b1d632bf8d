"""The persistent case index: target vectors φ_t, case metadata and the fingerprint of the model that encoded them.

Targets are encoded once (Eq. 9's score is ``⟨φ_q, φ_t⟩``), so a query costs one model pass plus one vector search.
Every build or update publishes a complete new version folder and then swaps a pointer file, so a failed or killed
write leaves the previous index usable and readers never see a half-written one. The on-disk format is documented in
:mod:`dermcir.index.case_index` and ``docs/search.md``.

Example:
    >>> from dermcir.data import load_derm7pt
    >>> from dermcir.index import build_index, open_index
    >>> cases, report = load_derm7pt("release_v0")                      # doctest: +SKIP
    >>> build_index(cases, "runs/model", "runs/index")                  # doctest: +SKIP
    >>> len(open_index("runs/index"))                                   # doctest: +SKIP
    888
"""

from dermcir.index._encode import HEATMAP_SIZE, attention_heatmaps, encode_cases, resolve_device
from dermcir.index._vectors import INDEX_KINDS, VectorParams
from dermcir.index.build import (
    IndexExistsError,
    IndexUpdate,
    NothingToIndexError,
    add_cases,
    build_index,
    case_record,
    remove_cases,
)
from dermcir.index.case_index import CaseIndex, EmptyIndexError, FingerprintMismatchError, Hit, open_index

__all__ = [
    "HEATMAP_SIZE",
    "INDEX_KINDS",
    "CaseIndex",
    "EmptyIndexError",
    "FingerprintMismatchError",
    "Hit",
    "IndexExistsError",
    "IndexUpdate",
    "NothingToIndexError",
    "VectorParams",
    "add_cases",
    "attention_heatmaps",
    "build_index",
    "case_record",
    "encode_cases",
    "open_index",
    "remove_cases",
    "resolve_device",
]
