"""The re-implemented baselines on tiny synthetic data: registry, shapes, determinism, perfect retrieval of a perfectly
separable toy set, the GPU code path (run on the CPU), the end-to-end fold runner, and the helpers they rely on."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dermcir.baselines import (
    IMAGE_ONLY_DATABASE,
    METADATA_BOTH_SIDES,
    Baseline,
    BaselineData,
    create_baseline,
    list_baselines,
    run_baseline_cv,
)
from dermcir.baselines._features import N_SYMMETRIES, dihedral
from dermcir.baselines._metadata import field_slices, metadata_onehot, predict_metadata
from dermcir.baselines._nets import build_backbone
from dermcir.baselines.dahnet import hamming_scores, tie_broken_hamming_scores
from dermcir.baselines.maskrcnn_fusion import MaskRcnnFusion, lesion_mask
from dermcir.baselines.snf_dca import fuse_networks
from dermcir.data.cases import Case, LoadReport
from dermcir.data.folds import stratified_folds
from dermcir.metrics import retrieval_metrics

SIZE = 48
CATEGORIES = ("melanoma", "nevus", "benign keratosis-like")
PER_CATEGORY = 8
#: Tiny settings per method: small images, few epochs/views, neighbourhoods that fit 24 cases.
TINY = {
    "resnet50-cossim": {"image_size": SIZE, "epochs": 10, "n_views": 2, "batch_size": 8},
    "dahnet": {"image_size": SIZE, "epochs": 10, "n_views": 2, "batch_size": 8},
    "snf-dca": {"image_size": SIZE, "k": 5, "community_k": 5, "cross_fit": 3, "image_pca": 8},
    "maskrcnn-fusion": {"image_size": SIZE},
}


def _toy_image(category: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Skin-coloured background with a lesion whose shape and colour give away its category."""
    img = np.clip(np.array([215, 175, 155]) + rng.integers(-8, 9, (size, size, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size] - size / 2
    r = size * (0.25 + 0.05 * rng.random())
    shapes = (yy**2 + xx**2 < r**2, (abs(yy) < r) & (abs(xx) < r), abs(yy) + abs(xx) < 1.3 * r)
    colours = ((70, 35, 25), (40, 60, 140), (30, 110, 45))
    img[shapes[category]] = colours[category]
    return img


def _toy_metadata(category: int, i: int) -> np.ndarray:
    slices = field_slices()
    v = np.zeros(max(s.stop for s in slices.values()), np.float32)
    v[slices["pigment_network"].start + category] = 1.0  # informative field
    v[slices["sex"].start + i % 2] = 1.0  # uninformative field
    return v


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids thread start-up and oversubscription costs on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def toy() -> BaselineData:
    rng = np.random.default_rng(0)
    items = [(c, i) for c in range(len(CATEGORIES)) for i in range(PER_CATEGORY)]
    return BaselineData(
        images=np.stack([_toy_image(c, rng) for c, _ in items]),
        labels=np.array([CATEGORIES[c] for c, _ in items]),
        metadata=np.stack([_toy_metadata(c, i) for c, i in items]),
        cache_dir=None,
        seed=0,
    )


_PREPARED: dict[str, Baseline] = {}


def _prepared(name: str, data: BaselineData) -> Baseline:
    """Each method built and prepared once per test session (feature extraction is the slow part)."""
    if name not in _PREPARED:
        baseline = create_baseline(name, "cpu", **TINY[name])
        baseline.prepare(data)
        _PREPARED[name] = baseline
    return _PREPARED[name]


def test_registry_names_and_errors() -> None:
    assert list_baselines() == sorted(["dahnet", "maskrcnn-fusion", "resnet50-cossim", "snf-dca"])
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        create_baseline("nope")
    with pytest.raises(ValueError, match="unknown profile 'tpu'"):
        create_baseline("dahnet", "tpu")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epochz'\]"):
        create_baseline("dahnet", "cpu", epochz=3)
    with pytest.raises(ValueError, match="resnet50 has no offline weights"):
        build_backbone("resnet50")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_backbone("resnet50", weights="/nonexistent/resnet50.safetensors")


def test_a_weights_file_is_read_by_its_body_and_an_unusable_one_named(tmp_path: Path) -> None:
    """A fine-tuned Lite0 whose classifier has 7 classes was refused (a RuntimeError on the classifier no baseline
    uses); a file that is not weights gave an unpickling traceback after every image had been preprocessed."""
    import timm
    from safetensors.torch import save_file

    seven = timm.create_model("tf_efficientnet_lite0", num_classes=7)
    path = tmp_path / "lite0_7.safetensors"
    save_file({k: v.contiguous() for k, v in seven.state_dict().items()}, str(path))
    net = build_backbone("lite0", weights=str(path))
    torch.testing.assert_close(net.lower[0].weight, seven.conv_stem.weight)
    lite2 = tmp_path / "lite2.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite2").state_dict().items()},
              str(lite2))
    with pytest.raises(ValueError, match=f"{lite2}: \\d+ weights of other shapes than the network's"):
        build_backbone("lite0", weights=str(lite2))
    junk = tmp_path / "notes.pth"
    junk.write_text("not weights")
    with pytest.raises(ValueError, match=f"{junk}: not a readable weights file"):
        build_backbone("lite0", weights=str(junk))


