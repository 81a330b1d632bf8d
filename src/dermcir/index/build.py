"""Building and updating an index: every change writes a complete new version and swaps it in atomically.

Adding encodes only the new cases and appends their vectors (the HNSW graph is extended, not rebuilt); removing
drops rows without re-encoding anything (an exact index is rebuilt from the stored vectors in memory-copy time; an
HNSW graph is rebuilt from them, which takes minutes only for collections of hundreds of thousands of cases).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermcir import __version__
from dermcir.checkpoint import fingerprint, load_checkpoint
from dermcir.checkpoint_folder import require_checkpoint
from dermcir.data.cache import file_digest
from dermcir.data.cases import Case, LoadReport
from dermcir.devices import resolve_device
from dermcir.index._encode import HEATMAP_SIZE, EncodedCases, encode_cases
from dermcir.index._store import (
    check_root,
    current_version,
    live_version,
    publish_version,
    remove_created,
    remove_empty_folders,
    require_index,
    writer_lock,
)
from dermcir.index._vectors import VectorParams, build_vector_index, extend_vector_index, write_vector_index
from dermcir.index.case_index import (
    CASES,
    FORMAT_VERSION,
    HEATMAPS,
    HNSW,
    MANIFEST,
    VECTORS,
    CaseIndex,
    live_count,
    load_version,
    refuse_existing_index,
    write_records,
)
from dermcir.models import ComposedRetrievalModel

log = logging.getLogger(__name__)


class NothingToIndexError(ValueError):
    """Cases were given but none could be used (missing or unreadable images): nothing was built or added."""


@dataclass
class IndexUpdate:
    """What a build or an update did."""

    root: Path
    version: str
    added: int
    removed: int  # cases dropped; for a build over an existing index, every case of the version it replaced
    total: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file or case id, reason)


@dataclass
class _Rows:
    """The content of one version, rows aligned."""

    records: list[dict[str, Any]]
    vectors: np.ndarray
    heatmaps: np.ndarray

    def take(self, keep: np.ndarray) -> _Rows:
        return _Rows([self.records[i] for i in keep], self.vectors[keep], self.heatmaps[keep])

    def extend(self, other: _Rows) -> _Rows:
        return _Rows(
            self.records + other.records,
            np.concatenate([self.vectors, other.vectors]),
            np.concatenate([self.heatmaps, other.heatmaps]),
        )


def case_record(case: Case) -> dict[str, Any]:
    """The metadata stored for one case (one line of ``cases.jsonl``)."""
    return {
        "case_id": case.case_id,
        "image": str(Path(case.image).resolve()),
        "diagnosis": case.diagnosis,
        "category": case.category,
        "fields": dict(case.fields),
        "text": case.text,
        "sha1": file_digest(Path(case.image)),
    }


def _manifest(model: ComposedRetrievalModel, checkpoint: Path, params: VectorParams, count: int) -> dict[str, Any]:
    c = model.config
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": model.checkpoint_fingerprint,  # the checkpoint's: set by load_checkpoint, checked for model=
        "checkpoint": str(Path(checkpoint).resolve()),
        "model": {
            "backbone": c.backbone,
            "text_encoder": c.text_encoder,
            "image_size": c.image_size,
            "dim": c.dim,
            "grid": c.grid,
            "n_masks": c.n_masks,
            "beta": c.beta,
            "template_version": c.template_version,
        },
        "embedding_dim": model.embedding_dim,
        "parts": {name: [s.start, s.stop] for name, s in model.part_slices().items()},
        "heatmap_size": HEATMAP_SIZE,
        "vector_search": dataclasses.asdict(params),
        "count": count,
        "dermcir_version": __version__,
    }


def _write(folder: Path, manifest: dict[str, Any], rows: _Rows, params: VectorParams, graph: Any = None) -> None:
    """Fill a version folder. ``graph``: an up-to-date HNSW index to save instead of building one."""
    write_records(folder / CASES, rows.records)
    np.save(folder / VECTORS, np.ascontiguousarray(rows.vectors, dtype=np.float32), allow_pickle=False)
    np.save(folder / HEATMAPS, np.ascontiguousarray(rows.heatmaps, dtype=np.float16), allow_pickle=False)
    if params.kind == "hnsw":
        write_vector_index(graph if graph is not None else build_vector_index(rows.vectors, params), folder / HNSW)
    written = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (folder / MANIFEST).write_text(json.dumps({**manifest, "count": len(rows.records), "written": written}, indent=2))


def _encode(
    cases: Sequence[Case],
    checkpoint: Path,
    model: ComposedRetrievalModel | None,
    device: str,
    batch_size: int | None,
    cache_dir: Path | None,
    report: LoadReport,
    progress: bool,
) -> tuple[ComposedRetrievalModel, EncodedCases]:
    if model is None:
        model = load_checkpoint(checkpoint, resolve_device(device))
    else:
        _check_model_is(model, checkpoint)
    encoded = encode_cases(model, cases, batch_size, cache_dir, report, progress)
    return model, encoded


def _check_model_is(model: ComposedRetrievalModel, checkpoint: Path) -> None:
    """A model handed in (``model=``, to save loading it again) must be the one ``checkpoint`` holds: the index
    records that checkpoint's fingerprint, so vectors of another model would be served as its own."""
    expected = fingerprint(checkpoint)
    got = getattr(model, "checkpoint_fingerprint", None)
    if got != expected:
        what = (f"the model of another checkpoint (fingerprint {got[:12]})" if got
                else "a model not loaded with load_checkpoint")
        raise ValueError(
            f"model= is {what}, not that of {checkpoint} (fingerprint {expected[:12]}); pass "
            "load_checkpoint(checkpoint), or leave model out"
        )
    if model.training:  # batch norm and dropout would make each stored vector depend on the rest of its batch
        raise ValueError(f"model= (of {checkpoint}) is in training mode; call model.eval() before indexing with it")


