"""End-to-end: the benchmark and the train command on a synthetic release (tiny settings, real code paths)."""

import ast
import json
import logging
import os
import re
from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import pytest
import torch

from dermcir.cli import main
from dermcir.data import load_derm7pt
from dermcir.data.folds import stratified_folds, validation_split
from dermcir.evaluation.cv import run_cv
from dermcir.training.pipeline import train_on_cases

from .conftest import SHARED_DERM7PT, TINY, held_in_another_process, write_release

FAST = {**TINY, "epochs": 3, "patience": 2, "batch_size": 8, "views": 2, "refit_epochs": 1}


def test_folds_are_seeded_stratified_and_disjoint():
    labels = ["a"] * 20 + ["b"] * 10
    folds = stratified_folds(labels, 5, seed=0)
    assert [q.tolist() for _, q in folds] == [q.tolist() for _, q in stratified_folds(labels, 5, seed=0)]
    assert [q.tolist() for _, q in folds] != [q.tolist() for _, q in stratified_folds(labels, 5, seed=1)]
    seen = sorted(i for _, q in folds for i in q)
    assert seen == list(range(30))
    for db, q in folds:
        assert not set(db) & set(q)
        assert sum(labels[i] == "b" for i in q) == 2
        train, val = validation_split(db, labels, 0.25, seed=0)
        assert not set(train) & set(val) and set(train) | set(val) == set(db) and not set(val) & set(q)


@pytest.mark.parametrize(
    ("earlier", "message"),
    [
        ({"method": "dermcir-composed", "complete": True}, "holds the results of an earlier dermcir-composed run"),
        ({"method": "snf-dca"}, "holds the results of an earlier snf-dca run"),
        ("{not json", "holds a results.json that is not a dermcir run's"),
    ],
)
def test_a_run_is_refused_in_a_folder_that_holds_an_earlier_run(toy_release, tmp_path, earlier, message):
    # A run rewrites results.json after every fold: in an earlier run's folder it would replace that run's figures
    # before it finished, and a run that then failed would leave neither.
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    out = tmp_path / "run"
    out.mkdir()
    files = {"results.json": earlier if isinstance(earlier, str) else json.dumps(earlier), "tables.md": "# earlier\n"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{out}: {message} ({out / 'results.json'})")):
        run_cv(cases, out, profile="cpu", n_folds=3, progress=False, **FAST)
    assert {f.name: f.read_text() for f in out.iterdir()} == files  # nothing written, not even cv.log


def test_a_run_is_refused_in_a_folder_another_run_is_writing_into(toy_release, tmp_path):
    """Two `dermcir cv --out SAME` at once both passed the "no earlier results" check (results.json comes after the
    first fold) and interleaved their files: one's results vanished, the folds of the other stayed."""
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    out = tmp_path / "run"
    busy = re.escape(f"{out}: another dermcir cv is writing into this folder now")
    with (held_in_another_process(f"dermcir.files.claim_folder(Path({str(out)!r}), 'dermcir cv')"),
          pytest.raises(ValueError, match=busy)):
        run_cv(cases, out, profile="cpu", n_folds=3, progress=False, **FAST)
    assert list(out.iterdir()) == []  # nothing written, and the lock went with its holder


def test_a_run_is_refused_when_its_folder_is_a_file(toy_release, tmp_path):
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    out = tmp_path / "run.txt"
    out.write_text("notes")
    with pytest.raises(ValueError, match="run.txt: is a file; a run writes its results into a folder"):
        run_cv(cases, out, profile="cpu", n_folds=3, progress=False, **FAST)
    assert out.read_text() == "notes"


def test_cv_writes_results_tables_and_figure(toy_release, tmp_path):
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    doc = run_cv(cases, tmp_path / "run", profile="cpu", n_folds=3, progress=False, **FAST)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["mean"] == doc["mean"]
    assert [r["fold"] for r in saved["folds"]] == [0, 1, 2]
    for row in saved["folds"]:
        assert row["n_queries"] == 8 and row["n_database"] == 16
        assert set(row) >= {"fold", "n_queries", "n_database", "mAP", "Acc@1", "Acc@2", "Acc@4"}
        assert 0 <= row["mAP"] <= 100
    assert set(saved["std"]) == {"mAP", "Acc@1", "Acc@2", "Acc@4"}
    assert set(saved["per_category"]) == {"nevus", "melanoma", "benign keratosis-like"}
    assert set(saved["ablations"]) == {"image-only", "text-only", "composed, beta=0 (global only)",
                                       "composed, beta=1 (local only)"}
    tables = (tmp_path / "run" / "tables.md").read_text()
    assert "Table 1" in tables and "Table 2" in tables and "81.7" in tables
    assert saved["beta"] == 0.6 and "| composed, beta=0.6 (the main result) |" in tables
    assert (tmp_path / "run" / "retrievals.png").stat().st_size > 10_000
    for f in range(3):
        log = (tmp_path / "run" / f"fold_{f}" / "train.log").read_text()
        assert log.count("val mAP") >= 1
        assert "refit 1 epochs on all 16 database cases" in log  # validation cases join the fitted database
        assert json.loads((tmp_path / "run" / f"fold_{f}" / "metrics.json").read_text())["epochs_run"] >= 1
    # what the run was, recorded: every setting it was given (views included, which neither config holds), the
    # effective configs, the pretrained weights it started from, the preprocessing and the libraries
    settings = saved["settings"]
    assert settings["overrides"] == {k: FAST[k] for k in sorted(FAST)} and settings["views"] == FAST.get("views", 2)
    assert settings["model"]["image_size"] == FAST["image_size"] and settings["train"]["epochs"] == FAST["epochs"]
    assert set(settings["pretrained"]) == {"backbone", "text_encoder"}
    assert all(len(d) == 64 for d in settings["pretrained"].values())
    assert saved["preprocess_version"] == "border-v3"
    assert {"python", "dermcir", "torch", "timm", "transformers", "numpy"} <= set(saved["environment"])
    log = (tmp_path / "run" / "cv.log").read_text()
    assert "settings given: {" in log and "environment: python" in log
    # a run given --set settings is not the profile itself: its row says so, and std is named
    given = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(FAST.items()))
    assert f"| **dermcir-composed (cpu profile + {given}, this run)** |" in tables
    # weights paths by their last part: gpu_cv.sh's runs read "gpu profile + backbone_weights=lite0_fp16.safetensors"
    from dermcir.evaluation.results import settings_given

    doc = {"settings": {"overrides": {"backbone_weights": "gpu_payload/lite0_fp16.safetensors", "epochs": 3,
                                      "text_encoder": "bert", "text_weights": "/abs/gpu_payload/minilm"}}}
    assert settings_given(doc) == ("backbone_weights=lite0_fp16.safetensors, epochs=3, text_encoder=bert, "
                                   "text_weights=minilm")
    assert settings_given({}) == settings_given({"settings": None}) == ""  # results.json of earlier versions
    assert "population standard deviation over folds (ddof = 0; the sample one, ddof = 1, is 1.225 times" in tables


def test_a_run_stopped_part_way_keeps_its_finished_folds(toy_release, tmp_path, monkeypatch):
    """results.json and tables.md are rewritten after every fold: a run stopped later (a device's time limit, an
    error in fold 1) still holds fold 0's figures, marked as not ended."""
    from dermcir.evaluation import cv

    real_fit, calls = cv.fit, []

    def failing_second_fold(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped in fold 1")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(cv, "fit", failing_second_fold)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    with pytest.raises(RuntimeError, match="stopped in fold 1"):
        run_cv(cases, tmp_path / "run", profile="cpu", n_folds=3, progress=False, **FAST)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["complete"] is False and saved["folds_run"] == [0] and [r["fold"] for r in saved["folds"]] == [0]
    assert saved["mean"]["mAP"] == saved["folds"][0]["mAP"]
    assert "The run had not ended when this was written: 1 of 3 folds were done (fold 0)" in (
        tmp_path / "run" / "tables.md").read_text()
    assert (tmp_path / "run" / "retrievals.png").exists()
    monkeypatch.setattr(cv, "fit", real_fit)
    doc = run_cv(cases, tmp_path / "whole", profile="cpu", n_folds=3, progress=False, **FAST)
    assert doc["complete"] is True and doc["folds_run"] == [0, 1, 2]
    assert doc["folds"][0]["mAP"] == saved["folds"][0]["mAP"]  # the same fold, finished earlier


def test_tables_name_the_runs_own_beta(tmp_path):
    """The main row of Table 2 was labelled beta=0.6 whatever β the run used (e.g. ``--set beta=0.3``)."""
    from dermcir.evaluation.report import write_tables
    from dermcir.evaluation.results import build_results, fold_row

    q, db = np.array(["a", "b"]), np.array(["a", "b", "b"])
    rows = [fold_row(f, np.eye(2, 3) + 0.1 * f, q, db) for f in range(2)]
    ablation = {"image-only": build_results("image-only", rows)}
    common = {"profile": "cpu", "n_cases": 5, "n_folds": 2, "seed": 0, "ablations": ablation}
    for extra, label in (({"beta": 0.3}, "composed, beta=0.3"), ({}, "composed")):  # {}: recorded before β was
        write_tables(build_results("dermcir-composed", rows, **common, **extra), tmp_path / "tables.md")
        assert f"| {label} (the main result) |" in (tmp_path / "tables.md").read_text()


@pytest.mark.parametrize(("category", "says"), [
    (None, "no usable cases: all 24 rows were left out"),
    ("benign keratosis-like", "categories with fewer usable cases than the 3 folds: {'benign keratosis-like': 2}"),
])
def test_cv_says_when_unreadable_images_leave_too_few_cases(toy_release, tmp_path, category, says):
    """Before: an IndexError traceback from the feature cache when every image was unreadable. ``category``: all
    but two of its images are damaged (None: every image)."""
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    damaged = [c for c in cases if category is None] or [c for c in cases if c.category == category][2:]
    for case in damaged:
        case.image.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=re.escape(says)):
        run_cv(cases, tmp_path / "run", n_folds=3, progress=False, cache_dir=tmp_path / "cache", **FAST)
    assert all(str(c.image) in (tmp_path / "run" / "cv.log").read_text() for c in damaged)