@pytest.mark.parametrize("device", ["mps", "xpu:0"])
def test_a_device_the_machine_lacks_is_refused_when_the_method_is_built(device: str) -> None:
    """mps and xpu passed every check and failed with a traceback after preprocessing (only CUDA was checked)."""
    from dermcir.baselines._base import resolve_device

    kind = device.split(":")[0]
    if (kind == "mps" and torch.backends.mps.is_available()) or (kind == "xpu" and torch.xpu.is_available()):
        pytest.skip(f"this machine has {kind}")
    with pytest.raises(ValueError, match=f"device '{device}': there is no {kind.upper()} device on this machine"):
        resolve_device(device, "cpu")


@pytest.mark.parametrize(("name", "setting", "value", "expected"), [
    ("snf-dca", "k", "abc", "an integer"),  # `--set k=abc` arrives as a string
    ("snf-dca", "k", 0, ">= 1"),
    ("snf-dca", "cross_fit", 1, ">= 2"),
    ("snf-dca", "mu", float("nan"), "a finite number"),
    ("resnet50-cossim", "epochs", -3, ">= 1"),
    ("resnet50-cossim", "epochs", 2.5, "an integer"),
    ("resnet50-cossim", "lr", 0, "> 0"),
    ("resnet50-cossim", "dropout", 1.0, "[0, 1)"),
    ("resnet50-cossim", "amp", 1, "true or false"),
    ("resnet50-cossim", "batch_size", 1, ">= 2"),
    ("dahnet", "bits", 3, "an even integer"),
    ("dahnet", "bits", 0, "an even integer"),
    ("dahnet", "n_views", 9, "1..8"),
    ("dahnet", "n_views", 0, "1..8"),
    ("maskrcnn-fusion", "image_size", 8, "32..1024"),
    ("maskrcnn-fusion", "crop_margin", -0.1, "[0, 1]"),
    ("maskrcnn-fusion", "backbone", "vgg", "one of"),
    ("maskrcnn-fusion", "backbone", "resnet50", "backbone_weights=PATH"),
    ("maskrcnn-fusion", "backbone_weights", "/nonexistent/w.safetensors", "an existing weights file"),
    ("maskrcnn-fusion", "device", "tpu", "'auto' or a torch device"),
])
def test_bad_settings_are_refused_when_the_baseline_is_created(name: str, setting: str, value: object,
                                                               expected: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} \(cpu profile\): setting {setting}=.*expected.*{re.escape(expected)}"):
        create_baseline(name, "cpu", **{setting: value})


