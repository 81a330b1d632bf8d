"""The cached backbone features (``CachedFeatures``): keyed by what the backbone sees, pooled as search pools, written
atomically."""

import os

import numpy as np
import pytest
import torch

from dermcir.config import ModelConfig
from dermcir.data import load_derm7pt
from dermcir.data.cache import preprocess_cases
from dermcir.models import ComposedRetrievalModel
from dermcir.training.features import CachedFeatures

from .conftest import TINY, write_release


def _model(**overrides) -> ComposedRetrievalModel:
    torch.manual_seed(0)
    return ComposedRetrievalModel(ModelConfig(**{**TINY, **overrides}, categories=["nevus"]), pretrained=False).eval()


@pytest.fixture
def three_cases(tmp_path):
    root = write_release(tmp_path / "r", [{"diagnosis": "clark nevus"}] * 3)
    return load_derm7pt(root, min_cases=1)[0]


def test_a_preprocessing_change_misses_the_feature_cache(three_cases, tmp_path, monkeypatch):
    from dermcir.data import cache

    model = _model()
    cases, images = preprocess_cases(three_cases, 64, tmp_path, progress=False)
    CachedFeatures.build(model, cases, images, cache_dir=tmp_path, progress=False)
    stored = set((tmp_path / "features").glob("*.safetensors"))
    assert len(stored) == 3
    CachedFeatures.build(model, cases, images, cache_dir=tmp_path, progress=False)
    assert set((tmp_path / "features").glob("*.safetensors")) == stored  # the same pixels: all hits

    # a new preprocessing (here: no border removal) comes with a new PREPROCESS_VERSION; the images change, and so
    # must the backbone maps computed from them
    real = cache.preprocess
    monkeypatch.setattr(cache, "PREPROCESS_VERSION", "border-test")
    monkeypatch.setattr(cache, "preprocess", lambda rgb, size: real(rgb, size, crop_border=False))
    cases, changed = preprocess_cases(three_cases, 64, tmp_path, progress=False)
    assert not np.array_equal(changed, images)
    fresh = CachedFeatures.build(model, cases, changed, cache_dir=tmp_path, progress=False)
    assert len(set((tmp_path / "features").glob("*.safetensors")) - stored) == 3
    with torch.no_grad():
        expected = model.image_features(changed)
    for got, want in zip(fresh.maps[0], expected, strict=True):
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_change_of_the_feature_code_or_of_timm_misses_the_feature_cache(three_cases, tmp_path, monkeypatch):
    """The same weights and pixels give other maps when the code that runs the backbone changes; the key has the
    cache's own format and timm's version for that."""
    import timm

    model = _model()
    cases, images = preprocess_cases(three_cases, 64, tmp_path, progress=False)
    CachedFeatures.build(model, cases, images, cache_dir=tmp_path, progress=False)
    seen = set((tmp_path / "features").glob("*.safetensors"))
    monkeypatch.setattr(CachedFeatures, "FORMAT", "maps-v2")
    CachedFeatures.build(model, cases, images, cache_dir=tmp_path, progress=False)
    assert len(set((tmp_path / "features").glob("*.safetensors")) - seen) == 3
    seen = set((tmp_path / "features").glob("*.safetensors"))
    monkeypatch.setattr(timm, "__version__", "0.0.1")
    CachedFeatures.build(model, cases, images, cache_dir=tmp_path, progress=False)
    assert len(set((tmp_path / "features").glob("*.safetensors")) - seen) == 3


@pytest.mark.parametrize("grid", [None, 3, 6, 32])
def test_a_grid_the_cached_maps_cannot_match_search_with_is_refused(three_cases, tmp_path, grid):
    cases, images = preprocess_cases(three_cases, 64, tmp_path, progress=False)
    with pytest.raises(ValueError, match=rf"grid={grid}: .* needs a grid that divides 16 \(1, 2, 4, 8, 16\)"):
        CachedFeatures.build(_model(grid=grid), cases, images, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "features").exists()  # refused before any backbone pass