def test_a_category_that_unreadable_images_take_under_min_cases_is_left_out(toy_release, tmp_path):
    """The loader's threshold was applied before any image was decoded: with --min-cases 8 and one unreadable image,
    a 7-case category was trained and scored, and results.json said no category was left out."""
    cases, report = load_derm7pt(toy_release, min_cases=8)
    next(c for c in cases if c.category == "benign keratosis-like").image.write_bytes(b"not an image")
    doc = run_cv(cases, tmp_path / "run", n_folds=2, progress=False, load_report=report, **FAST)
    assert doc["categories_left_out"] == {"min_cases": 8, "categories": {"benign keratosis-like": 7}}
    assert sorted(doc["per_category"]) == ["melanoma", "nevus"] and doc["folds"][0]["n_queries"] == 8
    assert "fewer than 8 usable cases once unreadable images were left out: {'benign keratosis-like': 7}" in (
        tmp_path / "run" / "cv.log").read_text()
    assert report.dropped_categories == {}  # the caller's report is left as the loader made it


def test_a_category_the_validation_split_cannot_divide_is_refused_in_our_words(tmp_path):
    """scikit-learn's "The least populated class in y has only 1 member" came after the backbone's features."""
    rows = [{"diagnosis": "clark nevus"}] * 8 + [{"diagnosis": "melanoma"}] * 8 + [{"diagnosis": "seborrheic keratosis"}] * 3
    cases, _ = load_derm7pt(write_release(tmp_path / "release_v0", rows), min_cases=3)
    with pytest.raises(ValueError, match=re.escape(
            "too few usable cases for 2 folds with a validation split: {'benign keratosis-like': 3}; each fold's "
            "database needs 2 cases of every category for the stratified validation split, so 4 per category")):
        run_cv(cases, tmp_path / "run", n_folds=2, progress=False, **FAST)
    one = [c for c in cases if c.category != "benign keratosis-like"] + cases[-1:]
    with pytest.raises(ValueError, match=re.escape("categories with a single training case: ['benign keratosis-like']")):
        train_on_cases(one, tmp_path / "model", profile="cpu", progress=False, **FAST)
    assert [f.name for f in (tmp_path / "model").iterdir()] == ["train.failed.log"]  # no checkpoint


def test_rows_the_loader_left_out_are_in_the_run_records(tmp_path, caplog):
    """A missing image file or an unknown diagnosis is listed in results.json, cv.log and the checkpoint, as an
    unreadable image is, not only on the console; each once, in the log and on the console. So is a category that
    --min-cases leaves out."""
    rows = [{"diagnosis": ["clark nevus", "melanoma (in situ)"][i % 2]} for i in range(12)]
    rows[3]["_no_image"] = True
    rows.append({"diagnosis": "something new"})
    rows += [{"diagnosis": "seborrheic keratosis"}] * 2  # under --min-cases 4
    release = write_release(tmp_path / "release_v0", rows)
    (release / "images" / "SYN" / "img005.jpg").write_bytes(b"not an image at all")  # left out by preprocessing
    sets = [a for k, v in {**TINY, "epochs": 1, "batch_size": 4, "refit_epochs": 0}.items() for a in ("--set", f"{k}={v}")]
    common = ["--data", str(release), "--min-cases", "4", "--quiet", *sets]
    assert main(["cv", *common, "--out", str(tmp_path / "run"), "--folds", "2"]) == 0
    assert main(["train", *common, "--out", str(tmp_path / "ckpt")]) == 0
    skipped = json.loads((tmp_path / "run" / "results.json").read_text())["skipped"]
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["skipped"] == skipped
    assert [what.rsplit("/", 1)[-1] for what, _ in skipped] == ["img003.jpg", "meta.csv:14 (case 13)", "img005.jpg"]
    for log in (tmp_path / "run" / "cv.log", tmp_path / "ckpt" / "train.log"):
        text = log.read_text()
        assert [text.count(f"skipping {what}: {why}") for what, why in skipped] == [1, 1, 1]
        assert text.count("categories left out (fewer than 4 cases or not selected): "
                          "{'benign keratosis-like': 2}") == 1
    dropped = {"min_cases": 4, "categories": {"benign keratosis-like": 2}}
    for record in (tmp_path / "run" / "results.json", tmp_path / "ckpt" / "config.json"):
        assert json.loads(record.read_text())["categories_left_out"] == dropped
    console = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert [sum(what in line for line in console) for what, _ in skipped] == [2, 2, 2]  # once by cv, once by train


def test_the_same_seed_gives_the_same_run_and_another_seed_does_not(toy_release, tmp_path):
    """Initial weights are seeded too, not only training: a run is reproducible from its seed."""
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    settings = {**FAST, "epochs": 2, "refit_epochs": 0}
    first, again, other = (run_cv(cases, tmp_path / name, n_folds=2, seed=seed, progress=False, **settings)
                           for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert [r["mAP"] for r in first["folds"]] == [r["mAP"] for r in again["folds"]]
    assert first["ablations"] == again["ablations"]
    assert [r["mAP"] for r in first["folds"]] != [r["mAP"] for r in other["folds"]]


def test_one_fold_alone_trains_and_scores_as_in_the_full_run(toy_release, tmp_path):
    """``--only-fold``: a fold run by itself gives the full run's figures for it, and the outputs say it is partial."""
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    settings = {**FAST, "epochs": 2, "refit_epochs": 1}
    full = run_cv(cases, tmp_path / "full", n_folds=3, seed=1, progress=False, **settings)
    assert main(["cv", "--data", str(toy_release), "--min-cases", "5", "--out", str(tmp_path / "one"), "--folds", "3",
                 "--seed", "1", "--only-fold", "2", "--quiet", *[a for k, v in settings.items()
                                                                 for a in ("--set", f"{k}={v}")]]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert full["folds_run"] == [0, 1, 2] and one["folds_run"] == [2]
    assert one["folds"] == [full["folds"][2]] and one["mean"] == {m: full["folds"][2][m] for m in one["mean"]}
    assert one["training"][0]["best_epoch"] == full["training"][2]["best_epoch"]
    assert not (tmp_path / "one" / "fold_0").exists()
    assert "Only folds 2 of 3 ran" in (tmp_path / "one" / "tables.md").read_text()
    assert "Only folds" not in (tmp_path / "full" / "tables.md").read_text()


def test_a_time_budget_is_shared_among_the_selected_folds_only(toy_release, tmp_path, monkeypatch):
    """Fold 1 of 3 run alone gets (nearly) the whole budget, not the half a full run would leave it."""
    import time

    from dermcir.evaluation import cv

    shares, real_fit = [], cv.fit

    def recording_fit(*args, deadline=None, **kwargs):
        shares.append(deadline - time.perf_counter())
        return real_fit(*args, deadline=deadline, **kwargs)

    monkeypatch.setattr(cv, "fit", recording_fit)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    run_cv(cases, tmp_path / "run", n_folds=3, only_folds=[1], time_budget=600, progress=False,
           **{**FAST, "epochs": 1, "refit_epochs": 0})
    assert len(shares) == 1 and 0.9 * 600 < shares[0] <= 0.97 * 600


def test_train_command_writes_a_loadable_checkpoint(toy_release, tmp_path):
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
    rc = main(["train", "--data", str(toy_release), "--min-cases", "5", "--out", str(tmp_path / "ckpt"), "--quiet",
               *sets])
    assert rc == 0
    from dermcir.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "ckpt")
    assert model.config.categories and model.config.image_size == 64
    assert "best epoch" in (tmp_path / "ckpt" / "train.log").read_text()
    assert model.config.members == 2 and len(model.heads) == 2  # the cpu profile's ensemble is in the checkpoint


def test_a_failed_training_keeps_its_log_and_the_previous_checkpoint(toy_release, tmp_path, monkeypatch):
    from dermcir.training import pipeline

    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
    args = ["train", "--data", str(toy_release), "--min-cases", "5", "--out", str(tmp_path / "ckpt"), "--quiet", *sets]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def failing_fit(*args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(pipeline, "fit", failing_fit)
    # a checkpoint already there is replaced only when asked to (an index built with it would be lost)
    assert main(args) == 2
    args.append("--overwrite")
    with pytest.raises(RuntimeError, match="fell over"):
        main(args)
    failed = (tmp_path / "ckpt" / "train.failed.log").read_text()
    assert "run stopped by RuntimeError: the device fell over" in failed and "Traceback" in failed
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.name != "train.failed.log"} == before
    # a save that fails (a full disk) ends the failed run's log too: it ran after the log was closed
    import dermcir.checkpoint

    monkeypatch.undo()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dermcir.checkpoint, "save_file", full_disk)
    assert main(args) == 2
    failed = (tmp_path / "ckpt" / "train.failed.log").read_text()
    assert "run stopped by OSError: [Errno 28] No space left on device" in failed and "Traceback" in failed
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir() if p.name != "train.failed.log"} == before