def test_bad_settings_are_refused_before_any_work(tmp_path: Path) -> None:
    """The run stops before preprocessing (no image is read: the one given does not exist) or writing anything."""
    case = Case("1", tmp_path / "missing.png", "nevus", "nevus", {})
    with pytest.raises(ValueError, match="setting epochs=-3"):
        run_baseline_cv("resnet50-cossim", [case], tmp_path / "run", cache_dir=tmp_path / "cache", epochs=-3)
    with pytest.raises(ValueError, match="deep_weight=0 and handcrafted_weight=0"):
        run_baseline_cv("maskrcnn-fusion", [case], tmp_path / "run", cache_dir=tmp_path / "cache", deep_weight=0,
                        handcrafted_weight=0.0)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_profile_refuses_to_fall_back_to_cpu() -> None:
    with pytest.raises(ValueError, match="profile 'gpu' needs a CUDA device"):
        create_baseline("resnet50-cossim", "gpu")


def test_row_names_are_honest() -> None:
    assert create_baseline("resnet50-cossim", "cpu").display_name.startswith("Lite0-CosSim (ResNet50-CosSim protocol")
    assert "instead of Mask R-CNN" in create_baseline("maskrcnn-fusion", "cpu").display_name
    snf = create_baseline("snf-dca", "cpu")
    assert IMAGE_ONLY_DATABASE in snf.variants["main"]
    assert METADATA_BOTH_SIDES in snf.variants["metadata-both-sides"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_rows_name_the_backbone_that_ran(name: str, tmp_path: Path) -> None:
    weights = tmp_path / "r50.safetensors"
    weights.write_bytes(b"")  # only named here: no network is built
    baseline = create_baseline(name, "cpu", backbone="resnet50", backbone_weights=str(weights))
    for text in (baseline.display_name, baseline.deviations):
        assert "ResNet50" in text and "Lite0" not in text, text
    default = create_baseline(name, "cpu")
    assert "Lite0" in default.display_name and "Lite0" in default.deviations


def test_published_row_names_are_unchanged() -> None:
    """docs/baselines.md and docs/results name the rows so; the default (lite0) names must stay as published."""
    assert create_baseline("snf-dca", "cpu").display_name == (
        "SNF-DCA (Lite0 image features + checklist; Louvain communities)")
    assert create_baseline("maskrcnn-fusion", "cpu").display_name == (
        "Otsu-Fusion (MaskRCNN-Fusion protocol; Otsu lesion mask instead of Mask R-CNN; LBP/GLCM + Lite0)")
    assert create_baseline("dahnet", "cpu").display_name == (
        "DAHNET (48-bit; EfficientNet-Lite0 backbone, frozen trunk, last conv + hash heads trained)")


@pytest.mark.parametrize("name", sorted(TINY))
def test_separable_toy_set_is_retrieved_perfectly_and_deterministically(name: str, toy: BaselineData) -> None:
    baseline = _prepared(name, toy)
    db_idx, q_idx = stratified_folds(toy.labels, 3, seed=0)[0]
    first = baseline.fold_scores(0, db_idx, q_idx)
    again = baseline.fold_scores(0, db_idx, q_idx)  # trained methods train again from scratch: same seed, same result
    assert list(first) == list(baseline.variants)
    for variant, scores in first.items():
        assert scores.shape == (len(q_idx), len(db_idx)), variant
        assert np.isfinite(scores).all(), variant
        np.testing.assert_allclose(scores, again[variant], rtol=1e-5, atol=1e-6, err_msg=variant)
    metrics = retrieval_metrics(first["main"], toy.labels[q_idx], toy.labels[db_idx])
    assert metrics == {"mAP": 100.0, "Acc@1": 100.0, "Acc@2": 100.0, "Acc@4": 100.0}


def test_scores_depend_on_the_images(toy: BaselineData) -> None:
    """With the images shuffled across labels the same method is no longer perfect: the perfect scores above mean
    something."""
    order = np.random.default_rng(5).permutation(len(toy.labels))
    shuffled = BaselineData(toy.images[order], toy.labels, toy.metadata, None, 0)
    baseline = create_baseline("maskrcnn-fusion", "cpu", **TINY["maskrcnn-fusion"])
    baseline.prepare(shuffled)
    db_idx, q_idx = stratified_folds(toy.labels, 3, seed=0)[0]
    scores = baseline.fold_scores(0, db_idx, q_idx)["main"]
    assert retrieval_metrics(scores, toy.labels[q_idx], toy.labels[db_idx])["Acc@1"] < 100.0


def test_gpu_code_path_runs_on_cpu(toy: BaselineData) -> None:
    """The end-to-end (``train_backbone``) path with live augmented images, exercised on the CPU with tiny settings."""
    db_idx, q_idx = stratified_folds(toy.labels, 3, seed=0)[0]
    for name in ("resnet50-cossim", "dahnet"):
        baseline = create_baseline(name, "gpu", device="cpu", image_size=SIZE, epochs=1, batch_size=8)
        baseline.prepare(toy)
        scores = baseline.fold_scores(0, db_idx, q_idx)["main"]
        assert scores.shape == (len(q_idx), len(db_idx)) and np.isfinite(scores).all()
    net, _ = baseline.fit_fold(0, db_idx)
    stem = next(build_backbone("lite0").lower.parameters())
    assert not torch.equal(next(net.backbone.lower.parameters()), stem)  # the whole network trains on this path


def test_hamming_scores_match_a_naive_count_and_tie_breaks_keep_the_order() -> None:
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(5, 16)), rng.normal(size=(7, 16))
    naive = -np.array([[np.sum((a >= 0) != (b >= 0)) for b in d] for a in q])
    np.testing.assert_array_equal(hamming_scores(q, d), naive)
    broken = tie_broken_hamming_scores(q, d)
    differ = naive[:, :, None] < naive[:, None, :]
    assert (broken[:, :, None] < broken[:, None, :])[differ].all()  # every strict Hamming order survives


