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

from __future__ import annotations

from dermcir._lazy import lazy_exports

# The public names, by the module that defines them. They load on first use (PEP 562) instead of here, because the
# encoders import torch (seconds): so ``dermcir.index._store`` (folders and the CURRENT pointer) and
# ``dermcir.index.case_index`` (reading a version) can be imported alone, and the command line refuses an --index or
# --out that holds no index, or a build over an existing one, before torch loads.
_MODULES = {
    "dermcir.index._encode": ("HEATMAP_SIZE", "attention_heatmaps", "encode_cases"),
    "dermcir.devices": ("resolve_device",),  # (its home is dermcir.devices; here for the index's callers)
    "dermcir.index._vectors": ("INDEX_KINDS", "VectorParams"),
    "dermcir.index.build": (
        "IndexUpdate", "NothingToIndexError", "add_cases", "build_index", "case_record", "remove_cases",
    ),
    "dermcir.index.case_index": (
        "CaseIndex", "EmptyIndexError", "FingerprintMismatchError", "Hit", "IndexExistsError", "open_index",
    ),
}

__all__ = [  # the same names, written out for tools that read them without running this module
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

_DEFINED_IN, __getattr__, __dir__ = lazy_exports(__name__, globals(), _MODULES)