def test_train_refuses_an_out_folder_that_is_not_a_checkpoint_before_it_trains(toy_release, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "cv_cpu").mkdir(parents=True)
    (runs / "cv_cpu" / "results.json").write_text("{}")
    assert main(["train", "--data", str(toy_release), "--min-cases", "5", "--out", str(runs), "--quiet"]) == 2
    assert "runs: holds cv_cpu, so it is not a checkpoint folder" in capsys.readouterr().err
    assert [p.relative_to(runs).as_posix() for p in sorted(runs.rglob("*"))] == ["cv_cpu", "cv_cpu/results.json"]


def test_gpu_profile_checkpoint_holds_its_trained_companion(toy_release, tmp_path):
    settings = {**TINY, "epochs": 1, "batch_size": 6, "refit_epochs": 1, "companion_epochs": 2}
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    rc = main(["train", "--data", str(toy_release), "--min-cases", "5", "--profile", "gpu", "--out",
               str(tmp_path / "ckpt"), "--quiet", *sets])
    assert rc == 0
    from dermcir.checkpoint import load_checkpoint

    model = load_checkpoint(tmp_path / "ckpt")
    assert model.companion is not None and model.companion.config.dim == 64 and len(model.companion.heads) == 2
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "companion.backbone" in meta["frozen"] and [h["epoch"] for h in meta["companion"]["history"]] == [1, 2]
    assert "companion: best epoch" in (tmp_path / "ckpt" / "train.log").read_text()


def test_fit_trains_every_ensemble_member(toy_release):
    from dermcir.training.trainer import fit

    model, inputs, train_cfg, n = _toy_inputs(toy_release, members=2, refit_epochs=0)
    before = [h.levels[1].masks[0].weight.detach().clone() for h in model.heads]
    idx = np.arange(n)
    fit(model, inputs, idx[::2], idx[1::2], train_cfg, torch.device("cpu"), len(model.config.categories), progress=False)
    for m, (head, w) in enumerate(zip(model.heads, before, strict=True)):
        assert not torch.equal(head.levels[1].masks[0].weight, w), f"member {m} did not train"


def _toy_inputs(toy_release, profile="cpu", **overrides):
    from dermcir.data.cache import preprocess_cases
    from dermcir.models import ComposedRetrievalModel
    from dermcir.training import get_profile, prepare_inputs

    cases, _ = load_derm7pt(toy_release, min_cases=5)
    cases, images = preprocess_cases(cases, 64, progress=False)
    model_cfg, train_cfg, views = get_profile(profile, **{**FAST, **overrides})
    model_cfg.categories = sorted({c.category for c in cases})
    model = ComposedRetrievalModel(model_cfg, pretrained=False)
    inputs = prepare_inputs(model, cases, images, train_cfg, views, torch.device("cpu"), progress=False)
    return model, inputs, train_cfg, len(cases)


def test_main_fit_and_companion_fit_each_change_only_their_own_weights(toy_release):
    from dermcir.data.cache import preprocess_cases
    from dermcir.training.pipeline import fit_companion, prepare_companion
    from dermcir.training.trainer import fit

    cpu = torch.device("cpu")
    model, inputs, cfg, n = _toy_inputs(toy_release, "gpu", batch_size=6, epochs=1, refit_epochs=1,
                                        companion={"dim": 16, "heads": 2}, companion_epochs=2)
    idx = np.arange(n)

    def split(state):
        return ({k: v.clone() for k, v in state.items() if k.startswith("companion.")},
                {k: v.clone() for k, v in state.items() if not k.startswith("companion.")})

    companion_before, main_before = split(model.state_dict())
    fit(model, inputs, idx[::2], idx[1::2], cfg, cpu, 3, progress=False, refit_idx=idx)
    companion_after, main_after = split(model.state_dict())
    assert all(torch.equal(companion_before[k], companion_after[k]) for k in companion_before)
    assert not all(torch.equal(main_before[k], main_after[k]) for k in main_before)  # the main model did train

    cases, _ = load_derm7pt(toy_release, min_cases=5)
    cases, images = preprocess_cases(cases, 64, progress=False)
    companion = prepare_companion(model, cases, images, cfg, cpu, progress=False)
    assert companion[1].profile == "cpu" and companion[1].epochs == 2
    # with the main model's inputs the texts are not encoded again: the shared encoder gives the same tokens
    reused = prepare_companion(model, cases, images, cfg, cpu, progress=False, main_inputs=inputs)[0]
    assert reused.tokens is inputs.tokens and reused.source is not inputs.source
    torch.testing.assert_close(reused.tokens, companion[0].tokens)
    assert torch.equal(reused.pad, companion[0].pad) and torch.equal(reused.labels, companion[0].labels)
    result = fit_companion(model, companion, idx[::2], idx[1::2], cpu, progress=False, refit_idx=idx)
    assert result.epochs_run == 2
    companion_final, main_final = split(model.state_dict())
    assert all(torch.equal(main_after[k], main_final[k]) for k in main_after)
    changed = {k for k in companion_after if not torch.equal(companion_after[k], companion_final[k])}
    assert changed and all(k.startswith("companion.heads.") for k in changed)  # never its frozen backbone


def test_the_refit_goes_on_from_the_best_epochs_whole_training_state(toy_release):
    """Weights, category proxies and Adam moments: a run that went on past its best epoch refits as one that stopped
    there. Before, the refit trained the best weights against the proxies and moments of the later epochs. One batch
    per epoch, no dropout and one view, so that nothing else differs between the two runs."""
    import copy

    from dermcir.training.trainer import describe_all, fit, query_embeddings, target_embeddings

    cpu = torch.device("cpu")
    model, inputs, cfg, n = _toy_inputs(toy_release, epochs=10, patience=50, refit_epochs=2, views=1,
                                        token_dropout=0.0, batch_size=64, head_lr=3e-2)
    idx = np.arange(n)
    start = copy.deepcopy(model.state_dict())

    def refit_after(epochs: int):
        model.load_state_dict(start)
        torch.manual_seed(0)  # the proxies' initial values
        result = fit(model, inputs, idx[::2], idx[1::2], replace(cfg, epochs=epochs), cpu, 3, progress=False,
                     refit_idx=idx)
        # the embeddings, not the weights: a parameter whose gradient is only rounding noise (an attention key's
        # bias, to which softmax is blind) moves by Adam's full step either way and changes no output
        out = describe_all(model, inputs, idx, cpu, kinds=("target", "composed"))
        return result.best_epoch, (target_embeddings(out["target"]), query_embeddings(out["composed"], 0.6))

    best, went_on = refit_after(10)
    assert best < 10  # else the two runs below would be the same run
    same_best, stopped = refit_after(best)
    assert same_best == best
    for a, b in zip(went_on, stopped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_fit_stops_at_its_deadline_and_says_why(toy_release):
    import time

    from dermcir.training.trainer import fit

    model, inputs, cfg, n = _toy_inputs(toy_release, epochs=50, patience=50, refit_epochs=0)
    idx = np.arange(n)
    result = fit(model, inputs, idx[::2], idx[1::2], cfg, torch.device("cpu"), 3, progress=False,
                 deadline=time.perf_counter())
    assert result.stopped_by == "time budget" and result.epochs_run == 2  # two epochs at least, to time one
    assert {"train_s", "val_s"} <= set(result.history[0])
    result = fit(model, inputs, idx[::2], idx[1::2], replace(cfg, epochs=3), torch.device("cpu"), 3, progress=False)
    assert result.stopped_by == "epochs" and result.epochs_run == 3


def test_fit_records_validation_acc_at_k_of_the_model_it_keeps(toy_release):
    """Each epoch's validation row carries mAP and Acc@1/2/4, computed like the benchmark's metrics."""
    from dermcir.metrics import retrieval_metrics
    from dermcir.training.trainer import describe_all, fit, query_embeddings, target_embeddings

    model, inputs, cfg, n = _toy_inputs(toy_release, epochs=2, patience=50, refit_epochs=0)
    idx = np.arange(n)
    db, queries = idx[::2], idx[1::2]
    result = fit(model, inputs, db, queries, cfg, torch.device("cpu"), 3, progress=False)
    assert all({"val_mAP", "val_Acc@1", "val_Acc@2", "val_Acc@4"} <= set(row) for row in result.history)
    # fit keeps the best epoch's weights: its row must equal the metrics recomputed from the returned model
    t = describe_all(model, inputs, db, torch.device("cpu"), kinds=("target",))["target"]
    q = describe_all(model, inputs, queries, torch.device("cpu"), kinds=("composed",))["composed"]
    y = inputs.labels.numpy()
    expected = retrieval_metrics((query_embeddings(q, model.config.beta) @ target_embeddings(t).T).numpy(),
                                 y[queries], y[db])
    row = result.history[result.best_epoch - 1]
    assert result.best_val_map == row["val_mAP"]
    for key, value in expected.items():
        assert row[f"val_{key}"] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("select_by, kept", [("mAP", 2), ("all", 1)])
def test_fit_keeps_the_epoch_its_selection_figure_prefers(toy_release, monkeypatch, select_by, kept):
    """Scripted validation figures: epoch 2 has the best mAP, epoch 1 the best mean of all four."""
    from dermcir.training import trainer

    script = iter([{"mAP": 60.0, "Acc@1": 80.0, "Acc@2": 90.0, "Acc@4": 95.0},
                   {"mAP": 70.0, "Acc@1": 70.0, "Acc@2": 70.0, "Acc@4": 70.0},
                   {"mAP": 65.0, "Acc@1": 75.0, "Acc@2": 80.0, "Acc@4": 85.0}])
    monkeypatch.setattr(trainer, "validation_metrics", lambda *args, **kwargs: dict(next(script)))
    model, inputs, cfg, n = _toy_inputs(toy_release, epochs=3, patience=50, refit_epochs=0, select_by=select_by)
    idx = np.arange(n)
    result = trainer.fit(model, inputs, idx[::2], idx[1::2], cfg, torch.device("cpu"), 3, progress=False)
    assert result.best_epoch == kept
    assert result.best_val_map == result.history[kept - 1]["val_mAP"]  # the kept epoch's mAP, whatever selected it


def test_fit_rejects_an_unknown_selection_before_training(toy_release):
    """The config refuses it when made (the CLI's path); fit checks again, since a config's fields can be set later."""
    from dermcir.config import TrainConfig
    from dermcir.training.trainer import fit

    with pytest.raises(ValueError, match="setting select_by='Acc@4': expected 'mAP' or 'all'"):
        TrainConfig(select_by="Acc@4")
    model, inputs, cfg, n = _toy_inputs(toy_release)
    cfg.select_by = "Acc@4"
    with pytest.raises(ValueError, match="select_by must be one of"):
        fit(model, inputs, np.arange(0, n, 2), np.arange(1, n, 2), cfg, torch.device("cpu"), 3, progress=False)


def test_fit_refuses_a_validation_split_that_cannot_give_a_figure(toy_release):
    from dermcir.training.trainer import fit

    model, inputs, cfg, n = _toy_inputs(toy_release)
    labels = inputs.labels.numpy()
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="no validation cases"):
        fit(model, inputs, np.arange(n), np.arange(0), cfg, cpu, 3, progress=False)
    lone = np.flatnonzero(labels == labels[0])  # validation: one category; training: the others only
    rest = np.flatnonzero(labels != labels[0])
    with pytest.raises(ValueError, match=f"none of the {len(lone)} validation cases has a category"):
        fit(model, inputs, rest, lone, cfg, cpu, 3, progress=False)


