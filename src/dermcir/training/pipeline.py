"""From cases to a trained checkpoint: model construction, input preparation and ``train_on_cases``."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermcir.checkpoint import save_checkpoint
from dermcir.checkpoint_folder import check_checkpoint_target, checkpoint_lock
from dermcir.config import ModelConfig, TrainConfig
from dermcir.data.cache import preprocess_cases
from dermcir.data.cases import Case, LoadReport, category_counts, require_query_texts
from dermcir.data.folds import require_two_categories, validation_split
from dermcir.devices import resolve_device
from dermcir.models import ComposedRetrievalModel
from dermcir.training.features import CachedFeatures, DeviceImages, text_tokens
from dermcir.training.profiles import companion_training, get_profile
from dermcir.training.trainer import FitResult, Inputs, fit, seed_everything

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    return resolve_device("auto")


def device_name(device: torch.device) -> str:
    """``"cpu"`` or e.g. ``"cuda (NVIDIA H100 80GB HBM3)"``: results name the card they were measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def frozen_parts(profile: str, model: ComposedRetrievalModel | None = None) -> tuple[str, ...]:
    """Submodules a checkpoint stores by reference: the text encoder always, the backbone when it was not trained,
    and a companion's backbone (never trained; its text encoder is the main model's)."""
    parts = ("backbone", "text_encoder") if profile == "cpu" else ("text_encoder",)
    if model is not None and model.companion is not None:
        parts += ("companion.backbone",)
    return parts


def prepare_inputs(
    model: ComposedRetrievalModel, cases: Sequence[Case], images: np.ndarray, train_cfg: TrainConfig, views: int,
    device: torch.device, cache_dir: Path | None = None, progress: bool = True, text_of: Inputs | None = None,
) -> Inputs:
    """Feature source for the profile, frozen text tokens and category ids of ``cases``.

    ``text_of``: inputs of the same cases whose text tokens and category ids to reuse (a companion shares its main
    model's text encoder, so encoding the texts again would give the same tokens)."""
    model.to(device).eval()
    if train_cfg.profile == "cpu":
        source = CachedFeatures.build(model, cases, images, n_views=views, cache_dir=cache_dir, progress=progress)
    else:
        source = DeviceImages(model, images, device, augment=train_cfg.augment)
    if text_of is not None:
        return Inputs(source, text_of.tokens, text_of.pad, text_of.labels).on(device)
    tokens, pad = text_tokens(model, [c.text for c in cases])
    ids = {c: i for i, c in enumerate(model.config.categories)}
    labels = torch.tensor([ids[c.category] for c in cases])
    return Inputs(source, tokens, pad, labels).on(device)


def prepare_companion(
    model: ComposedRetrievalModel, cases: Sequence[Case], images: np.ndarray, main: TrainConfig,
    device: torch.device, cache_dir: Path | None = None, progress: bool = True, main_inputs: Inputs | None = None,
) -> tuple[Inputs, TrainConfig] | None:
    """Inputs (cached frozen-backbone maps) and training settings of ``model.companion`` (whose main model trains
    with ``main``); None without a companion. ``main_inputs``: the main model's inputs, whose text tokens the
    companion reuses."""
    if model.companion is None:
        return None
    train_cfg, views = companion_training(main)
    inputs = prepare_inputs(model.companion, cases, images, train_cfg, views, device, cache_dir, progress,
                            text_of=main_inputs)
    return inputs, train_cfg


def fit_companion(
    model: ComposedRetrievalModel, companion: tuple[Inputs, TrainConfig] | None, train_idx: np.ndarray,
    val_idx: np.ndarray, device: torch.device, progress: bool = True, refit_idx: np.ndarray | None = None,
    deadline: float | None = None,
) -> FitResult | None:
    """Train ``model.companion`` on its own (early stopping on the same validation split); None without one.
    ``deadline``: as ``fit``'s."""
    if companion is None:
        return None
    inputs, train_cfg = companion
    result = fit(model.companion, inputs, train_idx, val_idx, train_cfg, device, len(model.config.categories),
                 progress, refit_idx=refit_idx, deadline=deadline)
    log.info("companion: best epoch %d of %d (stopped by %s), validation mAP %.2f, %.0f s", result.best_epoch,
             result.epochs_run, result.stopped_by, result.best_val_map, result.seconds)
    return result