def test_dihedral_views_are_the_eight_symmetries() -> None:
    img = torch.arange(2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
    views = [dihedral(img, v) for v in range(N_SYMMETRIES)]
    assert torch.equal(views[0], img)
    assert len({v.numpy().tobytes() for v in views}) == N_SYMMETRIES
    with pytest.raises(ValueError, match="view must be in 0..7"):
        dihedral(img, 8)


def test_metadata_onehot_reads_only_checklist_fields() -> None:
    fields = {"pigment_network": "atypical", "sex": "male", "streaks": "not-a-value"}
    plain = Case("1", Path("x.jpg"), "melanoma", "melanoma", dict(fields))
    leaky = Case("1", Path("x.jpg"), "melanoma", "melanoma",
                 fields | {"diagnosis": "melanoma", "management": "excision", "seven_point_score": "5"})
    a, b = metadata_onehot([plain]), metadata_onehot([leaky])
    np.testing.assert_array_equal(a, b)
    slices = field_slices()
    assert a[0, slices["pigment_network"]].tolist() == [0, 0, 1]
    assert a[0, slices["streaks"]].sum() == 0  # unknown value: left out, not guessed


def test_predicted_metadata_is_cross_fitted(toy: BaselineData) -> None:
    """A database case's predicted checklist must not depend on its own (true) checklist."""
    features = toy.images.reshape(len(toy.images), -1)[:, ::97].astype(np.float32)
    fit_idx = np.arange(len(toy.labels))
    base = predict_metadata(features, toy.metadata, fit_idx, n_splits=3, pca_dim=4)
    changed = toy.metadata.copy()
    changed[0] = np.roll(changed[0], 1)
    moved = predict_metadata(features, changed, fit_idx, n_splits=3, pca_dim=4)
    np.testing.assert_allclose(moved[0], base[0], atol=1e-6)
    assert base.shape == toy.metadata.shape
    for sl in field_slices().values():
        sums = base[:, sl].sum(axis=1)
        assert np.allclose(sums, 1.0, atol=1e-5) or np.allclose(sums, 0.0)


def test_snf_fusion_runs_with_the_pinned_libraries() -> None:
    rng = np.random.default_rng(2)
    fused = fuse_networks([rng.normal(size=(30, 4)), rng.integers(0, 2, (30, 6)).astype(float)], k=5, mu=0.5, t=5)
    assert fused.shape == (30, 30) and np.isfinite(fused).all()
    np.testing.assert_allclose(fused, fused.T, atol=1e-8)


def test_lesion_mask_finds_a_central_dark_lesion() -> None:
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:96, :96] - 48.0
    truth = yy**2 + (xx - 6) ** 2 < 22**2  # a little off centre
    img = np.clip(np.array([215, 175, 155]) + rng.integers(-8, 9, (96, 96, 3)), 0, 255).astype(np.uint8)
    img[truth] = (80, 45, 30)
    img[:10, :10] = (20, 20, 20)  # a dark corner (vignetting) must not win over the lesion
    mask = lesion_mask(img)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9