def test_batch_inputs_trim_padding_and_match_the_index(toy_release):
    _, inputs, _, _ = _toy_inputs(toy_release)
    idx = torch.tensor([3, 0, 5])
    maps, tok, pad, y = inputs.take(idx, idx.clone(), False, torch.device("cpu"))
    assert tok.shape[1] == pad.shape[1] == int(inputs.lengths[idx].max())  # the batch's longest text, no more
    torch.testing.assert_close(tok, inputs.tokens[idx, : tok.shape[1]])
    assert torch.equal(y, inputs.labels[idx]) and all(m.shape[0] == 3 for m in maps)
    assert inputs.on(torch.device("cpu")) is inputs  # already there: no copy


def test_full_batches_cover_every_case_without_repeats_inside_a_batch():
    from dermcir.training.trainer import full_batch_order

    perm = torch.randperm(603)
    order = full_batch_order(perm, 48)
    assert len(order) == 624 and set(order.tolist()) == set(range(603))
    for s in range(0, 624, 48):
        batch = order[s : s + 48].tolist()
        assert len(set(batch)) == 48
    assert torch.equal(full_batch_order(perm[:96], 48), perm[:96])  # already whole batches: unchanged
    assert torch.equal(full_batch_order(perm[:30], 48), perm[:30])  # under one batch: no repeats added


def test_padded_evaluation_batches_give_the_same_descriptors(toy_release):
    from dermcir.training.trainer import describe_all

    model, inputs, _, n = _toy_inputs(toy_release)
    seen: list[int] = []  # the batch size of every target pass
    describe_target = model.describe_target
    model.describe_target = lambda maps: seen.append(maps[0].shape[0]) or describe_target(maps)
    for rows in (7, 3):  # a partial last batch; fewer cases than one batch
        idx = np.arange(n)[::2][:rows]
        plain = describe_all(model, inputs, idx, torch.device("cpu"), batch_size=4)
        seen.clear()
        padded = describe_all(model, inputs, idx, torch.device("cpu"), batch_size=4, full_batches=True)
        assert seen and set(seen) == {4}
        for kind in plain:
            for a, b in zip(plain[kind].locals + plain[kind].globals, padded[kind].locals + padded[kind].globals,
                            strict=True):
                assert a.shape[0] == rows
                torch.testing.assert_close(a, b)


