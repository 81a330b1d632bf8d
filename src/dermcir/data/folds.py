"""Seeded, deterministic splits: the protocol's stratified folds and the validation split for early stopping."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split


def stratified_folds(labels: Sequence[str], n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(database_idx, query_idx)`` per fold: ``StratifiedKFold(n_folds, shuffle=True, random_state=seed)``.

    This is the split of the reference results (``shared/REFERENCE.md``), so numbers are comparable across methods.
    """
    labels = np.asarray(labels)
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(db, q) for db, q in skf.split(np.zeros(len(labels)), labels)]


def require_two_categories(labels: Sequence[str], left_out: Mapping[str, int] | None = None) -> None:
    """Retrieval by category needs two categories at least: with one, every case is relevant to every query, the
    loss is 0 and every figure 100 %, which a run would otherwise report as a result.

    ``left_out``: the categories the loader's threshold left out (category -> cases), named in the message.
    """
    present = Counter(str(label) for label in labels)
    if len(present) >= 2 or not present:
        return
    (only, n), = present.items()
    also = ""
    if left_out:
        also = "; left out by the category threshold (--min-cases): " + ", ".join(
            f"{name} ({count})" for name, count in sorted(left_out.items(), key=lambda item: -item[1]))
    raise ValueError(
        f"only one category is left ({only!r}: {n} cases){also}; retrieval by category needs at least two (with one, "
        "every case is relevant to every query: the loss is 0 and every figure 100 %)"
    )


def check_enough_per_category(
    labels: Sequence[str], n_folds: int, n_skipped: int, records: str, validation: bool = False,
    left_out: Mapping[str, int] | None = None,
) -> None:
    """Every category needs a case in every fold (a query of a category absent from the database has no answer, and
    one absent from a fold leaves the split short); say so plainly when left-out rows or images took that away.

    Two categories at least (:func:`require_two_categories`; ``left_out``: the categories the threshold left out).
    ``records``: where the left-out rows are listed (the run's log), for the message. ``validation``: each fold's
    database is split again for early stopping (:func:`validation_split`), which needs two cases of every category
    there; checked here, before any feature is computed, rather than by scikit-learn in the first fold.
    """
    if not len(labels):
        raise ValueError(f"no usable cases: all {n_skipped} rows were left out (each is listed above, and in {records})")
    require_two_categories(labels, left_out)
    categories, counts = np.unique(np.asarray(labels), return_counts=True)
    few = {str(c): int(n) for c, n in zip(categories, counts, strict=True) if n < n_folds}
    if few:
        raise ValueError(f"categories with fewer usable cases than the {n_folds} folds: {few} ({n_skipped} rows were "
                         f"left out, each listed above and in {records}); every fold needs a query of every category")
    # a fold's database holds at least n - ceil(n / n_folds) cases of a category of n (stratified folds)
    short = {str(c): int(n) for c, n in zip(categories, counts, strict=True) if n - math.ceil(n / n_folds) < 2}
    if validation and short:
        need = next(n for n in range(n_folds, 4 * n_folds) if n - math.ceil(n / n_folds) >= 2)
        raise ValueError(
            f"categories with too few usable cases for {n_folds} folds with a validation split: {short}; each fold's "
            f"database needs 2 cases of every category for the stratified validation split, so {need} per category "
            f"here ({n_skipped} rows were left out, each listed above and in {records}); raise --min-cases to leave "
            "such a category out, or use more folds"
        )


def validation_split(
    indices: np.ndarray, labels: Sequence[str], fraction: float = 0.15, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split training indices into ``(train, validation)``, stratified by label; the test fold is never touched."""
    labels = np.asarray(labels)[indices]
    categories, counts = np.unique(labels, return_counts=True)
    single = [str(c) for c, n in zip(categories, counts, strict=True) if n < 2]
    if single:  # said in our terms, not scikit-learn's ("the least populated class in y has only 1 member")
        raise ValueError(
            f"categories with a single training case: {single}; the stratified validation split needs 2 of each "
            "(raise --min-cases to leave such a category out)"
        )
    # Stratification needs at least one validation case per category, even for tiny collections.
    n_val = max(math.ceil(fraction * len(indices)), len(set(labels.tolist())))  # ceil: as scikit-learn rounds
    if len(indices) - n_val < len(categories):  # the training part needs a case of every category too
        raise ValueError(
            f"val_fraction={fraction} leaves {len(indices) - n_val} of {len(indices)} cases for training, fewer than "
            f"the {len(categories)} categories; a stratified validation split needs a case of each on both sides "
            "(lower val_fraction, or give more cases)"
        )
    train, val = train_test_split(indices, test_size=n_val, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(val)