def _toy_cases(folder: Path) -> list[Case]:
    """Six toy cases per category, their images written as PNG files under ``folder``."""
    rng = np.random.default_rng(4)
    cases = []
    for c, category in enumerate(CATEGORIES):
        for i in range(6):
            path = folder / "images" / f"{category[:3]}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_toy_image(c, rng, 64)).save(path)
            cases.append(Case(f"{c}-{i}", path, category, category, {"pigment_network": ("absent", "typical",
                                                                                         "atypical")[c]}))
    return cases


def test_run_baseline_cv_writes_the_results_schema(tmp_path: Path) -> None:
    cases = _toy_cases(tmp_path)
    missing = Case("gone", tmp_path / "images" / "missing.png", "nevus", "nevus", {})
    out = tmp_path / "run"
    loader = LoadReport(skipped=[("meta.csv:9 (case 8)", "unknown diagnosis 'something new'")],
                        dropped_categories={"basal cell carcinoma": 3}, min_cases=5)  # (6 per category)
    doc = run_baseline_cv("snf-dca", [*cases, missing], out, n_folds=3, cache_dir=tmp_path / "cache",
                          load_report=loader, **TINY["snf-dca"])
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["method"] == doc["method"] == "snf-dca"
    assert [f["fold"] for f in on_disk["folds"]] == [0, 1, 2]
    for row in on_disk["folds"]:
        assert {"fold", "n_queries", "n_database", "mAP", "Acc@1", "Acc@2", "Acc@4"} <= set(row)
        assert row["n_queries"] + row["n_database"] == len(cases)
    assert set(on_disk["mean"]) == set(on_disk["std"]) == {"mAP", "Acc@1", "Acc@2", "Acc@4"}
    assert set(on_disk["variants"]) == {"metadata-both-sides", "no-community"}
    assert METADATA_BOTH_SIDES in on_disk["variants"]["metadata-both-sides"]["protocol"]
    # the loader's rows first, then preprocessing's; the caller's report is left as it was
    assert [s[0].rsplit("/", 1)[-1] for s in on_disk["skipped"]] == ["meta.csv:9 (case 8)", "missing.png"]
    assert len(loader.skipped) == 1
    assert on_disk["categories_left_out"] == {"min_cases": 5, "categories": {"basal cell carcinoma": 3}}
    assert "fold 2" in (out / "log.txt").read_text()


def test_a_run_is_refused_in_a_folder_that_holds_another_methods_results(tmp_path: Path) -> None:
    # Rerunning the same method is safe (its files are replaced when it completes, below); another method's run would
    # replace the composed run's results.json and leave that run's tables and fold folders beside it.
    out = tmp_path / "run"
    out.mkdir()
    earlier = json.dumps({"method": "dermcir-composed", "complete": True})
    (out / "results.json").write_text(earlier)
    settings = {"n_folds": 3, "cache_dir": tmp_path / "cache", **TINY["maskrcnn-fusion"]}
    with pytest.raises(ValueError, match="holds the results of an earlier dermcir-composed run .*a maskrcnn-fusion "
                                         "run would replace them with its own"):
        run_baseline_cv("maskrcnn-fusion", _toy_cases(tmp_path), out, **settings)
    assert [(f.name, f.read_text()) for f in out.iterdir()] == [("results.json", earlier)]


