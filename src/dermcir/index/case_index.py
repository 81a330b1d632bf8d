"""A published index version, loaded read-only: vectors, FAISS structure, case records, heatmaps and manifest.

Files of one version folder (see :mod:`dermcir.index._store` for the folder layout around it)::

    manifest.json   format version, model fingerprint, checkpoint path, sizes, vector-search settings, counts
    cases.jsonl     one JSON object per case, in row order: case_id, image, diagnosis, category, fields, text, sha1
    vectors.npy     float32 (N, 6·D): the target vectors φ_t, row i = line i of cases.jsonl
    heatmaps.npy    float16 (N, 3, 16, 16): per level, the mean attention mask of the local descriptor, max-scaled
    hnsw.faiss      the HNSW graph (kind "hnsw" only; an exact index is rebuilt from vectors.npy when loaded)

Everything is plain JSON, NumPy ``.npy`` (loaded with ``allow_pickle=False``) or FAISS's own format; no pickles.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from dermcir.index._store import current_version
from dermcir.index._vectors import VectorParams, build_vector_index, read_vector_index, search_vectors

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CASES = "cases.jsonl"
VECTORS = "vectors.npy"
HEATMAPS = "heatmaps.npy"
HNSW = "hnsw.faiss"


class EmptyIndexError(ValueError):
    """A search on an index that holds no cases."""


class FingerprintMismatchError(ValueError):
    """The model offered for searching or updating is not the one that encoded the index."""


@dataclass(frozen=True)
class Hit:
    """One search hit: the row of a case and its fused score."""

    row: int
    score: float


class CaseIndex:
    """One immutable index version. Safe to share between threads: nothing here changes after loading."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        records: list[dict[str, Any]],
        vectors: np.ndarray,
        heatmaps: np.ndarray,
        vector_index: faiss.Index,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.records = records
        self.vectors = vectors
        self.heatmaps = heatmaps
        self._vector_index = vector_index
        self._rows = {r["case_id"]: i for i, r in enumerate(records)}
        self.params = VectorParams(**manifest["vector_search"])

    def __len__(self) -> int:
        return len(self.records)

    @property
    def version(self) -> str:
        return self.folder.name

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def case_ids(self) -> list[str]:
        return [r["case_id"] for r in self.records]

    def row_of(self, case_id: str) -> int:
        """The row of a case id. Raises ``KeyError`` naming the id when it is not indexed."""
        try:
            return self._rows[case_id]
        except KeyError:
            raise KeyError(f"case {case_id!r} is not in index {self.folder.parent}") from None

    def require_fingerprint(self, got: str, what: str) -> None:
        """Refuse a model other than the one that encoded this index.

        Raises:
            FingerprintMismatchError: naming both fingerprints and the checkpoint the index was built with.
        """
        if got != self.fingerprint:
            raise FingerprintMismatchError(
                f"{what} (model fingerprint {got}) is not the model that encoded index {self.folder.parent} "
                f"(fingerprint {self.fingerprint}, built with checkpoint {self.manifest['checkpoint']}); use that "
                "checkpoint, or rebuild the index with this one (`dermcir index --checkpoint ...`)"
            )

    def record(self, case_id: str) -> dict[str, Any]:
        return self.records[self.row_of(case_id)]

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits per query vector, best first.

        Raises:
            EmptyIndexError: the index holds no cases.
            ValueError: ``k`` is not positive or the vectors have the wrong width.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not len(self):
            raise EmptyIndexError(
                f"index {self.folder.parent} holds no cases; add some with `dermcir index --add --out INDEX --data ...`"
            )
        scores, rows = search_vectors(self._vector_index, queries, k, self.params)
        # HNSW may return fewer than k neighbours (marked -1) when its beam is narrow.
        return [[Hit(int(r), float(s)) for s, r in zip(ss, rr, strict=True) if r >= 0] for ss, rr in zip(scores, rows)]


def open_index(root: str | Path) -> CaseIndex:
    """Load the live version of an index root.

    Raises:
        FileNotFoundError: no published index under ``root``.
        ValueError: a version written by an incompatible dermcir, or files that disagree with the manifest.
    """
    root = Path(root)
    for _attempt in range(3):  # a writer may publish and collect between resolving the pointer and opening it
        folder = current_version(root)
        if folder is None:
            raise FileNotFoundError(
                f"{root}: no dermcir index here (no CURRENT pointer); build one with `dermcir index`"
            )
        try:
            return load_version(folder)
        except FileNotFoundError:
            if current_version(root) == folder:
                raise
    raise FileNotFoundError(f"{root}: the index kept changing while being opened; try again")


def load_version(folder: Path) -> CaseIndex:
    """Load one version folder (use :func:`open_index` for an index root)."""
    manifest = read_manifest(folder)
    records = read_records(folder / CASES)
    count, dim = manifest["count"], manifest["embedding_dim"]
    vectors = np.load(folder / VECTORS, allow_pickle=False, mmap_mode="r")
    heatmaps = np.load(folder / HEATMAPS, allow_pickle=False)
    if len(records) != count or vectors.shape != (count, dim) or len(heatmaps) != count:
        raise ValueError(
            f"{folder}: {len(records)} records, vectors {vectors.shape}, {len(heatmaps)} heatmaps; "
            f"the manifest says {count} cases of width {dim}"
        )
    params = VectorParams(**manifest["vector_search"])
    if params.kind == "flat":
        vector_index = build_vector_index(np.asarray(vectors), params)
    else:
        vector_index = read_vector_index(folder / HNSW, dim, count)
    return CaseIndex(folder, manifest, records, vectors, heatmaps, vector_index)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the index version is incomplete")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: index format_version {manifest.get('format_version')}, this dermcir reads {FORMAT_VERSION}; "
            "rebuild the index with `dermcir index`"
        )
    return manifest


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the index version is incomplete")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
