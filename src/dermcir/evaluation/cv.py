"""The benchmark: stratified k-fold composed retrieval on Derm7pt (queries = one fold, database = the others).

Writes ``results.json`` (per-fold rows, mean, std, per-category figures, ablations), ``tables.md`` (laid out like
the paper's Tables 1 and 2), ``retrievals.png`` (the paper's Fig. 4) and one folder per fold (config, metrics,
training history, log).
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermcir.checkpoint import state_digest
from dermcir.config import to_json
from dermcir.data.cache import PREPROCESS_VERSION, preprocess_cases
from dermcir.data.cases import Case, LoadReport, category_counts, require_query_texts
from dermcir.data.folds import (
    check_enough_per_category,
    require_two_categories,
    stratified_folds,
    validation_split,
)
from dermcir.devices import exact_float32, resolve_device
from dermcir.evaluation.report import PAPER_ROWS, write_retrieval_figure, write_tables
from dermcir.evaluation.results import as_json_values, build_results, check_run_folder, environment, fold_row
from dermcir.files import claim_folder, write_json_atomic
from dermcir.metrics import retrieval_metrics
from dermcir.models import ComposedRetrievalModel
from dermcir.training.companion_pool import CompanionPool, default_workers
from dermcir.training.pipeline import (
    device_name,
    fit_companion,
    prepare_companion,
    prepare_inputs,
    run_log,
)
from dermcir.training.profiles import get_profile
from dermcir.training.trainer import (
    describe_all,
    fit,
    query_embeddings,
    seed_everything,
    target_embeddings,
    warm_up,
)

log = logging.getLogger(__name__)
METHOD = "dermcir-composed"
_DB = "image-only database (the seed's protocol)"
#: What each ablation's query is (the database side never changes).
PROTOCOLS = {
    "composed": f"image + text query, {_DB}",
    "image-only": f"image-only query (same trained models), {_DB}",
    "text-only": f"text-only query (same trained models), {_DB}",
    "composed, beta=0 (global only)": f"image + text query scored with the global term only, {_DB}",
    "composed, beta=1 (local only)": f"image + text query scored with the local term only, {_DB}",
    "composed, main model alone": f"image + text query scored by the main model without its companion, {_DB}",
    "composed, companion alone": f"image + text query scored by the frozen-backbone companion alone, {_DB}",
}


def _variants(desc_q: dict, beta: float) -> dict[str, torch.Tensor]:
    """Query embeddings of every ablation: the query modes of Fig. 1 and β ∈ {0, 0.6, 1} (Table 2)."""
    return {
        "composed": query_embeddings(desc_q["composed"], beta),
        "image-only": query_embeddings(desc_q["target"], beta),
        "text-only": query_embeddings(desc_q["text"], beta),
        "composed, beta=0 (global only)": query_embeddings(desc_q["composed"], 0.0),
        "composed, beta=1 (local only)": query_embeddings(desc_q["composed"], 1.0),
    }


def _main_embeddings(
    model: ComposedRetrievalModel, inputs, db: np.ndarray, q: np.ndarray, device: torch.device, train_cfg,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The main model's target embeddings of the database and every ablation's query embeddings.

    In exact float32 whatever ``train_cfg.amp`` says (no TF32 on CUDA), as the index and search encode: the figures reported are those of the
    vectors search would use (bf16 descriptors move scores by up to ~2e-3, enough to swap close neighbours).
    Validation during training may stay in bf16; it only picks the epoch."""
    fixed, beta = train_cfg.full_batches, model.config.beta
    with exact_float32():  # not TF32 either, which CUDA's convolutions use by default
        target = target_embeddings(describe_all(model, inputs, db, device, amp=False, kinds=("target",),
                                                full_batches=fixed)["target"])
        return target, _variants(describe_all(model, inputs, q, device, amp=False, full_batches=fixed), beta)