@contextmanager
def run_log(path: Path, append: bool = False, left_out: Sequence[tuple[str, str]] = (),
            categories_left_out: dict[str, Any] | None = None):
    """Copy this package's log records into ``path`` for the duration of a run (after what it holds: ``append``).

    ``left_out``: (row or file, reason) pairs left out before the run began (the loader's), written first, in the
    loader's words. They go into the file only: the loader logged each one already, so the console shows every row
    once. ``categories_left_out`` (``LoadReport.categories_left_out``): the categories the loader's threshold left
    out, written after them when there are any. A run that raises ends its file with the error and its traceback.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a" if append else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for what, why in left_out:
        handler.handle(log.makeRecord(log.name, logging.WARNING, __file__, 0, "skipping %s: %s", (what, why), None))
    if categories_left_out and categories_left_out["categories"]:
        handler.handle(log.makeRecord(
            log.name, logging.INFO, __file__, 0, "categories left out (fewer than %s cases or not selected): %s",
            (categories_left_out["min_cases"], categories_left_out["categories"]), None))
    root = logging.getLogger("dermcir")
    root.addHandler(handler)
    old_level, old_propagate, shown = root.level, root.propagate, root.getEffectiveLevel()
    # The file takes INFO records; the caller's own handlers (a console set to WARNING) get only what they got
    # before: lowering the level alone would send them every epoch's line.
    forward = _ForwardFrom(shown) if shown > logging.INFO and root.propagate else None
    if forward is not None:
        root.addHandler(forward)
        root.propagate = False
    root.setLevel(min(shown, logging.INFO))
    try:
        yield
    except BaseException as exc:
        # the run's own record ends with what stopped it, traceback included: the console gives a ValueError one
        # line, and on a one-shot device run this file may be all there is to go on
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "run stopped by %s: %s",
                                      (type(exc).__name__, exc), sys.exc_info()))
        raise
    finally:
        root.removeHandler(handler)
        if forward is not None:
            root.removeHandler(forward)
        root.setLevel(old_level)
        root.propagate = old_propagate
        handler.close()


class _ForwardFrom(logging.Handler):
    """Passes the records of its level and above on to the handlers above the ``dermcir`` logger, as propagation
    would with the logger at that level."""

    def emit(self, record: logging.LogRecord) -> None:
        logger, found = logging.getLogger("dermcir").parent, False
        while logger is not None:
            for h in logger.handlers:
                found = True
                if record.levelno >= h.level:
                    h.handle(record)
            logger = logger.parent if logger.propagate else None
        if not found and logging.lastResort is not None and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)  # what logging does when no handler is configured anywhere


def train_on_cases(
    cases: Sequence[Case], out_dir: str | Path, profile: str = "cpu", cache_dir: Path | None = None,
    progress: bool = True, device: torch.device | str | None = None, load_report: LoadReport | None = None,
    overwrite: bool = False, **overrides,
) -> Path:
    """Train one model on all ``cases`` (a stratified validation split held out for early stopping) and save it.

    ``load_report``: the loader's report of ``cases``; what it left out is listed in ``train.log`` and the
    checkpoint's ``skipped`` with what preprocessing leaves out. ``overwrite``: replace a checkpoint already in
    ``out_dir`` (refused by default: an index built with it could no longer be searched or updated).

    Returns:
        ``out_dir``, a checkpoint folder (``model.safetensors``, ``config.json``, ``train.log``) for indexing.
    """
    out_dir = Path(out_dir)
    device = resolve_device("auto" if device is None else device)  # a name too ("cpu"), checked against the machine
    model_cfg, train_cfg, views = get_profile(profile, **overrides)
    # before the training, not after it: saving replaces the whole folder, and must be able to write it
    check_checkpoint_target(out_dir, overwrite=overwrite)
    # held for the whole run: a second run into the same folder is refused now (both ran, and the later one replaced
    # the earlier one's checkpoint without a word, or their saves broke each other's)
    with checkpoint_lock(out_dir, wait=False):
        check_checkpoint_target(out_dir, overwrite=overwrite)  # again: a run may have saved there meanwhile
        return _train_into(cases, out_dir, model_cfg, train_cfg, views, cache_dir, progress, device, load_report,
                           overwrite)


def _train_into(cases: Sequence[Case], out_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig, views: int,
                cache_dir: Path | None, progress: bool, device: torch.device, load_report: LoadReport | None,
                overwrite: bool) -> Path:
    report = load_report.copy() if load_report is not None else LoadReport()  # the caller's stays unchanged
    tmp_log = Path(tempfile.mkdtemp()) / "train.log"
    try:
        with run_log(tmp_log, left_out=report.skipped, categories_left_out=report.categories_left_out()):
            require_query_texts(cases)  # before any image is read
            require_two_categories([c.category for c in cases], report.dropped_categories)
            # preprocessing logs what it leaves out
            cases, images = preprocess_cases(cases, model_cfg.image_size, cache_dir, report, progress)
            cases, images = report.apply_threshold_again(cases, images)
            if len(cases) < 4:
                raise ValueError(f"only {len(cases)} usable cases; training needs at least a few per category")
            require_two_categories([c.category for c in cases], report.dropped_categories)  # unreadable images
            # before the backbone's features: a category the split cannot divide is refused in seconds
            idx = np.arange(len(cases))
            train_idx, val_idx = validation_split(idx, [c.category for c in cases], train_cfg.val_fraction,
                                                  train_cfg.seed)
            model_cfg.categories = list(category_counts(cases))
            # the heads' initial weights too: the same seed gives the same checkpoint
            seed_everything(train_cfg.seed)
            model = ComposedRetrievalModel(model_cfg)
            inputs = prepare_inputs(model, cases, images, train_cfg, views, device, cache_dir, progress)
            result: FitResult = fit(model, inputs, train_idx, val_idx, train_cfg, device, len(model_cfg.categories),
                                    progress, refit_idx=idx)
            log.info("best epoch %d, validation mAP %.2f, %.0f s", result.best_epoch, result.best_val_map,
                     result.seconds)
            companion = prepare_companion(model, cases, images, train_cfg, device, cache_dir, progress, inputs)
            companion_result = fit_companion(model, companion, train_idx, val_idx, device, progress, refit_idx=idx)
            # inside the log: a save that fails (a full disk) ends train.failed.log with its error
            # the train config is what decided whether the backbone trained (``fit`` reads its profile), so it
            # decides what the checkpoint stores by reference
            save_checkpoint(model.cpu(), out_dir, frozen=frozen_parts(train_cfg.profile, model), extra={
                "train": train_cfg.__dict__, "best_epoch": result.best_epoch, "val_mAP": result.best_val_map,
                "history": result.history, "n_cases": len(cases), "skipped": report.skipped,
                "categories_left_out": report.categories_left_out(),
                **({"companion": {"best_epoch": companion_result.best_epoch,
                                  "val_mAP": companion_result.best_val_map,
                                  "history": companion_result.history}} if companion_result is not None else {}),
            }, overwrite=overwrite)
    except BaseException:
        # the failed run's log is kept beside what the folder holds (a previous checkpoint stays whole)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp_log), out_dir / "train.failed.log")
        except OSError as exc:  # the folder cannot take it: the run's own error is what the caller must see
            log.warning("could not keep the failed run's log in %s: %s", out_dir, exc)
        raise
    else:
        shutil.move(str(tmp_log), out_dir / "train.log")
    finally:
        shutil.rmtree(tmp_log.parent, ignore_errors=True)
    return out_dir


