"""Run a baseline on the protocol's folds and write its ``results.json`` (same schema as the composed model's)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from dermcir.baselines._base import Baseline, BaselineData, create_baseline
from dermcir.baselines._metadata import metadata_onehot
from dermcir.data.cache import default_cache_dir, preprocess_cases
from dermcir.data.cases import Case, LoadReport
from dermcir.data.folds import check_enough_per_category, stratified_folds
from dermcir.evaluation.results import build_results, check_run_folder, fold_row, format_row
from dermcir.files import write_json_atomic

log = logging.getLogger(__name__)


@contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """Copy the library's INFO log into ``path``, which is replaced only once the run completes.

    Until then the log grows in ``log.running-<pid>-<random>.txt`` beside ``path``: ``path`` and ``results.json``
    stay the pair of the last run that completed. A run that fails ends its log with the exception and keeps it as
    ``log.failed.txt``; a run that completes deletes that file, since the folder's run no longer failed.
    """
    failed_path = path.with_name(f"{path.stem}.failed{path.suffix}")
    # A name of its own ("x": never an existing file), so two runs into one folder cannot write into one log.
    running = path.with_name(f"{path.stem}.running-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    handler = logging.FileHandler(running, mode="x", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("dermcir")
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    except BaseException as exc:
        # Into the file only: the CLI prints the error as one line, which a traceback on the console would bury.
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run failed: %s: %s",
                                      (type(exc).__name__, exc), sys.exc_info()))
        _finish(logger, handler, previous)
        with contextlib.suppress(OSError):  # the run's own error is the one to report
            os.replace(running, failed_path)
        raise
    _finish(logger, handler, previous)
    os.replace(running, path)  # the file is complete: one rename puts it in place, as files.atomic_write does
    failed_path.unlink(missing_ok=True)


def _finish(logger: logging.Logger, handler: logging.Handler, level: int) -> None:
    logger.removeHandler(handler)
    logger.setLevel(level)
    handler.close()


def _check_scores(name: str, variant: str, scores: np.ndarray, n_q: int, n_db: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n_q, n_db):
        raise ValueError(f"{name} variant {variant!r}: scores of shape {scores.shape}, expected {(n_q, n_db)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} variant {variant!r}: scores contain NaN or infinite values")
    return scores


def build_data(
    baseline: Baseline, cases: Sequence[Case], cache_dir: Path | None, seed: int,
    load_report: LoadReport | None = None, progress: bool = True,
) -> tuple[BaselineData, LoadReport]:
    """Preprocess the cases' images at the method's size and gather labels and metadata. The report returned lists
    the rows ``load_report`` (the loader's, left unchanged) left out, then the images preprocessing left out."""
    report = load_report.copy() if load_report is not None else LoadReport()
    report.n_rows = len(cases)
    kept, images = preprocess_cases(cases, baseline.config.image_size, cache_dir, report, progress)
    kept, images = report.apply_threshold_again(kept, images)
    if report.skipped:
        log.warning("%d row(s) or case(s) left out: %s", len(report.skipped),
                    "; ".join(f"{what}: {why}" for what, why in report.skipped))
    data = BaselineData(
        images=images, labels=np.array([c.category for c in kept]), metadata=metadata_onehot(kept),
        cache_dir=cache_dir or default_cache_dir(), seed=seed, progress=progress,
    )
    return data, report


def run_baseline_cv(
    method: str, cases: list[Case], out_dir: Path, n_folds: int = 5, seed: int = 0, profile: str = "cpu",
    cache_dir: Path | None = None, load_report: LoadReport | None = None, progress: bool = True, **overrides: Any,
) -> dict[str, Any]:
    """Run a registered baseline on the protocol's stratified folds and write ``out_dir/results.json`` and a log.

    Per fold the queries are the fold's cases and the database the other folds' cases; relevant = same category.
    The document has the composed model's schema (``folds``, ``mean``, ``std``, ``per_category``) for the method's
    primary row, on the seed's protocol, plus ``variants``: the method's other rows (e.g. the published design with
    metadata on both sides), each labelled with what its query and database sides carry.

    Args:
        method: a name from :func:`dermcir.baselines.list_baselines`.
        cases: the cases (e.g. from :func:`dermcir.data.load_derm7pt`).
        out_dir: where ``results.json`` and ``log.txt`` go; both are replaced only when the run completes (a failed
            run leaves them as they were and writes its log, with the error, to ``log.failed.txt``).
        n_folds: folds of the split.
        seed: the split's and the training's seed.
        profile: ``"cpu"`` or ``"gpu"`` settings (``dermcir.baselines.configs``; each method's module says why).
        cache_dir: preprocessed images and frozen features (default: ``$DERMCIR_CACHE`` or ``~/.cache/dermcir``).
        load_report: the loader's report of ``cases``; the rows it left out are listed in ``results.json``
            (``skipped``) and the log with the images preprocessing leaves out.
        progress: progress bars (on stderr) for preprocessing and the methods' long steps; ``False`` for none
            (``dermcir cv --quiet``).
        **overrides: single settings of the method's config, e.g. ``backbone="resnet50", backbone_weights=PATH``.

    Returns:
        The ``results.json`` document.

    Raises:
        ValueError: unknown method, profile or setting; too few cases for the folds; ``out_dir`` holds another
            method's results (:func:`~dermcir.evaluation.results.check_run_folder`).
    """
    baseline = create_baseline(method, profile, **overrides)
    check_run_folder(out_dir, rerun_method=baseline.name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _log_to(out_dir / "log.txt"):
        return _run(baseline, cases, out_dir, n_folds, seed, cache_dir, load_report, progress)


def _run(
    baseline: Baseline, cases: list[Case], out_dir: Path, n_folds: int, seed: int, cache_dir: Path | None,
    load_report: LoadReport | None, progress: bool,
) -> dict[str, Any]:
    start = time.perf_counter()
    log.info("%s (%s profile, device %s): %d cases, %d folds, seed %d; settings %s", baseline.name,
             baseline.profile, baseline.device, len(cases), n_folds, seed, baseline.settings)
    data, report = build_data(baseline, cases, cache_dir, seed, load_report, progress)
    # as the composed model's run does, before the feature step: a category missing from a fold's database would
    # leave its queries without an answer (NaN average precision), silently left out of the mean
    check_enough_per_category(data.labels, n_folds, len(report.skipped), "log.txt", left_out=report.dropped_categories)
    baseline.prepare(data)
    prepare_s = time.perf_counter() - start
    log.info("prepared in %.1f s", prepare_s)
    variants = baseline.variants
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for fold, (db_idx, q_idx) in enumerate(stratified_folds(data.labels, n_folds, seed)):
        t0 = time.perf_counter()
        scores = baseline.fold_scores(fold, db_idx, q_idx)
        missing = set(variants) - set(scores)
        if missing:
            raise ValueError(f"{baseline.name}: fold {fold} returned no scores for variant(s) {sorted(missing)}")
        seconds = time.perf_counter() - t0
        for variant in variants:
            s = _check_scores(baseline.name, variant, scores[variant], len(q_idx), len(db_idx))
            rows[variant].append(fold_row(fold, s, data.labels[q_idx], data.labels[db_idx]) | {"seconds": seconds})
        main = rows[next(iter(variants))][-1]
        log.info("fold %d: mAP %.1f Acc@1 %.1f Acc@2 %.1f Acc@4 %.1f (%.1f s)", fold, main["mAP"], main["Acc@1"],
                 main["Acc@2"], main["Acc@4"], seconds)
    doc = _document(baseline, rows, report, prepare_s, time.perf_counter() - start, n_folds, seed, len(data.labels))
    write_json_atomic(out_dir / "results.json", doc)
    log.info("%s", format_row(doc["display_name"], doc["mean"], doc["std"]))
    log.info("wrote %s (%.0f s in all)", out_dir / "results.json", doc["seconds"])
    return doc


def _document(
    baseline: Baseline, rows: dict[str, list[dict[str, Any]]], report: LoadReport, prepare_s: float, total_s: float,
    n_folds: int, seed: int, n_cases: int,
) -> dict[str, Any]:
    keys = list(baseline.variants)
    extra = {
        "display_name": baseline.display_name, "profile": baseline.profile, "device": str(baseline.device),
        "n_cases": n_cases, "n_folds": n_folds, "seed": seed, "settings": baseline.settings,
        "deviations": baseline.deviations, "seconds": total_s, "seconds_prepare": prepare_s,
        "skipped": [list(s) for s in report.skipped], "categories_left_out": report.categories_left_out(),
    }
    variants = {
        key: build_results(f"{baseline.name}:{key}", rows[key], display_name=f"{baseline.display_name} [{key}]",
                           protocol=baseline.variants[key])
        for key in keys[1:]
    }
    return build_results(baseline.name, rows[keys[0]], protocol=baseline.variants[keys[0]], variants=variants, **extra)