def test_warm_up_leaves_weights_buffers_and_random_state_alone(toy_release):
    from dermcir.training.trainer import warm_up

    # the gpu profile's inputs: the backbone runs in training mode, so batch-norm statistics would move
    model, inputs, cfg, _ = _toy_inputs(toy_release, "gpu", batch_size=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)
    rng = torch.get_rng_state()
    assert warm_up(model, inputs, cfg, torch.device("cpu"), 3) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_bad_settings_are_one_line_errors(toy_release, tmp_path, capsys):
    assert main(["cv", "--data", str(toy_release), "--out", str(tmp_path), "--min-cases", "5", "--set", "colour=3"]) == 2
    assert "unknown setting(s) ['colour']" in capsys.readouterr().err
    assert main(["cv", "--data", str(toy_release), "--out", str(tmp_path)]) == 2
    assert "categories under --min-cases 50: {'nevus': 8" in capsys.readouterr().err
    assert main(["cv", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "meta.csv: not found" in capsys.readouterr().err
    assert main(["cv", "--data", str(toy_release), "--out", str(tmp_path), "--min-cases", "5", "--method", "dahnet",
                 "--time-budget", "60"]) == 2
    assert "--time-budget applies to --method composed only" in capsys.readouterr().err
    assert main(["cv", "--data", str(toy_release), "--out", str(tmp_path), "--min-cases", "5", "--folds", "3",
                 "--only-fold", "3"]) == 2
    assert "--only-fold 3: a 3-fold split has folds 0 to 2" in capsys.readouterr().err  # before loading, now
    assert main(["cv", "--data", str(toy_release), "--out", str(tmp_path), "--min-cases", "5", "--only-fold", "1",
                 "--only-fold", "1"]) == 2
    assert "--only-fold names a fold twice: [1, 1]" in capsys.readouterr().err
    cases, _ = load_derm7pt(toy_release, min_cases=5)  # the Python API checks them itself
    with pytest.raises(ValueError, match=r"only_folds: \[3\] not fold numbers of a 3-fold split \(expected 0..2\)"):
        run_cv(cases, tmp_path / "api", n_folds=3, only_folds=[3], progress=False, **FAST)
    with pytest.raises(ValueError, match=r"only_folds: \[1, 1\] names a fold twice"):
        run_cv(cases, tmp_path / "api", only_folds=[1, 1], progress=False, **FAST)
    # the profile is chosen by name, never overridden: a cpu model trained as the gpu profile trains is neither
    for command in (["train", "--out", str(tmp_path)], ["cv", "--out", str(tmp_path)], ["prepare"]):
        assert main([*command, "--data", str(toy_release), "--min-cases", "5", "--set", "profile=gpu"]) == 2
        assert "--set 'profile=gpu': use --profile cpu|gpu" in capsys.readouterr().err
    # what a command passes by name, an option sets: a --set copy was a TypeError traceback (seed) or went unchecked
    for pair, says in (("seed=1", "use --seed"), ("cache_dir=/tmp/x", "use --cache"), ("device=cuda", "use CUDA_VIS"),
                       ("progress=false", "use --quiet"), ("load_report=1", "not a setting")):
        for command in (["train", "--out", str(tmp_path / "ckpt")], ["cv", "--out", str(tmp_path / "run")]):
            assert main([*command, "--data", str(toy_release), "--min-cases", "5", "--set", pair]) == 2
            assert f"--set {pair!r}: {says}" in capsys.readouterr().err
    # a baseline's device is a setting of its own: it passes (and is checked by the baseline)
    assert main(["cv", "--method", "snf-dca", "--data", str(toy_release), "--min-cases", "5", "--out",
                 str(tmp_path / "b"), "--set", "device=nowhere"]) == 2
    assert "setting device='nowhere'" in capsys.readouterr().err
    from dermcir.training.profiles import get_profile

    with pytest.raises(ValueError, match="profile='gpu': a profile is chosen by its name"):
        get_profile("cpu", profile="gpu")



@pytest.mark.parametrize(("setting", "says"), [
    ({"n_folds": 1}, "n_folds must be a whole number ≥ 2 (one fold queries, the others are its database), got 1"),
    ({"time_budget": 0}, "time_budget must be a finite number of seconds > 0 or None, got 0"),
    ({"time_budget": float("nan")}, "time_budget must be a finite number of seconds > 0 or None, got nan"),
])
def test_run_cv_refuses_impossible_settings_before_preparing(toy_release, tmp_path, monkeypatch, setting, says):
    """Library callers get the check the CLI's argument types make, before minutes of preprocessing."""
    import dermcir.evaluation.cv as cv_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("preprocessing started")

    monkeypatch.setattr(cv_module, "preprocess_cases", must_not_run)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    with pytest.raises(ValueError) as caught:
        run_cv(cases, tmp_path / "run", progress=False, **setting)
    assert str(caught.value) == says


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DERM7PT.is_dir(), reason="shared Derm7pt copy not present")
def test_one_fold_pass_on_the_shared_data(tmp_path):
    """The real data through the real pipeline, briefly: 3 folds, 64 px, 2 epochs (a smoke test, not a benchmark)."""
    cases, _ = load_derm7pt(SHARED_DERM7PT)
    cases = cases[::6]  # 148 cases keep all three categories
    doc = run_cv(cases, tmp_path / "run", profile="cpu", n_folds=3, progress=False, **{**FAST, "epochs": 2})
    assert doc["n_cases"] == len(cases)
    assert sum(r["n_queries"] for r in doc["folds"]) == len(cases)
    assert doc["mean"]["Acc@4"] > 0


def test_gpu_profile_code_path_runs_on_cpu(toy_release, tmp_path):
    """The fine-tuning profile (device-resident images, on-device augmentation, trainable backbone), tiny and brief."""
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    doc = run_cv(cases, tmp_path / "run", profile="gpu", n_folds=2, progress=False, time_budget=600,
                 **{**TINY, "epochs": 1, "patience": 1, "batch_size": 6, "refit_epochs": 1, "companion_epochs": 2})
    assert doc["profile"] == "gpu" and len(doc["folds"]) == 2
    assert [t["stopped_by"] for t in doc["training"]] == ["epochs", "epochs"] and doc["time_budget"] == 600
    # the profile's frozen-backbone companion trains in every fold and is scored alone beside the joint score
    assert [t["companion_best_epoch"] in (1, 2) for t in doc["training"]] == [True, True]
    assert {"composed, main model alone", "composed, companion alone"} <= set(doc["ablations"])
    history = json.loads((tmp_path / "run" / "fold_0" / "metrics.json").read_text())["companion"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert ("| seconds | companion: best epoch | epochs run | stopped by | validation mAP | seconds |"
            in (tmp_path / "run" / "tables.md").read_text())
    assert "## Training per fold" in (tmp_path / "run" / "tables.md").read_text()


def test_a_companion_fitted_in_process_may_take_half_its_folds_share_of_the_budget(toy_release, tmp_path,
                                                                                 monkeypatch):
    """Without workers the companion trains first; a slow one must not leave its fold's main model no time."""
    import time

    from dermcir.evaluation import cv

    shares = {"companion": [], "main": []}
    real_companion, real_fit = cv.fit_companion, cv.fit

    def recording_companion(*args, deadline=None, **kwargs):
        shares["companion"].append(deadline - time.perf_counter())
        return real_companion(*args, deadline=deadline, **kwargs)

    def recording_fit(*args, deadline=None, **kwargs):
        shares["main"].append(deadline - time.perf_counter())
        return real_fit(*args, deadline=deadline, **kwargs)

    monkeypatch.setattr(cv, "fit_companion", recording_companion)
    monkeypatch.setattr(cv, "fit", recording_fit)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    settings = {**TINY, "epochs": 1, "patience": 1, "batch_size": 6, "refit_epochs": 1, "companion_epochs": 2}
    run_cv(cases, tmp_path / "run", profile="gpu", n_folds=2, progress=False, companion_workers=0, time_budget=600,
           **settings)
    # fold 0 of 2: half of its half of the budget for the companion, then (nearly) its whole half for the main model
    assert 0.8 * 150 < shares["companion"][0] <= 150 and 0.8 * 291 < shares["main"][0] <= 291
    assert len(shares["companion"]) == len(shares["main"]) == 2


def test_companions_fitted_in_cpu_workers_score_as_in_process(toy_release, tmp_path):
    """``companion_workers``: each fold's companion trains in a worker process while the main models train, and the
    run's figures and histories are those of fitting it in this process."""
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    settings = {**TINY, "epochs": 1, "patience": 1, "batch_size": 6, "refit_epochs": 1, "companion_epochs": 3}
    here = run_cv(cases, tmp_path / "here", profile="gpu", n_folds=2, progress=False, **settings)
    pooled = run_cv(cases, tmp_path / "pool", profile="gpu", n_folds=2, progress=False, companion_workers=2,
                    **settings)
    for a, b in zip(here["folds"] + [here["mean"]], pooled["folds"] + [pooled["mean"]], strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a if "Acc" in k or k == "mAP")
    for name, ablation in here["ablations"].items():
        assert ablation["mean"] == pytest.approx(pooled["ablations"][name]["mean"], abs=1e-6)
    assert [t["companion_best_epoch"] for t in here["training"]] == [t["companion_best_epoch"] for t in pooled["training"]]
    for fold in (0, 1):
        h0, h1 = (json.loads((tmp_path / r / f"fold_{fold}" / "metrics.json").read_text())["companion"]["history"]
                  for r in ("here", "pool"))
        assert [h["epoch"] for h in h1] == [1, 2, 3]
        assert [h["val_mAP"] for h in h0] == pytest.approx([h["val_mAP"] for h in h1], abs=1e-6)
        assert [h["loss"] for h in h0] == pytest.approx([h["loss"] for h in h1], rel=1e-4)
        # the worker's own log, and the fold's log records the companion it collected
        assert "companion (CPU worker" in (tmp_path / "pool" / f"fold_{fold}" / "companion.log").read_text()
        fold_log = (tmp_path / "pool" / f"fold_{fold}" / "train.log").read_text()
        assert f"(fold {fold})" in fold_log
        # the main model's figures are logged before its companion is collected (kept if the run is stopped then)
        early = ast.literal_eval(re.search(rf"fold {fold}, main model alone \(its companion not yet collected\): "
                                           r"(\{.*\})", fold_log).group(1))
        alone = pooled["ablations"]["composed, main model alone"]["folds"][fold]
        assert early.keys() == {"mAP", "Acc@1", "Acc@2", "Acc@4"}
        assert all(early[k] == pytest.approx(alone[k], abs=0.006) for k in early)
    with pytest.raises(ValueError, match="companion_workers"):
        run_cv(cases, tmp_path / "bad", profile="gpu", n_folds=2, progress=False, companion_workers=-1, **settings)


def test_a_failed_companion_worker_is_fitted_again_in_process(toy_release, tmp_path, caplog):
    from dermcir.data.cache import preprocess_cases
    from dermcir.models import ComposedRetrievalModel
    from dermcir.training.companion_pool import CompanionPool
    from dermcir.training.pipeline import fit_companion, prepare_companion, prepare_inputs
    from dermcir.training.profiles import get_profile

    cases, _ = load_derm7pt(toy_release, min_cases=5)
    model_cfg, cfg, views = get_profile("gpu", **TINY, companion_epochs=2)
    cases, images = preprocess_cases(cases, model_cfg.image_size, None, progress=False)
    model_cfg.categories = sorted({c.category for c in cases})
    model = ComposedRetrievalModel(model_cfg)
    cpu = torch.device("cpu")
    inputs = prepare_inputs(model, cases, images, cfg, views, cpu, progress=False)
    companion = prepare_companion(model, cases, images, cfg, cpu, progress=False, main_inputs=inputs)
    initial = {k: v.clone() for k, v in model.companion.state_dict().items()}
    idx = np.arange(len(cases))
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the worker's log folder should be")
    # the worker's thread count as here: the same arithmetic, so the same weights to the last bit
    pool = CompanionPool(model, companion, workers=1, threads=torch.get_num_threads())
    try:
        pool.submit(0, idx[::2], idx[1::2], idx, blocker / "companion.log")  # the worker cannot write its log
        pool.submit(1, idx[1::2], idx[::2], idx, tmp_path / "fold_1" / "companion.log")
        with caplog.at_level("WARNING", logger="dermcir"):
            result = pool.collect(0, cpu)
            fitted = {k: v.clone() for k, v in model.companion.state_dict().items()}
            pool.collect(1, cpu)  # a worker's weights, loaded into the companion
            from_worker = {k: v.clone() for k, v in model.companion.state_dict().items()}
    finally:
        pool.close()
    assert "fitting it in this process" in caplog.text and "fold 0" in caplog.text and "fold 1" not in caplog.text
    assert any(not torch.equal(initial[k], fitted[k]) for k in initial)
    for train, val, expected in ((idx[::2], idx[1::2], fitted), (idx[1::2], idx[::2], from_worker)):
        model.companion.load_state_dict(initial)
        fit_companion(model, companion, train, val, cpu, progress=False, refit_idx=idx)
        for k, v in model.companion.state_dict().items():
            assert torch.equal(expected[k], v), k
    assert result.epochs_run == 2 and [h["epoch"] for h in result.history] == [1, 2]


def test_companion_workers_that_cannot_start_are_reported_and_the_run_fits_in_process(toy_release, tmp_path, caplog,
                                                                                     monkeypatch):
    import dermcir.evaluation.cv as cv_module

    class Unstartable(cv_module.CompanionPool):  # a thread count torch refuses: every worker's start-up fails
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, threads=-1)

    monkeypatch.setattr(cv_module, "CompanionPool", Unstartable)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    settings = {**TINY, "epochs": 1, "patience": 1, "batch_size": 6, "refit_epochs": 1, "companion_epochs": 2}
    with caplog.at_level("WARNING", logger="dermcir"):
        doc = run_cv(cases, tmp_path / "run", profile="gpu", n_folds=2, progress=False, companion_workers=2, **settings)
    assert "the CPU workers could not start" in caplog.text and "fitted in this process instead" in caplog.text
    assert [t["companion_best_epoch"] in (1, 2) for t in doc["training"]] == [True, True]
    assert not (tmp_path / "run" / "fold_0" / "companion.log").exists()


def test_a_companion_pool_that_cannot_be_made_falls_back_to_fitting_in_process(toy_release, tmp_path, caplog,
                                                                               monkeypatch):
    """E.g. a sandbox without process semaphores (OSError 38 from ProcessPoolExecutor): the run goes on."""
    import dermcir.training.companion_pool as pool_module

    def no_semaphores(*args, **kwargs):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(pool_module, "ProcessPoolExecutor", no_semaphores)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    settings = {**TINY, "epochs": 1, "patience": 1, "batch_size": 6, "refit_epochs": 1, "companion_epochs": 2}
    with caplog.at_level("WARNING", logger="dermcir"):
        doc = run_cv(cases, tmp_path / "run", profile="gpu", n_folds=2, progress=False, companion_workers=2, **settings)
    assert "no CPU worker pool (OSError: [Errno 38] Function not implemented)" in caplog.text
    assert [t["companion_best_epoch"] in (1, 2) for t in doc["training"]] == [True, True]


class _PoolThatFails:
    """A stand-in ProcessPoolExecutor: ``submit`` fails as on a host at its process limit, or ``shutdown`` is
    interrupted (a Ctrl+C while the workers shut down)."""

    def __init__(self, *args, fail_at: str = "submit", **kwargs):
        self.fail_at = fail_at

    def submit(self, *args, **kwargs):
        if self.fail_at == "submit":
            raise OSError(11, "Resource temporarily unavailable")
        return Future()

    def shutdown(self, *args, **kwargs):
        if self.fail_at == "shutdown":
            raise KeyboardInterrupt


def test_a_companion_pool_leaves_no_temp_folder_when_it_fails_to_start_or_is_interrupted(toy_release, tmp_path,
                                                                                         monkeypatch):
    """Its workers' inputs (~100 MB for the 888 cases) stayed in the temp folder when the first submit could not
    start a process, or when the run was interrupted while its workers shut down."""
    import functools
    import tempfile

    import dermcir.training.companion_pool as pool_module

    model, companion, _idx = _model_with_an_endless_companion(toy_release)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setattr(pool_module, "ProcessPoolExecutor", functools.partial(_PoolThatFails, fail_at="submit"))
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        pool_module.CompanionPool(model, companion, workers=1)
    assert list(temp.iterdir()) == []
    monkeypatch.setattr(pool_module, "ProcessPoolExecutor", functools.partial(_PoolThatFails, fail_at="shutdown"))
    pool = pool_module.CompanionPool(model, companion, workers=1)
    assert len(list(temp.iterdir())) == 1
    with pytest.raises(KeyboardInterrupt):
        pool.close()
    assert list(temp.iterdir()) == []


def test_a_validation_fraction_that_leaves_too_few_to_train_is_named_before_the_features(toy_release, tmp_path,
                                                                                         monkeypatch):
    """``--set val_fraction=0.9`` ended, after the backbone's features, in scikit-learn's "The train_size = 1
    should be greater or equal to the number of classes = 3"."""
    import dermcir.evaluation.cv as cv_module

    def no_features(*args, **kwargs):
        raise AssertionError("features computed before the split was checked")

    monkeypatch.setattr(cv_module, "prepare_inputs", no_features)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    with pytest.raises(ValueError, match=r"val_fraction=0.9 leaves 1 of 16 cases for training, fewer than the 3 "):
        run_cv(cases, tmp_path / "run", n_folds=3, progress=False, **{**FAST, "val_fraction": 0.9})


def test_a_worker_that_never_answers_is_given_up_on_after_the_deadline(toy_release, tmp_path, caplog):
    """A hung worker must not hold the run's results past its time budget: ``collect`` waits until GRACE seconds
    after the job's deadline, then fits the companion here; ``close`` then stops the pool instead of waiting."""
    import time
    from pathlib import Path

    from dermcir.training.companion_pool import CompanionPool

    model, endless, idx = _model_with_an_endless_companion(toy_release)
    pool = CompanionPool(model, endless, workers=1)
    payload_dir = Path(pool._payload_dir)
    pool.GRACE = 2.0
    workers = []
    try:
        assert pool.started() and (payload_dir / "start.pkl").is_file()
        pool.submit(0, idx[::2], idx[1::2], idx, tmp_path / "companion.log")  # no deadline: it never ends
        workers = list(pool._pool._processes.values())
        deadline = time.time() + 1
        future, (train, val, refit, _) = pool._jobs[0]
        pool._jobs[0] = (future, (train, val, refit, deadline))  # the deadline the hung job ignores
        assert not pool.ready(0)
        with caplog.at_level("WARNING", logger="dermcir"):
            result = pool.collect(0, torch.device("cpu"))  # fitted here: two epochs (the deadline has passed)
        assert time.time() >= deadline + 2.0 - 0.5
        assert "has not answered 2 s after the deadline; fitting it in this process" in caplog.text
        assert result.epochs_run == 2 and result.stopped_by == "time budget"
        before = time.time()
        pool.close()  # the job given up on still runs: close must stop it, not wait for it
        assert time.time() - before < 30
        for _ in range(200):
            if all(process.exitcode is not None for process in workers):
                break
            time.sleep(0.1)
        assert all(process.exitcode is not None for process in workers)
    finally:  # should the test fail, no endless job may outlive it
        for process in workers:
            process.kill()
        pool.close(terminate=True)
    assert not payload_dir.exists()  # the start-up file goes with the pool


def test_a_failed_job_is_not_ready_so_its_refit_waits_for_the_main_models(toy_release, tmp_path):
    from dermcir.training.companion_pool import CompanionPool

    model, (c_inputs, c_cfg), idx = _model_with_an_endless_companion(toy_release)
    pool = CompanionPool(model, (c_inputs, replace(c_cfg, epochs=1)), workers=1)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the worker's log folder should be")
    try:
        pool.submit(0, idx[::2], idx[1::2], idx, blocker / "companion.log")  # fails: it cannot write its log
        pool.submit(1, idx[1::2], idx[::2], idx, tmp_path / "fold_1" / "companion.log")
        for future, _ in pool._jobs.values():
            future.exception(timeout=300)  # both ended, one of them failed
        assert (pool.ready(0), pool.ready(1)) == (False, True)
    finally:
        pool.close()


def _model_with_an_endless_companion(toy_release):
    """A tiny gpu-profile model, its companion's inputs with settings that would train for hours (no early stop),
    and the case indices: (model, (inputs, settings), indices)."""
    from dermcir.data.cache import preprocess_cases
    from dermcir.models import ComposedRetrievalModel
    from dermcir.training.pipeline import prepare_companion, prepare_inputs
    from dermcir.training.profiles import get_profile

    cases, _ = load_derm7pt(toy_release, min_cases=5)
    model_cfg, cfg, views = get_profile("gpu", **TINY)
    cases, images = preprocess_cases(cases, model_cfg.image_size, None, progress=False)
    model_cfg.categories = sorted({c.category for c in cases})
    model = ComposedRetrievalModel(model_cfg)
    cpu = torch.device("cpu")
    inputs = prepare_inputs(model, cases, images, cfg, views, cpu, progress=False)
    c_inputs, c_cfg = prepare_companion(model, cases, images, cfg, cpu, progress=False, main_inputs=inputs)
    return model, (c_inputs, replace(c_cfg, epochs=100_000, patience=100_000)), np.arange(len(cases))


def _run_killed_while_its_companion_trains(toy_release, folder) -> None:
    """A ``dermcir cv`` killed outright (SIGKILL) while a companion worker trains: writes the worker's pid, then dies."""
    import os
    import time
    from pathlib import Path

    from dermcir.training.companion_pool import CompanionPool

    model, endless, idx = _model_with_an_endless_companion(toy_release)
    pool = CompanionPool(model, endless, workers=1)
    pool.submit(0, idx[::2], idx[1::2], idx, Path(folder) / "companion.log")  # no deadline: it never ends
    deadline = time.monotonic() + 120
    while not (Path(folder) / "companion.log").exists() and time.monotonic() < deadline:  # the job has begun
        time.sleep(0.05)
    Path(folder, "worker").write_text(str(next(iter(pool._pool._processes))))
    os._exit(9)


@pytest.mark.skipif(os.name != "posix", reason="checks on the worker's pid (os.kill(pid, 0) ends a process on Windows)")
def test_companion_workers_end_when_their_run_is_killed_outright(toy_release, tmp_path, monkeypatch):
    """Left alone, the worker would train its endless job on and then wait for another job, for ever, and the run's
    start-up file (~150 MB for the real data) would stay in the temporary folder."""
    import contextlib
    import multiprocessing
    import signal

    from tests.test_waits import _ended

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where the run's start-up folder goes
    run = multiprocessing.get_context("spawn").Process(target=_run_killed_while_its_companion_trains,
                                                       args=(toy_release, str(tmp_path)))
    run.start()
    worker = None
    try:
        run.join(180)
        assert run.exitcode == 9
        worker = int((tmp_path / "worker").read_text())
        assert _ended(worker, 30)
        assert not list(tmp_path.glob("dermcir-companions-*"))
    finally:  # should the test fail, neither process may outlive it
        run.kill()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_closing_a_companion_pool_on_failure_stops_its_running_jobs(toy_release, tmp_path):
    import signal
    import time

    from dermcir.training.companion_pool import CompanionPool

    model, endless, idx = _model_with_an_endless_companion(toy_release)
    pool = CompanionPool(model, endless, workers=1)
    assert pool.started()
    pool.submit(0, idx[::2], idx[1::2], idx, tmp_path / "companion.log")
    for _ in range(600):  # until the job is running (its first epoch is logged)
        if "epoch 1 " in ((tmp_path / "companion.log").read_text() if (tmp_path / "companion.log").exists() else ""):
            break
        time.sleep(0.1)
    workers = list(pool._pool._processes.values())
    try:
        pool.close(terminate=True)
        # the executor's own thread may reap a worker first, so watch the exit codes rather than join here
        for _ in range(200):
            if all(process.exitcode is not None for process in workers):
                break
            time.sleep(0.1)
        assert [process.exitcode for process in workers] == [-signal.SIGTERM] * len(workers)
    finally:  # should the test fail, no endless job may outlive it
        for process in workers:
            process.kill()


def test_companions_in_workers_stop_at_the_runs_deadline_even_when_refitted_here(toy_release, tmp_path):
    """A companion that would train for hours stops at ``wall_deadline`` like early stopping, in its worker and in
    the in-process refit of a failed job, so a run with a time budget never waits past it for companions."""
    import time

    from dermcir.training.companion_pool import CompanionPool

    model, endless, idx = _model_with_an_endless_companion(toy_release)
    cpu = torch.device("cpu")
    pool = CompanionPool(model, endless, workers=1)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the worker's log folder should be")
    try:
        assert pool.started()
        deadline = time.time() + 8
        pool.submit(0, idx[::2], idx[1::2], idx, tmp_path / "companion.log", deadline)
        pool.submit(1, idx[1::2], idx[::2], idx, blocker / "companion.log", deadline)  # fails: refitted here
        results = [pool.collect(0, cpu), pool.collect(1, cpu)]
        finished = time.time()
    finally:
        pool.close(terminate=True)
    assert [r.stopped_by for r in results] == ["time budget", "time budget"]
    # fold 1 is refitted here after the deadline: the two epochs fit always runs, then its refit
    assert results[0].epochs_run >= 2 and results[1].epochs_run == 2
    # without the deadline these would run for hours; the slack is for a loaded machine (the refit's 10 epochs)
    assert finished < deadline + 60
    assert "stopped by time budget" in (tmp_path / "companion.log").read_text()


def test_a_time_budget_gives_the_companion_workers_deadlines_by_wave(toy_release, tmp_path, monkeypatch):
    """One worker, two folds: the first fold's companion must stop halfway, or the queued one would start at the
    budget's end and overrun it."""
    import time

    import dermcir.evaluation.cv as cv_module

    deadlines = []

    class Recording(cv_module.CompanionPool):
        def submit(self, *args, **kwargs):
            deadlines.append(args[-1])
            return super().submit(*args, **kwargs)

    monkeypatch.setattr(cv_module, "CompanionPool", Recording)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    settings = {**TINY, "epochs": 1, "patience": 1, "batch_size": 6, "refit_epochs": 1, "companion_epochs": 2}
    before = time.time()
    doc = run_cv(cases, tmp_path / "run", profile="gpu", n_folds=2, progress=False, companion_workers=1,
                 time_budget=300, **settings)
    assert len(deadlines) == 2
    assert before + 0.9 * 300 < deadlines[1] <= before + 0.97 * 300 + 1  # the last wave: the budget's end
    # the first of two waves: halfway from when the jobs were queued (after preparation) to that end
    assert 0.4 * 300 < deadlines[0] - before < 0.6 * 300
    assert [t["companion_stopped_by"] for t in doc["training"]] == ["epochs", "epochs"]
    tables = (tmp_path / "run" / "tables.md").read_text()
    assert "| companion: best epoch | epochs run | stopped by |" in tables and "| 2 | epochs |" in tables


def test_the_companion_trains_in_float32_on_every_path():
    """CPU workers fit it in float32; fitted in the GPU process (no workers, a failed one, ``train``) it must be too."""
    from dermcir.training.profiles import companion_training, get_profile

    _, main_cfg, _ = get_profile("gpu", seed=3)
    assert main_cfg.amp  # the main model keeps its bf16 autocast
    train_cfg, views = companion_training(main_cfg)
    assert train_cfg.amp is False and train_cfg.profile == "cpu" and train_cfg.seed == 3 and views == 2


def test_companion_workers_by_default_only_on_a_gpu():
    from dermcir.training.companion_pool import default_workers

    assert default_workers(torch.device("cpu"), jobs=5, cores=64) == 0  # the main model needs the cores
    assert default_workers(torch.device("cuda"), jobs=5, cores=16) == 5  # one per fold, two cores each
    assert default_workers(torch.device("cuda"), jobs=5, cores=8) == 3
    assert default_workers(torch.device("cuda"), jobs=5, cores=2) == 0  # no spare cores: fitted in-process


def test_host_cores_honours_a_cgroup_quota(tmp_path):
    from dermcir.training.companion_pool import host_cores

    affinity = host_cores(tmp_path / "absent")
    assert affinity >= 1
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 cores' worth
    assert host_cores(tmp_path / "cpu.max") == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert host_cores(tmp_path / "cpu.max") == affinity


def test_device_augmentation_keeps_shape_dtype_and_content():
    import torch

    from dermcir.training.features import augment_on_device

    x = torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8)
    y = augment_on_device(x)
    assert y.shape == x.shape and y.dtype == torch.uint8
    # flips/transposes/jitter keep each image's sorted intensities close (no mixing between images)
    for a, b in zip(x.float(), y.float()):
        assert abs(a.mean() - b.mean()) < 20


