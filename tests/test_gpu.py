"""Checks that need CUDA (skipped elsewhere; CI has no GPU). Run them on a device machine before a long GPU benchmark
with `python -m pytest -q tests/test_gpu.py`; where the MiniLM PyPI package is missing (the device machine), prefix
`DERMCIR_TEST_TEXT_FOLDER=gpu_payload/minilm`, as scripts/gpu_cv.sh does."""

import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from dermcir.data import load_derm7pt
from dermcir.data.cache import preprocess_cases
from dermcir.models import ComposedRetrievalModel
from dermcir.training import get_profile, prepare_inputs
from dermcir.training.trainer import fit

from .conftest import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _text_settings() -> dict:
    """The device machine lacks the MiniLM package: scripts/gpu_cv.sh points the tests at the payload's copy (its
    tokenizer and config; the weights stay random here)."""
    folder = os.environ.get("DERMCIR_TEST_TEXT_FOLDER")
    return {"text_encoder": "bert", "text_weights": folder} if folder else {}


def _gpu_setup(toy_release):
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    cases, images = preprocess_cases(cases, 64, progress=False)
    model_cfg, train_cfg, views = get_profile("gpu", **{**TINY, "grid": None, "refit_epochs": 0, "patience": 10,
                                                        **_text_settings()})
    model_cfg.categories = sorted({c.category for c in cases})
    model = ComposedRetrievalModel(model_cfg, pretrained=False)
    device = torch.device("cuda")
    return model, prepare_inputs(model, cases, images, train_cfg, views, device, progress=False), train_cfg, device


def _sync_warnings(model, inputs, cfg, device, n: int) -> int:
    idx = np.arange(n)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, inputs, idx[::2], idx[1::2], cfg, device, 3, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def test_training_steps_do_not_wait_for_the_gpu(toy_release):
    """Host syncs per epoch must not grow with the number of steps (the issue: no per-step host syncs)."""
    model, inputs, cfg, device = _gpu_setup(toy_release)
    few = _sync_warnings(model, inputs, replace(cfg, epochs=1, batch_size=6), device, len(inputs.labels))
    many = _sync_warnings(model, inputs, replace(cfg, epochs=1, batch_size=2), device, len(inputs.labels))
    assert many == few, f"{many} syncs with 3x the steps vs {few}: a step waits for the GPU"


def test_gpu_profile_trains_on_the_device(toy_release):
    model, inputs, cfg, device = _gpu_setup(toy_release)
    idx = np.arange(len(inputs.labels))
    result = fit(model, inputs, idx[::2], idx[1::2], replace(cfg, epochs=2, batch_size=4), device, 3, progress=False)
    assert result.epochs_run == 2 and np.isfinite(result.history[-1]["loss"])
    assert next(model.backbone.parameters()).device.type == "cuda"