def test_maps_that_do_not_pool_evenly_to_the_cache_grid_are_refused(three_cases, tmp_path):
    cases, images = preprocess_cases(three_cases, 224, tmp_path, progress=False)  # maps of side 28, 14, 7
    with pytest.raises(ValueError, match=r"image_size=224: backbone 'lite0' gives maps of side \[28\]"):
        CachedFeatures.build(_model(image_size=224), cases, images, cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("grid", [2, 4, 8])
def test_cached_maps_are_those_search_computes(three_cases, tmp_path, grid):
    """At 256 px the first level's maps (32×32) are pooled to 16 in the cache, then to the grid: as search pools."""
    model = _model(image_size=256, grid=grid)
    cases, images = preprocess_cases(three_cases, 256, tmp_path, progress=False)
    cached = CachedFeatures.build(model, cases, images, cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        expected = model.image_features(images)
    for got, want in zip(cached.maps[0], expected, strict=True):
        assert got.shape[-1] == grid
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_a_failed_cache_write_costs_the_cache_not_the_run(three_cases, tmp_path, monkeypatch, caplog):
    """A full disk: the maps are used unsaved, with one warning, and no temporary file is left behind (temporary
    files are the writer's own, as two processes may fill one cache). Before, the run stopped with the OSError."""
    cases, images = preprocess_cases(three_cases, 64, tmp_path, progress=False)
    good = CachedFeatures.build(_model(), cases, images, cache_dir=tmp_path / "good", progress=False)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with caplog.at_level("WARNING", logger="dermcir.training.features"):
        got = CachedFeatures.build(_model(), cases, images, cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "features").iterdir()) == []
    for a, b in zip(got.maps[0], good.maps[0], strict=True):
        torch.testing.assert_close(a, b)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "3 case(s)" in warnings[0]


def test_a_cache_path_that_is_a_file_is_warned_about_not_fatal(three_cases, tmp_path, caplog):
    cases, images = preprocess_cases(three_cases, 64, tmp_path / "images", progress=False)
    (tmp_path / "afile").write_text("")
    with caplog.at_level("WARNING", logger="dermcir.training.features"):
        got = CachedFeatures.build(_model(), cases, images, cache_dir=tmp_path / "afile", progress=False)
    assert len(got) == 3 and "could not write backbone features" in caplog.text


def test_damaged_cache_entries_are_computed_again(three_cases, tmp_path, caplog):
    cases, images = preprocess_cases(three_cases, 64, tmp_path, progress=False)
    good = CachedFeatures.build(_model(), cases, images, cache_dir=tmp_path, progress=False)
    entries = sorted((tmp_path / "features").glob("*.safetensors"))
    for entry in entries[:2]:
        entry.write_bytes(entry.read_bytes()[:20])  # cut short, as by a crash of another tool or a full disk
    with caplog.at_level("WARNING", logger="dermcir.training.features"):
        again = CachedFeatures.build(_model(), cases, images, cache_dir=tmp_path, progress=False)
    assert "2 cached backbone feature file(s) could not be read" in caplog.text and str(entries[0].parent) in caplog.text
    for a, b in zip(again.maps[0], good.maps[0], strict=True):
        torch.testing.assert_close(a, b)
    caplog.clear()
    CachedFeatures.build(_model(), cases, images, cache_dir=tmp_path, progress=False)  # rewritten: read cleanly
    assert "could not be read" not in caplog.text

def test_computed_and_cached_maps_are_bit_identical(three_cases, tmp_path):
    """A run that computes the maps trains on exactly what a run that loads them does (values and memory layout);
    the baselines once scored differently on the two paths."""
    cases, images = preprocess_cases(three_cases, 64, tmp_path, progress=False)
    computed = CachedFeatures.build(_model(), cases, images, n_views=2, cache_dir=tmp_path, progress=False)
    loaded = CachedFeatures.build(_model(), cases, images, n_views=2, cache_dir=tmp_path, progress=False)
    for view_c, view_l in zip(computed.maps, loaded.maps, strict=True):
        for a, b in zip(view_c, view_l, strict=True):
            assert torch.equal(a, b) and a.stride() == b.stride()
