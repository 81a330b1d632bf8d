"""The structured metadata as features: one-hot checklist fields, and their prediction from images.

Only :data:`dermcir.data.text.CHECKLIST_FIELDS` are read, so the diagnosis, management, diagnostic difficulty and
seven-point score can never become features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from dermcir.data.cases import Case
from dermcir.data.text import CHECKLIST_FIELDS

log = logging.getLogger(__name__)


def field_slices() -> dict[str, slice]:
    """Where each checklist field's one-hot block sits in the metadata vector."""
    out, start = {}, 0
    for name, (_phrase, values) in CHECKLIST_FIELDS.items():
        out[name] = slice(start, start + len(values))
        start += len(values)
    return out


def metadata_onehot(cases: Sequence[Case]) -> np.ndarray:
    """``(N, D)`` float32 one-hot of every checklist field; a missing or unknown value leaves its block at zero."""
    slices = field_slices()
    width = max(s.stop for s in slices.values())
    out = np.zeros((len(cases), width), np.float32)
    unknown: set[tuple[str, str]] = set()
    for i, case in enumerate(cases):
        for name, (_phrase, values) in CHECKLIST_FIELDS.items():
            value = case.fields.get(name)
            if value is None:
                continue
            if value in values:
                out[i, slices[name].start + values.index(value)] = 1.0
            else:
                unknown.add((name, value))
    if unknown:
        log.warning("checklist values outside the known vocabulary were left out of the one-hot: %s", sorted(unknown))
    return out


def predict_metadata(
    features: np.ndarray, metadata: np.ndarray, fit_idx: np.ndarray, n_splits: int = 5, pca_dim: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """Cross-fitted probabilities of every checklist value for the ``fit_idx`` rows, from image features alone.

    A database case must be represented by its image only; a predictor fitted on a case and applied to the same
    case would hand its true metadata back. So every row gets its probabilities from a model fitted on the other
    ``n_splits - 1`` parts of ``fit_idx`` (out-of-fold prediction).

    Args:
        features: ``(N, F)`` image features of all cases.
        metadata: ``(N, D)`` one-hot metadata (read for ``fit_idx`` rows only).
        fit_idx: the rows to fit on and predict for (the database).
        n_splits: cross-fitting parts.
        pca_dim: image features are reduced to this many components first (fitted inside each part).
        seed: the split's seed.

    Returns:
        ``(len(fit_idx), D)`` float32: per field, a probability block summing to 1 (or zeros where the field was
        never observed in training).
    """
    if len(fit_idx) < n_splits:
        raise ValueError(f"need at least {n_splits} database cases to cross-fit, got {len(fit_idx)}")
    out = np.zeros((len(fit_idx), metadata.shape[1]), np.float32)
    x_all, y_all = features[fit_idx], metadata[fit_idx]
    for fit_rows, pred_rows in KFold(n_splits, shuffle=True, random_state=seed).split(x_all):
        out[pred_rows] = predict_fields(x_all[fit_rows], y_all[fit_rows], x_all[pred_rows], pca_dim, seed)
    return out


def predict_fields(
    x_fit: np.ndarray, y_fit: np.ndarray, x_pred: np.ndarray, pca_dim: int = 64, seed: int = 0
) -> np.ndarray:
    """Per checklist field, a multinomial logistic regression from image features to the field's value."""
    out = np.zeros((len(x_pred), y_fit.shape[1]), np.float32)
    n_comp = max(1, min(pca_dim, x_fit.shape[1], len(x_fit) - 1))
    # Whitened components keep the logistic regressions well conditioned (fast, converged lbfgs).
    reduce = make_pipeline(StandardScaler(), PCA(n_comp, whiten=True, random_state=seed)).fit(x_fit)
    z_fit, z_pred = reduce.transform(x_fit), reduce.transform(x_pred)
    for sl in field_slices().values():
        block = y_fit[:, sl]
        observed = block.sum(axis=1) > 0
        classes = np.unique(block[observed].argmax(axis=1)) if observed.any() else np.array([], int)
        if len(classes) == 0:
            continue  # no training case has this field: leave it unknown
        if len(classes) == 1:
            out[:, sl.start + classes[0]] = 1.0  # a constant field predicts itself
            continue
        clf = LogisticRegression(max_iter=500, C=0.5).fit(z_fit[observed], block[observed].argmax(axis=1))
        out[:, sl.start + clf.classes_] = clf.predict_proba(z_pred)
    return out