def _case_list(cases: Iterable[Case]) -> list[Case]:
    """``cases`` as a list, read once (a generator was consumed by the id check, and then indexed as empty)."""
    if isinstance(cases, (str, bytes, Case)):
        raise TypeError(f"cases must be a collection of Case objects, got {type(cases).__name__}")
    cases = list(cases)
    wrong = [c for c in cases if not isinstance(c, Case)]
    if wrong:
        raise TypeError(f"cases must be Case objects, got {type(wrong[0]).__name__} ({len(wrong)} of {len(cases)})")
    return cases


def _check_ids(cases: Sequence[Case]) -> None:
    dupes = sorted(i for i, n in Counter(c.case_id for c in cases).items() if n > 1)
    if dupes:
        raise ValueError(f"case ids must be unique; repeated: {', '.join(dupes[:10])}")
    for case in cases:
        # A URL path segment "." or ".." is a path step, even percent-encoded: "/cases/../image" is "/image" to every
        # browser, so the service could never show such a case. Refused before any image is encoded.
        if case.case_id in (".", ".."):
            raise ValueError(
                f"case id {case.case_id!r} (image {case.image}) cannot be used: '.' and '..' are path steps in a URL, "
                "so the web page could not show the case; give it another id"
            )


def _nothing_usable(cases: Sequence[Case], left_out: Sequence[tuple[str, str]], what: str = "") -> str:
    # ``cases`` is empty when the loader already left every row out (missing image files): say so, not "0 cases"
    head = f"none of the {len(cases)} {what}cases had a usable image" if cases else f"no usable {what}case"
    if left_out:
        first, why = left_out[0]
        head += f" ({len(left_out)} left out, e.g. {first}: {why})"
    return head


def _rows_of(encoded: EncodedCases) -> _Rows:
    return _Rows([case_record(c) for c in encoded.cases], encoded.vectors, encoded.heatmaps)