def test_a_failed_rerun_keeps_the_previous_runs_log_and_logs_its_error(tmp_path: Path, monkeypatch) -> None:
    cases, out = _toy_cases(tmp_path), tmp_path / "run"
    settings = {"n_folds": 3, "cache_dir": tmp_path / "cache", **TINY["maskrcnn-fusion"]}
    run_baseline_cv("maskrcnn-fusion", cases, out, **settings)
    good = {name: (out / name).read_bytes() for name in ("log.txt", "results.json")}

    def fail(*args, **kwargs):
        raise RuntimeError("boom in fold 0")

    monkeypatch.setattr(MaskRcnnFusion, "fold_scores", fail)
    with pytest.raises(RuntimeError, match="boom"):
        run_baseline_cv("maskrcnn-fusion", cases, out, **settings)
    # log.txt and results.json are still the pair of the run that completed
    assert {name: (out / name).read_bytes() for name in good} == good
    failed = (out / "log.failed.txt").read_text()
    assert "run failed: RuntimeError: boom in fold 0" in failed and "Traceback" in failed
    assert sorted(p.name for p in out.iterdir()) == ["log.failed.txt", "log.txt", "results.json"]

    monkeypatch.undo()
    run_baseline_cv("maskrcnn-fusion", cases, out, **settings)  # completes: its log replaces the old one
    assert "fold 2" in (out / "log.txt").read_text() and (out / "log.txt").read_bytes() != good["log.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json"]


@pytest.mark.parametrize(("name", "extra", "bars"), [
    ("maskrcnn-fusion", {}, ("preprocess 48px", "segment + texture", "lite0 maps (1 views)")),
    ("resnet50-cossim", {"epochs": 1}, ("preprocess 48px", "lite0 maps (2 views)")),
])
def test_progress_false_shows_no_progress_bars(name: str, extra: dict, bars: tuple[str, ...], tmp_path: Path,
                                               capfd) -> None:
    """``dermcir cv --quiet`` is to pass ``progress=False``; fresh caches, so every step really runs."""
    cases = _toy_cases(tmp_path)
    settings = {"n_folds": 3, **TINY[name], **extra}
    run_baseline_cv(name, cases, tmp_path / "quiet", cache_dir=tmp_path / "cache-quiet", progress=False, **settings)
    quiet = capfd.readouterr().err
    run_baseline_cv(name, cases, tmp_path / "loud", cache_dir=tmp_path / "cache-loud", **settings)
    loud = capfd.readouterr().err
    for bar in bars:
        assert bar in loud  # the bars exist and are seen here, so their absence below means something
        assert bar not in quiet


def test_fusion_cache_writers_do_not_collide(toy: BaselineData, tmp_path: Path, monkeypatch) -> None:
    """Two runs filling one cache: the second writes and renames its file while the first is between writing and
    renaming its own (the interleaving that killed one of two real concurrent runs). Both must succeed."""
    data = BaselineData(toy.images[:6], toy.labels[:6], toy.metadata[:6], tmp_path / "cache", 0)
    real_savez, calls = np.savez, []

    def savez_then_let_another_run_write(file, *args, **kwargs):
        real_savez(file, *args, **kwargs)
        calls.append(file)
        if len(calls) == 1:  # the first writer is paused here; another run computes and caches the same key
            create_baseline("maskrcnn-fusion", "cpu", **TINY["maskrcnn-fusion"])._handcrafted(data)

    monkeypatch.setattr(np, "savez", savez_then_let_another_run_write)
    blocks, crops = create_baseline("maskrcnn-fusion", "cpu", **TINY["maskrcnn-fusion"])._handcrafted(data)
    assert len(calls) == 2
    monkeypatch.undo()
    (cached,) = (tmp_path / "cache" / "baselines").iterdir()  # one cache file, no temporary left behind
    with np.load(cached) as npz:
        np.testing.assert_array_equal(npz["crops"], crops)
        np.testing.assert_array_equal(npz["texture"], blocks["texture"])


