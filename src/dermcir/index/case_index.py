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

from dermcir.index._store import current_version, live_version
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


class IndexExistsError(ValueError):
    """A build without ``overwrite`` into a folder that already holds a non-empty index (``dermcir index`` without
    ``--add`` or ``--rebuild``): it would have replaced every indexed case."""


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
        folder = live_version(root)
        try:
            return load_version(folder)
        except (FileNotFoundError, ValueError):
            # A file removed by garbage collection while being read can also look damaged (faiss reads a file that is
            # unlinked half-way); only a version that is still the live one is really missing or corrupt.
            if current_version(root) == folder:
                raise
    raise FileNotFoundError(f"{root}: the index kept changing while being opened; try again")


def load_version(folder: Path) -> CaseIndex:
    """Load one version folder (use :func:`open_index` for an index root).

    Raises:
        FileNotFoundError: a file of the version is missing.
        ValueError: a file is corrupt or disagrees with the manifest; the message names the file.
    """
    manifest = read_manifest(folder)
    records = read_records(folder / CASES)
    count, dim = manifest["count"], manifest["embedding_dim"]
    vectors = _load_array(folder / VECTORS, mmap=True)
    # mapped, not read: a search reads k of its rows (147 MB of them at 100,000 cases). A version is never modified
    # once published, and a mapping outlives the file's removal by a writer's clean-up.
    heatmaps = _load_array(folder / HEATMAPS, mmap=True)
    if len(records) != count or vectors.shape != (count, dim) or len(heatmaps) != count:
        raise ValueError(
            f"{folder}: {len(records)} records, vectors {vectors.shape}, {len(heatmaps)} heatmaps; "
            f"the manifest says {count} cases of width {dim}"
        )
    _require_finite(folder / VECTORS, vectors, records)
    try:
        params = VectorParams(**manifest["vector_search"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{folder / MANIFEST}: bad vector_search {manifest['vector_search']!r} ({exc})") from None
    if params.kind == "flat":
        vector_index = build_vector_index(np.asarray(vectors), params)
    else:
        vector_index = read_vector_index(folder / HNSW, dim, count)
    return CaseIndex(folder, manifest, records, vectors, heatmaps, vector_index)


def _require_finite(path: Path, vectors: np.ndarray, records: list[dict[str, Any]]) -> None:
    """A row holding NaN or inf (a damaged or hand-edited file) is refused: faiss left that case out of every result
    without a word. Read a block at a time, as the file is mapped."""
    for start in range(0, len(vectors), 65536):
        bad = ~np.isfinite(vectors[start : start + 65536]).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise _corrupt(path, f"row {row}, case {records[row]['case_id']!r}, holds NaN or infinite values")


#: manifest keys that loading and searching rely on
_MANIFEST_KEYS = ("fingerprint", "checkpoint", "model", "embedding_dim", "parts", "vector_search", "count")


def _corrupt(path: Path, exc: Exception | str) -> ValueError:
    # the parser's own message ("Expecting property name ...") does not say which file it was reading
    return ValueError(f"{path}: corrupt or unreadable ({exc}); rebuild the index with `dermcir index`")


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the index version is incomplete")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(path, exc) from None
    if not isinstance(manifest, dict):
        raise _corrupt(path, ValueError(f"expected a JSON object, got {type(manifest).__name__}"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: index format_version {manifest.get('format_version')}, this dermcir reads {FORMAT_VERSION}; "
            "rebuild the index with `dermcir index`"
        )
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    if missing:
        raise _corrupt(path, ValueError(f"missing key(s) {', '.join(missing)}"))
    return manifest


def live_count(root: Path) -> tuple[str, int] | None:
    """(version, number of cases) of the live version under ``root``, or ``None`` when there is none.

    Raises:
        ValueError: the live version cannot be read (the message names the file).
    """
    folder = current_version(root) if root.is_dir() else None
    if folder is None:
        return None
    return folder.name, int(read_manifest(folder)["count"])


def refuse_existing_index(root: Path) -> None:
    """Refuse a build (without ``overwrite``) into ``root`` when it holds a non-empty or unreadable index.

    Here, beside the manifest it reads, rather than in the builder: it needs no torch, so the command line runs it
    before the model loads.

    Raises:
        IndexExistsError: the message says how many cases would be replaced and how to add or rebuild instead.
    """
    try:
        live = live_count(root)
    except (OSError, ValueError) as exc:
        raise IndexExistsError(
            f"{root}: holds an index whose live version cannot be read ({exc}); pass --rebuild (overwrite=True) to "
            "replace it with a new version"
        ) from None
    if live is not None and live[1] > 0:
        version, count = live
        raise IndexExistsError(
            f"{root}: already holds an index of {count} cases (version {version}); building would replace them all. "
            "Add cases with `dermcir index --add`, or pass --rebuild (overwrite=True) to replace the index "
            "(the replaced version stays on disk for a while: docs/search.md, 'Going back to a previous version')"
        )


#: the keys of one ``cases.jsonl`` record (see :func:`dermcir.index.case_record`); every value is a string except
#: ``fields``, an object of strings
RECORD_KEYS = ("case_id", "image", "diagnosis", "category", "fields", "text", "sha1")


def _record_problem(record: Any, seen: dict[str, int]) -> str | None:
    """What is wrong with one parsed line of ``cases.jsonl``, or ``None``."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [key for key in RECORD_KEYS if key not in record]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for key in RECORD_KEYS:
        value = record[key]
        if key == "fields":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                return f"'fields' must be an object of strings, got {value!r}"
        elif not isinstance(value, str):
            return f"{key!r} must be a string, got {value!r}"
    if not record["case_id"]:
        return "empty case_id"
    if record["case_id"] in seen:
        return f"case_id {record['case_id']!r} repeats line {seen[record['case_id']]}"
    return None


def read_records(path: Path) -> list[dict[str, Any]]:
    """The case records of a version, each checked (keys, types, unique ids) so that a hand-edited or damaged file is
    refused when loading, naming the file and the line, rather than failing in the middle of a search."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the index version is incomplete")
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}  # case_id -> line
    # Read as bytes and decode each line: a text file is decoded in chunks, so a bad byte would be reported while an
    # earlier line is being read, under that line's number.
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                raise _corrupt(path, ValueError(f"line {number}: {exc}")) from None
            problem = _record_problem(record, seen)
            if problem:
                raise _corrupt(path, ValueError(f"line {number}: {problem}"))
            seen[record["case_id"]] = number
            records.append(record)
    return records


def _load_array(path: Path, mmap: bool = False) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the index version is incomplete")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise  # collected by a writer meanwhile: open_index retries with the newer version
    except (ValueError, OSError, EOFError) as exc:
        raise _corrupt(path, exc) from None


def write_records(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