def build_index(
    cases: Iterable[Case],
    checkpoint: str | Path,
    out: str | Path,
    params: VectorParams | None = None,
    model: ComposedRetrievalModel | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    cache_dir: Path | None = None,
    report: LoadReport | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> IndexUpdate:
    """Encode ``cases`` with the checkpoint's model and publish them as a new index version under ``out``.

    An index already under ``out`` stays live and untouched until the new version is complete; the new version then
    replaces it as a whole (``IndexUpdate.removed`` counts its cases). The writer lock is taken before anything is
    encoded, so an ``out`` that cannot be written is found at once, and concurrent writers wait.

    Args:
        cases: the cases to index (ids must be unique).
        checkpoint: the checkpoint folder; the index records its fingerprint and path.
        out: the index root folder (created if needed; must be empty or an index).
        params: vector-search settings (exact inner product by default).
        model: the checkpoint's model, already loaded with ``load_checkpoint`` (saves loading it again); another
            model is refused, since the index records ``checkpoint``'s fingerprint.
        device: where to encode; ``"auto"`` uses CUDA when present.
        batch_size: images per encoder pass (None: 32 on a GPU, 4 on a CPU).
        cache_dir: the preprocessing cache (default ``$DERMCIR_CACHE``).
        report: collects the files left out and why.
        progress: show a progress bar.
        overwrite: replace a non-empty index already under ``out`` (``dermcir index --rebuild``); by default a
            build refuses to, as ``dermcir index`` does without ``--rebuild``, since it would replace every case.

    Raises:
        NothingToIndexError: no case had a usable image.
        IndexExistsError: ``out`` holds a non-empty (or unreadable) index and ``overwrite`` is false.
        ValueError: repeated ids, or ``out`` holds foreign files.
        OSError: ``out`` cannot be written (found before any image is encoded).
    """
    out, checkpoint, params = Path(out), Path(checkpoint), params or VectorParams()
    report = report if report is not None else LoadReport()
    cases = _case_list(cases)
    _check_ids(cases)  # these are refused before anything is created or encoded
    require_checkpoint(checkpoint)
    check_root(out)  # a mistyped --out is refused now, not after every image has been encoded
    if not overwrite:
        refuse_existing_index(out)
    created, locked = _first_missing(out), False
    try:
        with writer_lock(out):  # creates the folder: one that cannot be written is found before encoding
            locked = True
            try:
                if not overwrite:
                    refuse_existing_index(out)  # again: another writer may have built one meanwhile
                try:
                    previous = live_count(out)
                except (OSError, ValueError):
                    previous = None  # a damaged index being rebuilt: how many cases it held is unknown
                model, encoded = _encode(cases, checkpoint, model, device, batch_size, cache_dir, report, progress)
                if not encoded.cases:
                    raise NothingToIndexError(f"{_nothing_usable(cases, report.skipped)}; nothing to index")
                rows = _rows_of(encoded)
                with publish_version(out) as folder:
                    _write(folder, _manifest(model, checkpoint, params, len(rows.records)), rows, params)
                version = current_version(out).name  # read under the lock: another writer may publish right after
            except BaseException:
                if created is not None:  # still under the lock: a writer waiting on .lock sees it go and retries
                    remove_created(out, created)
                raise
    except BaseException:
        if created is not None and not locked:  # the lock was never taken: remove only folders made, if empty
            remove_empty_folders(out, created)
        raise
    removed = previous[1] if previous else 0
    if removed:
        log.info("replaced version %s of %s (%d cases) by %s", previous[0], out, removed, version)
    return IndexUpdate(out, version, len(rows.records), removed, len(rows.records), report.skipped)


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` that does not exist yet (what ``mkdir(parents=True)`` will create)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _current(root: Path) -> CaseIndex:
    return load_version(live_version(root))


def _existing_rows(index: CaseIndex) -> _Rows:
    return _Rows(list(index.records), np.asarray(index.vectors), np.asarray(index.heatmaps))


def add_cases(
    root: str | Path,
    cases: Iterable[Case],
    checkpoint: str | Path | None = None,
    model: ComposedRetrievalModel | None = None,
    replace: bool = False,
    device: str = "auto",
    batch_size: int | None = None,
    cache_dir: Path | None = None,
    report: LoadReport | None = None,
    progress: bool = True,
) -> IndexUpdate:
    """Encode and append cases to an existing index, without re-encoding the cases already in it.

    Args:
        root: the index root.
        cases: the cases to add.
        checkpoint: the model's checkpoint (default: the one recorded in the index); its fingerprint must match.
        model: that checkpoint's model, already loaded with ``load_checkpoint``; another model is refused.
        replace: re-encode cases whose id is already indexed; otherwise they are skipped and reported (and when every
            given case is already indexed, nothing is published and that is not an error).
        device, batch_size, cache_dir, report, progress: as for :func:`build_index`.

    Raises:
        FingerprintMismatchError: the checkpoint is not the model that encoded the index.
        FileNotFoundError: no index under ``root`` (nothing is created there).
        NothingToIndexError: cases to add were given (or the loader left every row out) but none had a usable image.
    """
    root = Path(root)
    report = report if report is not None else LoadReport()
    cases = _case_list(cases)
    _check_ids(cases)
    if checkpoint is not None:
        require_checkpoint(checkpoint)
    require_index(root)  # before the lock: a mistyped root must not be created (a first build is waited for)
    # held from reading to publishing, so a concurrent update cannot be lost; _current refuses a root whose first
    # build, waited for, failed
    with writer_lock(root, create=False):
        index = _current(root)
        if checkpoint is None:  # the index's own, which may have moved or gone since the index was built
            checkpoint = index.manifest["checkpoint"]
            require_checkpoint(checkpoint)
        checkpoint = Path(checkpoint)
        index.require_fingerprint(fingerprint(checkpoint), f"checkpoint {checkpoint}")
        known = {c.case_id for c in cases} & set(index.case_ids)
        if not replace:
            cases = [c for c in cases if c.case_id not in known]
        if cases:
            model, encoded = _encode(cases, checkpoint, model, device, batch_size, cache_dir, report, progress)
        # What was given and could not be used: the rows the loader left out (before this call) and the images that
        # failed now. The ids already indexed are listed after them, so that an error quotes an unusable one.
        left_out = list(report.skipped)
        if not replace:
            for case_id in sorted(known):
                report.skip(f"case {case_id}", "already indexed (`--replace`, or replace=True in Python, re-encodes it)")
        if not cases or not encoded.cases:  # nothing usable: keep the live version rather than publish a copy
            # An error when something given was left out, or nothing was given; not when every case given is
            # already indexed (a clinic re-exporting its archive), which is reported and changes nothing.
            if left_out or not known:
                already = f"; {len(known)} already indexed" if known and not replace else ""
                raise NothingToIndexError(
                    f"{_nothing_usable(cases, left_out, 'new ')}{already}; nothing was added to {root}"
                )
            log.info("no case to add to %s", root)
            return IndexUpdate(root, index.version, 0, 0, len(index), report.skipped)
        old = _existing_rows(index)
        replaced = {c.case_id for c in encoded.cases} & set(index.case_ids)
        keep = np.array([i for i, r in enumerate(old.records) if r["case_id"] not in replaced], dtype=np.int64)
        rows = old.take(keep).extend(_rows_of(encoded))
        graph = None
        if index.params.kind == "hnsw" and not replaced:
            graph = index._vector_index  # extended in place: this loaded copy is private to the update
            extend_vector_index(graph, encoded.vectors)
        with publish_version(root) as folder:
            _write(folder, _manifest(model, checkpoint, index.params, len(rows.records)), rows, index.params, graph)
        version = current_version(root).name  # read under the lock: another writer may publish right after
    log.info("added %d case(s) (%d replaced) to %s", len(encoded.cases), len(replaced), root)
    return IndexUpdate(root, version, len(encoded.cases), len(replaced), len(rows.records), report.skipped)


def remove_cases(root: str | Path, case_ids: Iterable[str]) -> IndexUpdate:
    """Remove cases by id without re-encoding anything.

    Raises:
        FileNotFoundError: no index under ``root`` (nothing is created there).
        ValueError: an id is not in the index (nothing is removed then).
    """
    root = Path(root)
    if isinstance(case_ids, str):  # a str is an iterable of one-letter ids: "12" would remove "1" and "2"
        raise TypeError(f"case_ids must be a collection of ids, not one string; pass [{case_ids!r}]")
    case_ids = list(dict.fromkeys(case_ids))
    wrong = [i for i in case_ids if not isinstance(i, str)]
    if wrong:
        raise TypeError(f"case ids are strings; got {', '.join(repr(i) for i in wrong[:10])}; nothing was removed")
    require_index(root)  # before the lock: a mistyped root must not be created (a first build is waited for)
    if not case_ids:  # an identical new version would push a real one out of those kept for going back
        with writer_lock(root, create=False):
            live = live_count(root)
            if live is None:  # a first build waited for failed
                live_version(root)  # raises, naming the root
            version, total = live
            return IndexUpdate(root, version, 0, 0, total)
    with writer_lock(root, create=False):
        index = _current(root)
        indexed = set(index.case_ids)
        unknown = [i for i in case_ids if i not in indexed]
        if unknown:
            raise ValueError(f"case id(s) not in index {root}: {', '.join(unknown[:10])}; nothing was removed")
        drop = set(case_ids)
        old = _existing_rows(index)
        keep = np.array([i for i, r in enumerate(old.records) if r["case_id"] not in drop], dtype=np.int64)
        rows = old.take(keep)
        with publish_version(root) as folder:
            _write(folder, {**index.manifest}, rows, index.params)
        version = current_version(root).name  # read under the lock: another writer may publish right after
    log.info("removed %d case(s) from %s", len(drop), root)
    return IndexUpdate(root, version, 0, len(drop), len(rows.records))