@pytest.mark.parametrize(("profile", "sets", "features"), [
    ("cpu", [], 2),  # two cached views of the frozen backbone per case
    ("gpu", [], 2),  # the companion's frozen maps; the fine-tuned backbone has nothing to cache
    ("gpu", ["--set", "companion=null"], 0),
])
def test_prepare_caches_the_frozen_maps_a_profile_will_read(toy_release, tmp_path, profile, sets, features):
    cache = tmp_path / "cache"
    rc = main(["prepare", "--data", str(toy_release), "--min-cases", "5", "--profile", profile, "--cache", str(cache),
               "--quiet", "--set", "image_size=64", *sets])
    assert rc == 0
    assert len(list((cache / "images").glob("*"))) == 24
    assert len(list((cache / "features").glob("*.safetensors"))) == features * 24


def test_prepare_says_when_no_image_is_usable(toy_release, tmp_path, capsys):
    """A release checked out without its Git LFS contents: every image is a pointer file (was an IndexError)."""
    for image in (toy_release / "images").rglob("*.jpg"):
        image.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    rc = main(["prepare", "--data", str(toy_release), "--min-cases", "5", "--cache", str(tmp_path / "cache"),
               "--quiet", "--set", "image_size=64"])
    assert rc == 2
    assert "none of the 24 cases has a usable image (each is listed above)" in capsys.readouterr().err