def test_results_record_only_the_settings_the_run_used(tmp_path: Path) -> None:
    """The gpu profile trains on live images under all 8 symmetries: an ``n_views`` in its record would be a value
    that played no part; the cpu profile's frozen backbone never reads ``backbone_lr``; ``amp`` acts on CUDA only."""
    cases, out = _toy_cases(tmp_path), tmp_path / "run"
    run_baseline_cv("resnet50-cossim", cases, out, n_folds=3, cache_dir=tmp_path / "cache", profile="gpu",
                    device="cpu", image_size=SIZE, epochs=1, batch_size=8)
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["train_backbone"] is True and "n_views" not in settings
    end_to_end = create_baseline("dahnet", "gpu", device="cpu")
    assert "n_views" not in end_to_end.settings and end_to_end.settings["backbone_lr"] == 1e-4
    frozen = create_baseline("dahnet", "cpu", device="cpu")
    assert frozen.settings["n_views"] == 4 and "backbone_lr" not in frozen.settings
    assert "amp" not in frozen.settings and "amp" not in end_to_end.settings
    with pytest.raises(ValueError, match=r"not used by this configuration: n_views \(train_backbone=True"):
        create_baseline("resnet50-cossim", "gpu", device="cpu", n_views=2)
    with pytest.raises(ValueError, match=r"backbone_lr \(train_backbone=False"):
        create_baseline("resnet50-cossim", "cpu", device="cpu", backbone_lr=1e-3)


def test_docs_agree_with_the_code() -> None:
    root = Path(__file__).resolve().parents[1]
    doc = " ".join((root / "docs" / "baselines.md").read_text().split())  # prose is wrapped anywhere
    pin = re.search(r'"networkx==([^"]+)"', (root / "pyproject.toml").read_text())
    assert pin and f"networkx=={pin.group(1)}" in doc and "not pinned" not in doc
    assert "does not forward `--set`" not in doc  # dermcir cv passes --set to the baselines (cli/core.py)
    assert "Acc@1 = Acc@2" not in doc  # the table gives DAHNET 73.3 / 74.7 / 76.1


@pytest.mark.parametrize(("flags", "progress"), [(["--quiet"], False), ([], True)])
def test_cv_quiet_reaches_the_baseline_runner(flags: list[str], progress: bool, tmp_path: Path, monkeypatch) -> None:
    """``dermcir cv --method NAME --quiet`` passes ``progress=False`` (the runner showed its bars regardless)."""
    import dermcir.baselines
    from dermcir.cli import main

    from .conftest import write_release

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        return {"mean": {}, "std": {}}

    monkeypatch.setattr(dermcir.baselines, "run_baseline_cv", record)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars are shown on a terminal only
    release = write_release(tmp_path / "r", [{"diagnosis": "clark nevus"}] * 3)
    assert main(["cv", "--method", "snf-dca", "--data", str(release), "--min-cases", "1", "--out",
                 str(tmp_path / "o"), *flags]) == 0
    assert seen["progress"] is progress


def test_baseline_caches_that_cannot_be_written_or_read_cost_time_not_the_run(toy: BaselineData, tmp_path: Path,
                                                                               caplog) -> None:
    """The backbone-map and Fusion caches: an unwritable cache folder and damaged entries give warnings and the
    same features (before: the run stopped with the OSError or numpy's error)."""
    from dermcir.baselines._features import backbone_maps

    data = BaselineData(toy.images[:4], toy.labels[:4], toy.metadata[:4], tmp_path / "cache", 0)
    backbone = build_backbone("lite0", pretrained=False)
    fusion = create_baseline("maskrcnn-fusion", "cpu", **TINY["maskrcnn-fusion"])
    cpu = torch.device("cpu")
    maps = backbone_maps(backbone, data.images, 1, ("top",), cpu, cache_dir=data.cache_dir, progress=False)
    blocks, crops = fusion._handcrafted(data)
    for entry in (data.cache_dir / "baselines").iterdir():
        entry.write_bytes(entry.read_bytes()[:40])  # cut short
    (tmp_path / "afile").write_text("")
    unwritable = BaselineData(data.images, data.labels, data.metadata, tmp_path / "afile", 0)
    with caplog.at_level("WARNING"):
        for cache in (data.cache_dir, unwritable.cache_dir):
            again = backbone_maps(backbone, data.images, 1, ("top",), cpu, cache_dir=cache, progress=False)
            np.testing.assert_array_equal(again["top"], maps["top"])
        for source in (data, unwritable):
            blocks_again, crops_again = fusion._handcrafted(source)
            np.testing.assert_array_equal(crops_again, crops)
            assert all(np.array_equal(blocks_again[b], blocks[b]) for b in blocks)
    said = caplog.text
    assert "unreadable cache entry" in said and "unreadable cached features" in said
    assert said.count("could not write") == 2 and str(tmp_path / "afile") in said