def _with_companion(
    model: ComposedRetrievalModel, companion, main: tuple[torch.Tensor, dict[str, torch.Tensor]], db: np.ndarray,
    q: np.ndarray, device: torch.device,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``main`` (from ``_main_embeddings``) as the index and search compute it: with a companion, its vectors joined
    to the main model's (``ComposedRetrievalModel.join_companion``), plus each model alone as an ablation."""
    target, variants = main
    if companion is None:
        return target, variants
    c_inputs, _ = companion
    # in float32, as search encodes and as CPU workers train it; its small heads cost little here, and under bf16
    # autocast its descriptors would keep only about three significant digits
    c_target = target_embeddings(describe_all(model.companion, c_inputs, db, device, kinds=("target",))["target"])
    c_variants = _variants(describe_all(model.companion, c_inputs, q, device), model.config.beta)
    joined = {name: model.join_companion(v, c_variants[name]) for name, v in variants.items()}
    # each part alone: the main part's query against the main part of the targets, the same for the companion
    zeros_c, zeros_m = torch.zeros_like(c_variants["composed"]), torch.zeros_like(variants["composed"])
    joined["composed, main model alone"] = torch.cat([variants["composed"], zeros_c], 1)
    joined["composed, companion alone"] = torch.cat([zeros_m, c_variants["composed"]], 1)
    return torch.cat([target, c_target], 1), joined


def _start_companion_pool(model, companion, workers: int | None, folds: dict, splits: dict, out_dir: Path,
                          device: torch.device, wall_deadline: float | None = None):
    """A ``CompanionPool`` already fitting every fold's companion (logging into the fold's ``companion.log``) when
    the model has a companion and ``workers`` (None: ``default_workers``) is not 0; otherwise None.
    ``wall_deadline`` (a ``time.time()`` value): when the last companions must stop training (a run's time budget).
    With fewer workers than folds the jobs run in waves, and each wave gets an equal part of the time up to it: a
    queued fold must not start at the deadline and overrun it."""
    if workers is None:
        workers = default_workers(device, len(folds)) if companion is not None else 0
    if workers == 0:
        return None
    if companion is None:
        log.warning("companion_workers=%d ignored: the model has no companion", workers)
        return None
    workers = min(workers, len(folds))
    try:
        pool = CompanionPool(model, companion, workers)
    except Exception as exc:  # noqa: BLE001 — e.g. a sandbox without process semaphores: the run fits in-process
        log.warning("companions: no CPU worker pool (%s: %s); fitted in this process instead, fold by fold",
                    type(exc).__name__, exc)
        return None
    now, waves = time.time(), math.ceil(len(folds) / workers)
    # they train on the host while the main models train on the device; the pool runs its jobs in this order
    for position, (fold, (db, _)) in enumerate(folds.items()):
        wave_end = None if wall_deadline is None else now + (position // workers + 1) / waves * (wall_deadline - now)
        pool.submit(fold, *splits[fold], db, out_dir / f"fold_{fold}" / "companion.log", wave_end)
    return pool


def _share_end(start: float, time_budget: float | None, folds_left: int, fraction: float = 0.97) -> float | None:
    """When ``fraction`` of a fold's equal share of what is left of the budget ends, as a ``time.perf_counter()``
    value (None without a budget). By default 3 % of the share is kept for the fold's final evaluation."""
    if time_budget is None:
        return None
    now = time.perf_counter()
    return now + fraction * (start + time_budget - now) / folds_left


def _check_folds(only_folds: Sequence[int] | None, n_folds: int) -> list[int]:
    """The folds to run, sorted; all of them when ``only_folds`` is None or empty."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int | np.integer) or n_folds < 2:
        # here, not in scikit-learn's split after preprocessing, and in this parameter's own name
        raise ValueError(f"n_folds must be a whole number ≥ 2 (one fold queries, the others are its database), "
                         f"got {n_folds!r}")
    if not only_folds:
        return list(range(n_folds))
    bad = [f for f in only_folds if not isinstance(f, int | np.integer) or not 0 <= f < n_folds]
    if bad:
        raise ValueError(f"only_folds: {bad} not fold numbers of a {n_folds}-fold split (expected 0..{n_folds - 1})")
    if len(set(only_folds)) != len(only_folds):
        raise ValueError(f"only_folds: {list(only_folds)} names a fold twice")
    return sorted(int(f) for f in only_folds)


def run_cv(
    cases: Sequence[Case], out_dir: str | Path, profile: str = "cpu", n_folds: int = 5, seed: int = 0,
    cache_dir: Path | None = None, progress: bool = True, device: torch.device | str | None = None,
    time_budget: float | None = None, only_folds: Sequence[int] | None = None, companion_workers: int | None = None,
    load_report: LoadReport | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Run the k-fold benchmark for the composed model and write its outputs into ``out_dir``.

    ``only_folds``: run just these folds of the ``n_folds`` split (the split itself is unchanged, and ``fit`` reseeds
    per fold, so a fold trains exactly as it does in the full run). The means are then over those folds only, and
    ``results.json`` says which ran (``folds_run``).

    ``time_budget`` (seconds, for the whole run): each fold gets an equal share of what is left when it starts, and
    its training stops early when the next epoch would overrun it (see ``fit``'s ``deadline``). Companions fitted in
    workers stop by the end of the budget in the same way (in waves, when there are fewer workers than folds); every
    training runs at least two epochs and its refit, whatever the budget.

    ``companion_workers``: with a companion, fit it for every fold in this many CPU worker processes while the main
    models train (``CompanionPool``; for a GPU run, where the companion's small steps would otherwise spend the
    GPU's time on kernel launches); each fold is scored once both are done. 0: fit each fold's companion in this
    process, before its main model. None: ``default_workers`` (none on a CPU, up to one per fold on a GPU).

    ``load_report``: the loader's report of ``cases`` (``load_derm7pt``); the rows it left out are listed with the
    images preprocessing leaves out, in ``results.json`` (``skipped``) and ``cv.log``.

    ``out_dir`` must not hold an earlier run's ``results.json``: this run rewrites it after every fold
    (:func:`~dermcir.evaluation.results.check_run_folder`).

    Returns:
        The ``results.json`` document.

    Raises:
        ValueError: a bad setting, fold or budget; ``out_dir`` holds an earlier run; too few cases for the folds.
    """
    start = time.perf_counter()
    selected = _check_folds(only_folds, n_folds)
    if companion_workers is not None and (not isinstance(companion_workers, int | np.integer) or companion_workers < 0):
        raise ValueError(f"companion_workers must be a whole number ≥ 0 or None, got {companion_workers!r}")
    if time_budget is not None and not (isinstance(time_budget, numbers.Real) and not isinstance(time_budget, bool)
                                        and 0 < time_budget < math.inf):
        raise ValueError(f"time_budget must be a finite number of seconds > 0 or None, got {time_budget!r}")
    model_cfg, train_cfg, views = get_profile(profile, seed=seed, **overrides)  # checks every setting
    check_run_folder(out_dir)
    out_dir = Path(out_dir)
    with claim_folder(out_dir, "dermcir cv"):
        check_run_folder(out_dir)  # again, now that no other run can start here: one may have written results
        device = resolve_device("auto" if device is None else device)  # a name too ("cpu"), checked against the machine
        # a copy: the caller's report stays as the loader left it
        report = load_report.copy() if load_report is not None else LoadReport()
        # What the run was, for its records: every setting it was given (views included, which neither config holds),
        # the libraries it ran on. results.json held the profile, beta and seed only, so two runs that differed by a
        # --set (views=1: mAP 95.4 against 99.1 on a small set) or a library version recorded the same things.
        settings = {"overrides": as_json_values(overrides), "views": views}
        env = environment()
        with run_log(out_dir / "cv.log", left_out=report.skipped, categories_left_out=report.categories_left_out()):
            log.info("%s profile, %d folds, seed %d; settings given: %s; views %d", profile, n_folds, seed,
                     settings["overrides"] or "none (the profile's own)", views)
            log.info("environment: %s", ", ".join(f"{k} {v}" for k, v in env.items()))
            require_query_texts(cases)  # every case is a composed query once
            require_two_categories([c.category for c in cases], report.dropped_categories)  # before any image is read
            cases, images = preprocess_cases(cases, model_cfg.image_size, cache_dir, report, progress)  # logs its skips
            cases, images = report.apply_threshold_again(cases, images)
            check_enough_per_category([c.category for c in cases], n_folds, len(report.skipped), "cv.log",
                                      validation=True, left_out=report.dropped_categories)
            labels = np.array([c.category for c in cases])
            # before the features: a split that cannot be made is refused in seconds (both take their own random state,
            # so the order leaves the run as it was)
            folds = {f: split for f, split in enumerate(stratified_folds(labels, n_folds, seed)) if f in selected}
            splits = {f: validation_split(db, labels, train_cfg.val_fraction, seed) for f, (db, _) in folds.items()}
            model_cfg.categories = list(category_counts(cases))
            seed_everything(seed)  # the heads' initial weights too: the same seed gives the same run
            model = ComposedRetrievalModel(model_cfg)
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            # which pretrained weights the run started from (a path in the settings names a file, not its contents)
            settings["pretrained"] = {part: state_digest(model.get_submodule(part)) for part in ("backbone", "text_encoder")}
            settings["model"], settings["train"] = as_json_values(vars(model_cfg)), as_json_values(vars(train_cfg))
            inputs = prepare_inputs(model, cases, images, train_cfg, views, device, cache_dir, progress)
            companion = prepare_companion(model, cases, images, train_cfg, device, cache_dir, progress, inputs)
            # companions in workers train beside the main models and must be done when the budget is: they stop by the
            # time the last fold's main model must (its 3 % margin is kept for scoring), however slow the host's cores
            wall_deadline = (None if time_budget is None
                             else time.time() + start + 0.97 * time_budget - time.perf_counter())
            pool = _start_companion_pool(model, companion, companion_workers, folds, splits, out_dir, device,
                                         wall_deadline)
            try:
                if device.type == "cuda":
                    log.info("warm-up (one-off kernel preparation) took %.0f s",
                             warm_up(model, inputs, train_cfg, device, len(model_cfg.categories)))
                if pool is not None and not pool.started():
                    log.warning("companions: fitted in this process instead, fold by fold")
                    pool.close()
                    pool = None
                prep_seconds = time.perf_counter() - start
                log.info("prepared %d cases in %.0f s (%s profile, device %s)", len(cases), prep_seconds, profile,
                         device)
                if time_budget is not None and time_budget <= prep_seconds:
                    raise ValueError(f"time budget {time_budget:.0f} s is used up by preparation ({prep_seconds:.0f} s)")
            except BaseException:  # stop the workers' jobs rather than wait for them
                if pool is not None:
                    pool.close(terminate=True)
                raise
        rows: list[dict] = []
        ablations: dict[str, list[dict]] = {}
        examples: list[dict] = []
        training: list[dict] = []

        def finish_fold(fold: int, main_embeddings, result, c_result) -> None:
            """Score the fold's queries (main model and companion joined) and write its figures."""
            db, q = folds[fold]
            fold_dir = out_dir / f"fold_{fold}"
            training.append({"fold": fold, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                             "stopped_by": result.stopped_by, "val_mAP": result.best_val_map,
                             "train_seconds": result.seconds})
            if c_result is not None:
                training[-1].update({"companion_best_epoch": c_result.best_epoch,
                                     "companion_epochs_run": c_result.epochs_run,
                                     "companion_stopped_by": c_result.stopped_by,
                                     "companion_val_mAP": c_result.best_val_map,
                                     "companion_train_seconds": c_result.seconds})
            target, variants = _with_companion(model, companion, main_embeddings, db, q, device)
            for name, query in variants.items():
                scores = (query @ target.T).cpu().numpy()
                row = fold_row(fold, scores, labels[q], labels[db])
                if name == "composed":  # the main result, not an ablation of itself
                    rows.append(row)
                    examples.append({"fold": fold, "query": q, "database": db, "scores": scores})
                else:
                    ablations.setdefault(name, []).append(row)
            log.info("fold %d: %s", fold, {k: round(v, 2) for k, v in rows[-1].items() if k.startswith(("mAP", "Acc"))})
            to_json(model_cfg, fold_dir / "model_config.json")
            to_json(train_cfg, fold_dir / "train_config.json")
            write_json_atomic(fold_dir / "metrics.json", {
                "fold": rows[-1], "best_epoch": result.best_epoch, "val_mAP": result.best_val_map,
                "epochs_run": result.epochs_run, "stopped_by": result.stopped_by, "train_seconds": result.seconds,
                "history": result.history,
                **({"companion": {"best_epoch": c_result.best_epoch, "val_mAP": c_result.best_val_map,
                                  "epochs_run": c_result.epochs_run, "stopped_by": c_result.stopped_by,
                                  "history": c_result.history}} if c_result is not None else {}),
            })

        def write_results(complete: bool) -> dict[str, Any]:
            """``results.json`` and ``tables.md`` of the folds finished so far (atomically replaced; ``complete``: the
            run has ended), so that a run stopped part-way (a device's time limit) still leaves every finished fold's
            figures; ``retrievals.png`` once, with the first finished fold."""
            doc = build_results(
                METHOD, rows, profile=profile, beta=model_cfg.beta, n_cases=len(cases), n_folds=n_folds, seed=seed,
                device=device_name(device),
                categories=category_counts(cases), seconds=time.perf_counter() - start, prepare_seconds=prep_seconds,
                time_budget=time_budget, training=training, skipped=report.skipped,
                categories_left_out=report.categories_left_out(),
                folds_run=selected if complete else [r["fold"] for r in rows], complete=complete,
                protocol=PROTOCOLS["composed"], settings=settings, preprocess_version=PREPROCESS_VERSION,
                environment=env,
                ablations={name: build_results(name, r, protocol=PROTOCOLS[name]) for name, r in ablations.items()},
            )
            write_json_atomic(out_dir / "results.json", doc)
            write_tables(doc, out_dir / "tables.md", PAPER_ROWS)
            if len(examples) == 1 and not complete:  # every run's last write follows a fold's own
                write_retrieval_figure(examples[0], cases, images, labels, out_dir / "retrievals.png")
            return doc

        def collect_and_finish(fold: int, main_embeddings, result) -> None:
            with run_log(out_dir / f"fold_{fold}" / "train.log", append=True):
                c_result = pool.collect(fold, device, progress)
                log.info("companion: best epoch %d of %d (stopped by %s), validation mAP %.2f, %.0f s (fold %d)",
                         c_result.best_epoch, c_result.epochs_run, c_result.stopped_by, c_result.best_val_map,
                         c_result.seconds, fold)
                finish_fold(fold, main_embeddings, result, c_result)
            write_results(complete=False)

        waiting: list[tuple] = []  # folds whose companion a worker is still fitting, in fold order
        try:
            for fold, (db, q) in folds.items():
                with run_log(out_dir / f"fold_{fold}" / "train.log"):
                    model.load_state_dict(initial)
                    train_idx, val_idx = splits[fold]
                    log.info("fold %d: %d queries, %d database (%d train + %d validation)", fold, len(q), len(db),
                             len(train_idx), len(val_idx))
                    folds_left = sum(f >= fold for f in selected)
                    # in this process the companion goes first, so that the main model's share of the time budget is
                    # what is really left; it may take at most half the fold's share, so that a companion slower than
                    # expected (its small steps cost launch overhead on a GPU) cannot leave the main model nothing
                    c_result = (fit_companion(model, companion, train_idx, val_idx, device, progress, refit_idx=db,
                                              deadline=_share_end(start, time_budget, folds_left, 0.5))
                                if pool is None else None)
                    deadline = _share_end(start, time_budget, folds_left)
                    result = fit(model, inputs, train_idx, val_idx, train_cfg, device, len(model_cfg.categories),
                                 progress, refit_idx=db, deadline=deadline)
                    main_embeddings = _main_embeddings(model, inputs, db, q, device, train_cfg)
                    if pool is None:
                        finish_fold(fold, main_embeddings, result, c_result)
                        write_results(complete=False)
                    else:
                        # logged now, so that a run stopped while its companions are still fitting keeps these figures
                        # (they are the ablation "composed, main model alone" of the finished run)
                        target, variants = main_embeddings
                        alone = retrieval_metrics((variants["composed"] @ target.T).cpu().numpy(), labels[q], labels[db])
                        log.info("fold %d, main model alone (its companion not yet collected): %s", fold,
                                 {k: round(v, 2) for k, v in alone.items()})
                        waiting.append((fold, main_embeddings, result))
                # folds whose companion is already back are finished (and written) now, in fold order, not after
                # the last main model: a run stopped later keeps them
                while waiting and pool.ready(waiting[0][0]):
                    collect_and_finish(*waiting.pop(0))
            while waiting:
                collect_and_finish(*waiting.pop(0))
            doc = write_results(complete=True)
        except BaseException:  # an error or an interrupt: stop the workers' jobs rather than wait for them
            if pool is not None:
                pool.close(terminate=True)
            raise
        if pool is not None:
            pool.close()
        log.info("cv done in %.0f s: %s", doc["seconds"], {k: round(v, 1) for k, v in doc["mean"].items()})
        return doc