@pytest.mark.parametrize(("setting", "says"), [
    ("epochs=-3", "setting epochs=-3: expected an integer >= 1"),
    ("beta=2", "setting beta=2: expected a number in [0, 1]"),
    ("val_fraction=0", "setting val_fraction=0: expected a number in (0, 1)"),
    ("dim=30", "setting dim=30: expected an integer >= 1 divisible by heads=4"),
    ('lr="fast"', "setting lr='fast': expected a finite number"),
    ("views=0", "setting views=0: expected a whole number from 1 to 4 (identity, hflip, vflip, rot180)"),
    ("views=-3", "setting views=-3: expected a whole number from 1 to 4"),
    ("views=2.7", "setting views=2.7: expected a whole number from 1 to 4"),
    ('views="x"', "setting views='x': expected a whole number from 1 to 4"),
    ("members=0", "setting members=0: expected an integer >= 1"),
    ("grid=3", "grid=3: a model on cached backbone features (the cpu profile, a companion) needs a grid that divides 16"),
    ('select_by="best"', "setting select_by='best': expected 'mAP' or 'all'"),
    ('backbone="resnet"', "setting backbone='resnet': expected a registered backbone: lite0, swin_t"),
    ('text_encoder="clip"', "setting text_encoder='clip': expected a registered text encoder: bert, minilm"),
])
def test_impossible_model_and_training_settings_are_one_line_errors(toy_release, tmp_path, capsys, setting, says):
    """The composed model's settings are checked as the baselines' are (``dermcir.settings``); before, ``--set
    epochs=-3`` ran to the end and wrote results of an untrained model."""
    assert main(["cv", "--data", str(toy_release), "--out", str(tmp_path / "run"), "--min-cases", "5",
                 "--cache", str(tmp_path / "cache"), "--set", setting]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # before any image was read


@pytest.mark.parametrize(("setting", "says"), [
    ('companion={"dim": -4}', "companion: setting dim=-4: expected an integer >= 1 divisible by heads=8"),
    ('companion={"grid": 3}', "companion: grid=3: a model on cached backbone features"),
    ('companion={"members": 0}', "companion: setting members=0: expected an integer >= 1"),
])
def test_a_companions_impossible_settings_are_refused_before_any_image_is_read(toy_release, tmp_path, capsys,
                                                                              setting, says):
    assert main(["cv", "--data", str(toy_release), "--out", str(tmp_path / "run"), "--min-cases", "5",
                 "--profile", "gpu", "--cache", str(tmp_path / "cache"), "--set", setting]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run").exists()  # refused before anything was prepared or written


def test_a_run_that_fails_ends_its_log_with_the_error_and_its_traceback(toy_release, tmp_path, capsys, caplog):
    """The console gives a ValueError one line; cv.log keeps the traceback (and ``-v`` prints it)."""
    release_args = ["--data", str(toy_release), "--min-cases", "5", "--folds", "2", "--quiet",
                    *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]
    # a budget that preparation alone uses up fails inside the run, after its log has begun
    assert main(["cv", *release_args, "--time-budget", "0.001", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "used up by preparation" in err and "Traceback" not in err
    text = (tmp_path / "run" / "cv.log").read_text()
    assert "run stopped by ValueError: time budget" in text and "Traceback (most recent call last)" in text
    with caplog.at_level(logging.DEBUG, logger="dermcir"):  # what -v turns on
        assert main(["-v", "cv", *release_args, "--time-budget", "0.001", "--out", str(tmp_path / "run2")]) == 2
    assert [r.exc_info[0] for r in caplog.records if r.getMessage() == "cv failed"] == [ValueError]


def test_cases_without_a_query_text_are_named_before_any_image_is_read(toy_release, tmp_path, monkeypatch, capsys):
    """A case whose checklist cells are all empty has no text: training failed after the features with "text 0 is
    empty; give a description or use an image-only query" (an index into the distinct texts, and search advice)."""
    import dermcir.data.cache as cache_module

    def no_images(*args, **kwargs):
        raise AssertionError("images prepared before the texts were checked")

    monkeypatch.setattr(cache_module, "preprocess_cases", no_images)
    monkeypatch.setattr("dermcir.evaluation.cv.preprocess_cases", no_images)
    monkeypatch.setattr("dermcir.training.pipeline.preprocess_cases", no_images)
    cases, _ = load_derm7pt(toy_release, min_cases=5)
    bare = [replace(cases[3], fields={}), replace(cases[7], fields={"pigment_network": "  "})]
    cases[3], cases[7] = bare
    says = (f"2 of {len(cases)} cases have no query text (none of their checklist fields is given): "
            f"{bare[0].case_id}, {bare[1].case_id}; training reads a text for every case")
    with pytest.raises(ValueError, match=re.escape(says)):
        run_cv(cases, tmp_path / "run", n_folds=2, progress=False, **FAST)
    assert says in (tmp_path / "run" / "cv.log").read_text()
    with pytest.raises(ValueError, match=re.escape(says)):
        train_on_cases(cases, tmp_path / "model", progress=False, **FAST)
    assert says in (tmp_path / "model" / "train.failed.log").read_text()
    # the CLI: a release whose rows leave every checklist cell empty
    from dermcir.data.text import CHECKLIST_FIELDS

    rows = [{"diagnosis": d, **dict.fromkeys(CHECKLIST_FIELDS, "")}
            for d in ("clark nevus", "melanoma", "seborrheic keratosis") for _ in range(5)]
    release = write_release(tmp_path / "bare_release", rows)
    for command in ("prepare", "train"):
        out = [] if command == "prepare" else ["--out", str(tmp_path / "cli_model")]
        assert main([command, "--data", str(release), "--min-cases", "5", "--quiet", *out]) == 2
        assert "15 of 15 cases have no query text" in capsys.readouterr().err


def test_a_run_log_leaves_the_callers_console_at_its_level(tmp_path):
    """``train_on_cases``/``run_cv`` lowered the ``dermcir`` logger to INFO for the run, so an application whose
    console shows warnings only printed every epoch's line."""
    from dermcir.training.pipeline import run_log

    class Console(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(f"{record.levelname} {record.getMessage()}")

    console, top = Console(), logging.getLogger()
    old_level, dermcir_logger = top.level, logging.getLogger("dermcir")
    found = (dermcir_logger.level, dermcir_logger.propagate)  # another test's CLI run may have set them
    dermcir_logger.setLevel(logging.NOTSET)
    dermcir_logger.propagate = True
    top.addHandler(console)
    top.setLevel(logging.WARNING)
    try:
        with run_log(tmp_path / "run.log"):
            logging.getLogger("dermcir.training.trainer").info("epoch 1 loss 0.5")
            logging.getLogger("dermcir.training.pipeline").warning("a category is small")
        logging.getLogger("dermcir.training.trainer").info("after the run")
        after_the_run = (dermcir_logger.level, dermcir_logger.propagate)
    finally:
        top.removeHandler(console)
        top.setLevel(old_level)
        dermcir_logger.setLevel(found[0])
        dermcir_logger.propagate = found[1]
    assert console.lines == ["WARNING a category is small"]
    written = (tmp_path / "run.log").read_text()
    assert "INFO dermcir.training.trainer: epoch 1 loss 0.5" in written and "a category is small" in written
    assert after_the_run == (logging.NOTSET, True)  # as the run found them


@pytest.mark.parametrize("run", ["cv", "train"])
def test_one_category_is_refused_not_reported_as_100_percent(tmp_path, monkeypatch, run):
    """With one category left (a --min-cases above all but one), the loss was 0 and every figure 100.0 ± 0.0 in
    tables.md; now refused, before any image is read, naming what the threshold left out."""
    rows = ([{"diagnosis": "clark nevus", "streaks": "absent"}] * 10 + [{"diagnosis": "melanoma", "streaks": "irregular"}] * 8
            + [{"diagnosis": "seborrheic keratosis", "streaks": "absent"}] * 6)
    cases, report = load_derm7pt(write_release(tmp_path / "release_v0", rows), min_cases=9)
    assert {c.category for c in cases} == {"nevus"}

    def no_image(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr("dermcir.evaluation.cv.preprocess_cases", no_image)
    monkeypatch.setattr("dermcir.training.pipeline.preprocess_cases", no_image)
    says = re.escape("only one category is left ('nevus': 10 cases); left out by the category threshold "
                     "(--min-cases): melanoma (8), benign keratosis-like (6); retrieval by category needs at least two")
    with pytest.raises(ValueError, match=says):
        if run == "cv":
            run_cv(cases, tmp_path / "run", n_folds=2, progress=False, load_report=report, **FAST)
        else:
            train_on_cases(cases, tmp_path / "model", progress=False, load_report=report, **FAST)


def _constant_loss(value: float):
    def member_loss(head, *args):  # differentiable, so that the step runs as with the real loss
        return sum(p.sum() for p in head.parameters()) * 0 + value
    return member_loss


def test_the_epoch_loss_is_the_mean_over_the_steps_taken(toy_release, monkeypatch):
    """A lone last case is no step, but was counted in the mean: the logged loss was halved (9 cases, batch 8)."""
    from dermcir.training import trainer

    model, inputs, cfg, n = _toy_inputs(toy_release, epochs=1, patience=50, refit_epochs=0, batch_size=8)
    monkeypatch.setattr(trainer, "_member_loss", _constant_loss(1.0))
    idx = np.arange(n)
    result = trainer.fit(model, inputs, idx[:9], idx[9:], cfg, torch.device("cpu"), 3, progress=False)
    assert result.history[0]["loss"] == pytest.approx(len(model.heads))  # each step: 1.0 per head set


def test_a_diverged_training_says_so(toy_release, monkeypatch):
    """It ended with the metrics' "scores contain NaN or infinite values", with no word of training or what to do."""
    from dermcir.training import trainer

    model, inputs, cfg, n = _toy_inputs(toy_release, epochs=3, patience=50, refit_epochs=0)
    monkeypatch.setattr(trainer, "_member_loss", _constant_loss(float("nan")))
    idx = np.arange(n)
    with pytest.raises(ValueError, match=r"training diverged in epoch 1 \(mean loss nan\); lower head_lr \(now "):
        trainer.fit(model, inputs, idx[::2], idx[1::2], cfg, torch.device("cpu"), 3, progress=False)


def test_training_texts_longer_than_the_encoder_reads_are_refused(toy_release, tmp_path):
    """With --set max_text_tokens below the template's length every training text was cut without a word, texts
    became equal, and the model then refused its own checklists at search."""
    cases, report = load_derm7pt(toy_release, min_cases=5)
    with pytest.raises(ValueError, match=r"longer than the text encoder reads \(8 tokens, the model's max_text_tokens\)"):
        train_on_cases(cases, tmp_path / "model", progress=False, load_report=report, **{**FAST, "max_text_tokens": 8})