def test_computed_and_cached_backbone_maps_give_the_same_features(tmp_path: Path) -> None:
    """Bit for bit: a run that computes the maps must score as one that loads them from the cache (the computed
    maps kept the backbone's channels-last strides, and the tail's convolutions then rounded differently)."""
    from dermcir.baselines._features import backbone_maps, pooled_features

    images = np.random.default_rng(0).integers(0, 255, (6, SIZE, SIZE, 3), dtype=np.uint8)
    backbone = build_backbone("lite0", pretrained=False)
    cpu = torch.device("cpu")
    computed = backbone_maps(backbone, images, 1, ("top",), cpu, cache_dir=tmp_path, progress=False)
    loaded = backbone_maps(backbone, images, 1, ("top",), cpu, cache_dir=tmp_path, progress=False)
    assert computed["top"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(pooled_features(backbone, computed["top"][0], cpu),
                                  pooled_features(backbone, loaded["top"][0], cpu))


def test_other_weights_under_the_same_file_name_miss_the_backbone_map_cache(tmp_path: Path) -> None:
    """The cache was keyed by the weights file's path: new weights saved there were served the old weights' maps."""
    from dermcir.baselines._features import backbone_maps

    images = np.random.default_rng(0).integers(0, 255, (2, SIZE, SIZE, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    backbone = build_backbone("lite0", pretrained=False)
    first = backbone_maps(backbone, images, 1, ("top",), cpu, cache_dir=tmp_path, progress=False)["top"]
    with torch.no_grad():
        for p in backbone.parameters():
            p.mul_(0.5)
    again = backbone_maps(backbone, images, 1, ("top",), cpu, cache_dir=tmp_path, progress=False)["top"]
    assert not np.array_equal(again, first)
    assert len(list((tmp_path / "baselines").iterdir())) == 2


def test_a_baseline_refuses_categories_with_fewer_cases_than_folds_before_its_features(tmp_path: Path) -> None:
    """As the composed run does: before, a category missing from a fold's database gave NaN average precision,
    left out of the mean without a word, and bare NaN in results.json; no usable image at all was a numpy error."""
    cases = _toy_cases(tmp_path)
    for case in cases[7:12]:  # the second category keeps one readable image
        case.image.write_bytes(b"damaged")
    with pytest.raises(ValueError, match=r"categories with fewer usable cases than the 3 folds: \{'[a-z -]+': 1\} "
                                         r"\(5 rows were left out, each listed above and in log.txt\)"):
        run_baseline_cv("snf-dca", cases, tmp_path / "run", n_folds=3, cache_dir=tmp_path / "cache",
                        **TINY["snf-dca"])
    assert not (tmp_path / "cache" / "baselines").exists()  # stopped before the backbone's maps
    for case in cases:
        case.image.write_bytes(b"damaged")
    with pytest.raises(ValueError, match="no usable cases: all 18 rows were left out"):
        run_baseline_cv("resnet50-cossim", cases, tmp_path / "run", n_folds=3, cache_dir=tmp_path / "cache",
                        **TINY["resnet50-cossim"])


def test_resnet_cossim_records_the_number_of_categories_it_trained_on(toy: BaselineData) -> None:
    assert "the Derm7pt categories instead" in create_baseline("resnet50-cossim", "cpu", **TINY["resnet50-cossim"]).deviations
    assert "; 3 Derm7pt categories instead" in _prepared("resnet50-cossim", toy).deviations
    two = create_baseline("resnet50-cossim", "cpu", **TINY["resnet50-cossim"])
    keep = toy.labels != CATEGORIES[2]
    two.prepare(BaselineData(toy.images[keep], toy.labels[keep], toy.metadata[keep], toy.cache_dir, 0, progress=False))
    assert "; 2 Derm7pt categories instead" in two.deviations
