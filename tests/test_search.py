"""The Python search API and the ``dermcir index | search | demo`` commands."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dermcir.checkpoint import load_checkpoint
from dermcir.cli import main
from dermcir.data import load_rgb, preprocess, render_report
from dermcir.index import FingerprintMismatchError, add_cases, build_index, open_index, remove_cases
from dermcir.search import CaseSearcher, QueryError, compose_text

from .searchkit import (  # noqa: F401 (one_torch_thread is a fixture)
    CHECKLIST,
    encode,
    lesion,
    make_cases,
    make_checkpoint,
    make_index,
    one_torch_thread,
    write_case_csv,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("search")
    ckpt, root, cases = make_index(tmp, 12)
    return ckpt, root, cases, CaseSearcher(root)


def test_composed_score_is_eq9_and_parts_add_up(setup):
    ckpt, _root, cases, searcher = setup
    query_image = cases[4].image
    response = searcher.search(image=query_image, checklist=CHECKLIST["melanoma"], text="irregular border", k=12)
    assert response.mode == "composed" and len(response.results) == 12
    assert response.text == render_report(CHECKLIST["melanoma"]) + " irregular border"
    scores = [r.score for r in response.results]
    assert scores == sorted(scores, reverse=True) and [r.rank for r in response.results] == list(range(1, 13))

    model = load_checkpoint(ckpt)
    beta = model.config.beta
    view = np.array(preprocess(load_rgb(query_image), 64)[None])  # writable, as torch wants
    with torch.no_grad():
        tokens, pad = model.text_features([response.text])
        q = model.describe_query(model.image_features(view), tokens, pad)
        for r in response.results[:3]:
            t = model.describe_target(model.image_features(np.array(preprocess(load_rgb(r.image), 64)[None])))
            for level in range(3):
                local = beta * F.cosine_similarity(q.locals[level], t.locals[level]).item()
                glob = (1 - beta) * F.cosine_similarity(q.globals[level], t.globals[level]).item()
                assert r.parts[f"local_{level + 1}"] == pytest.approx(local, abs=1e-4)
                assert r.parts[f"global_{level + 1}"] == pytest.approx(glob, abs=1e-4)
            assert sum(r.parts.values()) == pytest.approx(r.score, abs=1e-4)
    record = response.results[0].to_dict()
    assert set(record) >= {"rank", "case_id", "image", "diagnosis", "category", "score", "local", "global", "parts"}


def test_search_with_a_companion_scores_both_models_and_its_parts_add_up(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", companion={"dim": 16, "heads": 2, "members": 2}, companion_weight=0.4)
    _, root, cases = make_index(tmp_path, 8, ckpt=ckpt)
    searcher = CaseSearcher(root)
    response = searcher.search(image=cases[2].image, checklist=CHECKLIST["nevus"], k=8, heatmaps=True)
    model = load_checkpoint(ckpt)
    view = np.array(preprocess(load_rgb(cases[2].image), 64)[None])
    with torch.no_grad():
        tokens, pad = model.text_features([response.text])
        scores = []
        for m in (model, model.companion):  # each model's own Eq. 9 on this query and the top case
            q = m.describe_query(m.image_features(view), tokens, pad)
            top = np.array(preprocess(load_rgb(response.results[0].image), 64)[None])
            t = m.describe_target(m.image_features(top))
            scores.append(sum(0.6 * F.cosine_similarity(q.locals[i], t.locals[i]).item()
                              + 0.4 * F.cosine_similarity(q.globals[i], t.globals[i]).item() for i in range(3)))
    top = response.results[0]
    assert top.score == pytest.approx(0.6 * scores[0] + 0.4 * scores[1], abs=1e-4)
    assert len(top.parts) == 12 and sum(top.parts.values()) == pytest.approx(top.score, abs=1e-4)
    record = top.to_dict()
    assert record["local"] + record["global"] == pytest.approx(top.score, abs=1e-4)
    assert len(response.query_heatmaps) == 3 and len(top.heatmaps) == 3  # the main model's attention


def test_query_modes(setup):
    *_, cases, searcher = setup
    assert searcher.search(image=cases[0].image, k=3).mode == "image"
    text_only = searcher.search(text="blue-whitish veil present", k=3)
    assert text_only.mode == "text" and text_only.text == "blue-whitish veil present"
    checklist_only = searcher.search(checklist={"Blue-Whitish Veil": "Present"}, k=3)
    assert checklist_only.text == "Dermoscopy: blue-whitish veil present."
    image_only = searcher.search(image=cases[0].image, k=1)
    assert image_only.results[0].case_id == cases[0].case_id  # the image is its own nearest neighbour


def test_image_inputs_are_equivalent(setup):
    *_, cases, searcher = setup
    path = cases[5].image
    by_path = searcher.search(image=path, text="streaks irregular", k=5)
    by_bytes = searcher.search(image=path.read_bytes(), text="streaks irregular", k=5)
    by_array = searcher.search(image=load_rgb(path), text="streaks irregular", k=5)
    for other in (by_bytes, by_array):
        assert [r.case_id for r in other.results] == [r.case_id for r in by_path.results]
        assert [r.score for r in other.results] == pytest.approx([r.score for r in by_path.results], abs=1e-5)
    with pytest.raises(QueryError, match="uint8 of shape"):
        searcher.search(image=np.zeros((8, 8), np.float32))
    # a QueryError (a service answers 400), not a TypeError from deep inside (a 500)
    with pytest.raises(QueryError, match="image must be a path, the bytes of an image file or a uint8 array, got int"):
        searcher.search(image=123)


def test_heatmaps_on_request(setup):
    _ckpt, root, cases, searcher = setup
    plain = searcher.search(image=cases[1].image, k=2)
    assert plain.query_heatmaps is None and plain.results[0].heatmaps is None and "heatmaps" not in plain.to_dict()
    shown = searcher.search(image=cases[1].image, text="streaks irregular", k=2, heatmaps=True)
    q = np.array(shown.query_heatmaps)
    assert q.shape == (3, 16, 16) and 0 <= q.min() and q.max() == pytest.approx(1.0)
    index = open_index(root)
    top = shown.results[0]
    np.testing.assert_allclose(np.array(top.heatmaps), index.heatmaps[index.row_of(top.case_id)], atol=1e-3)
    assert shown.query_view.shape == (64, 64, 3)
    assert searcher.search(text="streaks irregular", k=1, heatmaps=True).query_heatmaps is None  # no query image


def test_k_larger_than_index_and_bad_k(setup):
    *_, cases, searcher = setup
    assert len(searcher.search(image=cases[0].image, k=100).results) == 12
    for bad in (0, -3, 2.5, True, np.int64(0)):
        with pytest.raises(QueryError, match="k must be a positive integer"):
            searcher.search(image=cases[0].image, k=bad)
    assert len(searcher.search(image=cases[0].image, k=np.int64(3)).results) == 3  # numpy's integers are integers


def test_the_readme_encoders_take_preprocessed_images_without_a_warning(setup, recwarn):
    """``preprocess`` returns read-only views; torch warned on each one the README's snippet encoded."""
    ckpt, _root, cases, _searcher = setup
    model = load_checkpoint(ckpt)
    view = preprocess(load_rgb(cases[0].image), model.config.image_size)
    assert not view.flags.writeable
    with torch.inference_mode():
        model.encode_target(view[None])
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_compose_text_rules():
    assert compose_text("  ", {}) is None
    assert compose_text("a\n  b") == "a b"
    with pytest.raises(QueryError, match="unknown checklist field 'colour'; allowed fields: pigment_network"):
        compose_text(checklist={"colour": "brown"})
    for bad, said in ((["streaks"], "got list"), ("streaks", "got str"), ({1: "absent"}, "names are strings, got 1")):
        with pytest.raises(QueryError, match=f"checklist .*{said}"):
            compose_text(checklist=bad)


def test_other_model_is_refused(setup, tmp_path):
    _ckpt, root, *_ = setup
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(FingerprintMismatchError, match="is not the model that encoded index"):
        CaseSearcher(root, checkpoint=other)


def test_missing_checkpoint_is_named(tmp_path, setup):
    _ckpt, root, *_ = setup
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CaseSearcher(root, checkpoint=tmp_path / "nowhere")


def test_concurrent_searches_match_sequential(setup):
    *_, cases, searcher = setup
    queries = [{"image": c.image, "text": t, "k": 5} for c in cases[:6] for t in (None, "pigment network atypical")]
    expected = [[(r.case_id, r.score) for r in searcher.search(**q).results] for q in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: [(r.case_id, r.score) for r in searcher.search(**q).results], queries * 3))
    assert got == expected * 3


def test_searches_during_updates_see_whole_versions(tmp_path):
    _ckpt, root, cases = make_index(tmp_path, 6)
    searcher = CaseSearcher(root)
    model = searcher.model
    new = make_cases(tmp_path / "more", 3, start=50)
    errors, sizes = [], []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                response = searcher.search(image=cases[0].image, k=50)
                assert len(response.results) == response.index_size  # k > size: every case of that version
                assert len({r.case_id for r in response.results}) == response.index_size
                sizes.append(response.index_size)
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for case in new:
        add_cases(root, [case], model=model, cache_dir=tmp_path / "cache", progress=False)
    remove_cases(root, ["c000"])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    final = searcher.search(image=cases[1].image, k=50)
    assert final.index_size == 8 and "c000" not in {r.case_id for r in final.results}
    assert set(sizes) <= {6, 7, 8, 9}


def test_a_version_from_another_model_is_not_switched_to(tmp_path, caplog):
    _ckpt, root, cases = make_index(tmp_path, 4)
    searcher = CaseSearcher(root)
    other = make_checkpoint(tmp_path / "other", seed=2)
    build_index(cases, other, root, cache_dir=tmp_path / "cache", progress=False, overwrite=True)
    with caplog.at_level(logging.ERROR):
        response = searcher.search(image=cases[0].image, k=2)
    assert response.index_version == searcher.index.version != open_index(root).version
    assert "encoded by another model" in caplog.text


def _format_2(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "vectors.npy").write_bytes(b"\x93NUMPY truncated"),
        _format_2,  # written by a newer dermcir
        lambda folder: (folder.parent / "CURRENT").write_text("not-a-version\n"),
    ],
    ids=["truncated_vectors", "newer_format", "bad_pointer"],
)
def test_an_unloadable_new_version_is_not_switched_to(tmp_path, caplog, damage):
    ckpt, root, cases = make_index(tmp_path, 4)
    searcher = CaseSearcher(root)
    good = searcher.index.version
    remove_cases(root, ["c003"])  # a new version is published, then found damaged
    damage(open_index(root).folder)
    with caplog.at_level(logging.ERROR):
        for _ in range(3):  # every search is answered from the last good version; the failure is logged once
            assert searcher.search(image=cases[0].image, k=5).index_version == good
        assert searcher.case("c003")["case_id"] == "c003"
    assert len(caplog.records) == 1 and good in caplog.text
    assert "cannot be loaded" in caplog.text or "CURRENT" in caplog.text
    build_index(cases[:2], ckpt, root, model=searcher.model, cache_dir=tmp_path / "cache", progress=False,
                overwrite=True)
    assert searcher.search(image=cases[0].image, k=5).index_size == 2  # a newer good version is switched to


def test_one_request_loads_a_new_version_while_the_others_answer_from_the_one_they_have(tmp_path, monkeypatch):
    """Every request that saw a new version queued behind the one loading it: at 100,000 cases a service's /health
    and case pages took 1.2-2.4 s (instead of milliseconds) after each update."""
    import dermcir.search as search_module

    _ckpt, root, _cases = make_index(tmp_path, 4)
    searcher = CaseSearcher(root)
    before = searcher.index.version
    remove_cases(root, ["c000"])
    loading, release = threading.Event(), threading.Event()
    real_load = search_module.load_version

    def slow_load(folder):
        loading.set()
        assert release.wait(60)
        return real_load(folder)

    monkeypatch.setattr(search_module, "load_version", slow_load)
    loader = threading.Thread(target=searcher.refresh, daemon=True)
    loader.start()
    assert loading.wait(30)
    answers: list = []
    other = threading.Thread(target=lambda: answers.append(
        (searcher.search(text="blue-whitish veil present", k=9), searcher.case("c000"))), daemon=True)
    other.start()
    other.join(30)
    assert not release.is_set() and answers, "a request waited for the other one's load"
    assert answers[0][0].index_version == before and answers[0][0].index_size == 4
    release.set()
    loader.join(30)
    after = searcher.search(text="blue-whitish veil present", k=9)
    assert after.index_version != before and after.index_size == 3


# ---- the command line -------------------------------------------------------------------------------------------------
def test_cli_search_json_and_table(setup, capsys):
    _ckpt, root, cases, _ = setup
    assert (
        main(
            [
                "search",
                "--index",
                str(root),
                "--image",
                str(cases[2].image),
                "--checklist",
                "pigment_network=atypical",
                "streaks=irregular",
                "-k",
                "3",
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["query"]["mode"] == "composed" and len(doc["results"]) == 3
    assert set(doc["results"][0]) >= {"rank", "case_id", "image", "diagnosis", "category", "score"}
    assert main(["search", "--index", str(root), "--text", "blue-whitish veil present", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "text query" in out and "not a diagnostic device" in out and len(out.strip().splitlines()) == 5


def test_cli_search_errors_are_one_line(setup, capsys):
    _ckpt, root, _cases, _ = setup
    assert main(["search", "--index", str(root)]) == 2
    assert "give --image, --text or --checklist" in capsys.readouterr().err
    assert main(["search", "--index", str(root), "--image", "missing.jpg"]) == 2
    assert "missing.jpg: query image not found" in capsys.readouterr().err
    assert main(["search", "--index", str(root), "--text", "x", "--checklist", "streaks"]) == 2
    assert "expected FIELD=VALUE" in capsys.readouterr().err
    assert main(["search", "--index", str(root.parent / "nothing"), "--text", "x"]) == 2
    assert "no dermcir index" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:  # refused while parsing, before the index and model load
        main(["search", "--index", str(root), "--text", "x", "--threads", "0"])
    assert caught.value.code == 2
    assert "--threads: expected a whole number ≥ 1, got 0" in capsys.readouterr().err


def test_cli_index_from_a_clinic_csv_then_add_and_remove(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    cases = make_cases(tmp_path / "archive", 5)
    cases[3].image.write_bytes(b"GIF89a but not really")
    csv = write_case_csv(tmp_path / "archive" / "cases.csv", cases[:4])
    out = tmp_path / "index"
    args = ["index", "--out", str(out), "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main([*args, "--checkpoint", str(ckpt), "--data", str(csv)]) == 0
    printed = capsys.readouterr().out
    assert "+3 -0, 3 cases; skipped 1: " + str(cases[3].image) in printed
    assert open_index(out).record("c001")["fields"] == CHECKLIST["melanoma"]

    (tmp_path / "new").mkdir()
    more = write_case_csv(tmp_path / "new" / "more.csv", cases[4:])
    assert main([*args, "--add", "--data", str(more.parent)]) == 0  # a folder with one CSV; checkpoint from the index
    assert main([*args, "--remove", "c000", "c004"]) == 0
    assert open_index(out).case_ids == ["c001", "c002"]
    assert main([*args, "--remove", "c999"]) == 2
    assert "c999" in capsys.readouterr().err
    write_case_csv(tmp_path / "archive" / "copy.csv", cases[:1])
    assert main([*args, "--add", "--data", str(tmp_path / "archive")]) == 2  # two CSVs there: which one?
    assert "holds 2 CSV files" in capsys.readouterr().err


def test_cli_index_summary_names_checklist_values_left_out_of_kept_cases(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    cases = make_cases(tmp_path / "archive", 3)
    csv = write_case_csv(tmp_path / "archive" / "cases.csv", cases)
    text = csv.read_text().splitlines()
    column = text[0].split(",").index("streaks")
    row = text[2].split(",")
    row[column] = "irregluar"  # a typo: the case is kept without this field, and the summary says so
    csv.write_text("\n".join([*text[:2], ",".join(row), *text[3:]]) + "\n")
    args = ["index", "--checkpoint", str(ckpt), "--cache", str(tmp_path / "cache"), "--quiet", "--out",
            str(tmp_path / "index"), "--data", str(csv)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "+3 -0, 3 cases; checklist values left out of kept cases 1: " in printed
    assert f"{csv}:3" in printed and "'irregluar'" in printed
    assert "streaks" not in open_index(tmp_path / "index").record(cases[1].case_id)["fields"]


def test_cli_index_summary_lists_missing_images_and_skipped_rows(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    cases = make_cases(tmp_path / "archive", 4)
    missing = cases[1].image
    csv = write_case_csv(tmp_path / "archive" / "cases.csv", [*cases, cases[0]])  # the last row repeats an id
    missing.unlink()
    cases[2].image.write_bytes(b"not an image")
    args = ["index", "--checkpoint", str(ckpt), "--cache", str(tmp_path / "cache"), "--quiet"]
    assert main([*args, "--data", str(csv), "--out", str(tmp_path / "index")]) == 0
    printed = capsys.readouterr().out
    assert "+2 -0, 2 cases; skipped 3: " in printed
    assert f"{missing} (image file missing" in printed and str(cases[2].image) in printed
    assert "duplicate id 'c000'" in printed

    only_missing = write_case_csv(tmp_path / "missing.csv", [cases[1]])
    assert main([*args, "--data", str(only_missing), "--out", str(tmp_path / "index2")]) == 2
    err = capsys.readouterr().err
    assert f"no usable case (1 left out, e.g. {missing}: image file missing" in err and "0 cases" not in err


def test_cli_index_refuses_options_an_update_would_ignore(tmp_path, capsys):
    build = ["index", "--out", str(tmp_path / "index"), "--data", str(tmp_path / "cases.csv")]
    assert main([*build, "--replace"]) == 2  # would have rebuilt the index from the new cases alone
    assert "--replace works only with --add" in capsys.readouterr().err
    assert main([*build, "--add", "--kind", "flat", "--ef-search", "64"]) == 2  # even a default value, given
    assert "--kind, --ef-search: only for building an index" in capsys.readouterr().err
    assert main(["index", "--out", str(tmp_path / "index"), "--remove", "c001", "--hnsw-m", "8"]) == 2
    assert "--hnsw-m: only for building an index" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


def test_cli_index_from_a_derm7pt_release(tmp_path, toy_release, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "index"
    assert (
        main(
            [
                "index",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(toy_release),
                "--out",
                str(out),
                "--min-cases",
                "1",
                "--kind",
                "hnsw",
                "--quiet",
            ]
        )
        == 0
    )
    index = open_index(out)
    assert len(index) == 24 and index.params.kind == "hnsw"
    assert {r["category"] for r in index.records} == {"nevus", "melanoma", "benign keratosis-like"}


def test_cli_index_of_a_release_keeps_the_categories_the_model_was_trained_with(tmp_path, toy_release, capsys):
    """Without --min-cases, a release is indexed with the threshold recorded in the checkpoint (a model trained with
    --min-cases 5 on 8-case categories), not a fixed 50 that left every category out; --add reads the index's
    checkpoint; a --min-cases given still decides."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["categories_left_out"] = {"min_cases": 5, "categories": {}}  # what training with --min-cases 5 records
    (ckpt / "config.json").write_text(json.dumps(config))
    args = ["index", "--data", str(toy_release), "--quiet", "--cache", str(tmp_path / "cache")]
    assert main([*args, "--checkpoint", str(ckpt), "--out", str(tmp_path / "index")]) == 0
    assert len(open_index(tmp_path / "index")) == 24
    assert main([*args, "--out", str(tmp_path / "index"), "--add", "--replace"]) == 0  # the index's checkpoint
    assert "+24 -0, 24 cases" in capsys.readouterr().out
    assert main([*args, "--checkpoint", str(ckpt), "--out", str(tmp_path / "index2"), "--min-cases", "9"]) == 2
    assert "no usable case" in capsys.readouterr().err


def test_cli_demo_trains_once_indexes_and_serves(tmp_path, toy_release, monkeypatch, capsys):
    import dermcir.cli.search
    import dermcir.service
    import dermcir.training

    trained, served, children = [], [], []

    def fake_train(cases, out_dir, profile="cpu", cache_dir=None, **kw):
        trained.append((len(cases), profile))
        return make_checkpoint(Path(out_dir))

    def fake_serve(app, host, port, on_ready=None, allowed_host_names=(), max_connections=None):
        served.append((host, port, app))
        on_ready(f"http://{host}:{port}/")

    def in_process(fn, *args, threads=None, **kwargs):  # run_in_child itself: tests/test_waits.py
        children.append((fn.__name__, threads))
        return fn(*args, **kwargs)

    monkeypatch.setattr(dermcir.training, "train_on_cases", fake_train)
    monkeypatch.setattr(dermcir.service, "serve", fake_serve)
    monkeypatch.setattr(dermcir.cli.search, "run_in_child", in_process)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads below must not slow later tests
    args = ["demo", "--data", str(toy_release), "--out", str(tmp_path / "demo"), "--min-cases", "1", "--port", "8765"]
    assert main([*args, "--threads", "1"]) == 0
    assert trained == [(24, "cpu")] and served[0][:2] == ("127.0.0.1", 8765)
    assert children == [("fake_train", 1)]  # trained in a child process, with the threads asked for
    assert "open http://127.0.0.1:8765/" in capsys.readouterr().out
    version = open_index(tmp_path / "demo" / "index").version
    assert main(args) == 0  # second run: reuses the model and the index
    assert len(trained) == 1 and open_index(tmp_path / "demo" / "index").version == version
    manifest = open_index(tmp_path / "demo" / "index").folder / "manifest.json"
    manifest.write_text("{damaged")
    assert main(args) == 0  # an index it cannot open is built again as a new version; the old folder is kept
    assert len(trained) == 1 and len(open_index(tmp_path / "demo" / "index")) == 24 and manifest.is_file()
    assert main(["demo", "--data", str(tmp_path / "nowhere")]) == 2


def test_a_query_beta_outside_0_to_1_is_refused(setup):
    _ckpt, _root, cases, searcher = setup
    both = {"image": cases[0].image, "text": "irregular streaks"}
    ends = [searcher.search(**both, k=3, beta=b).results for b in (0, 1.0)]
    assert all(len(r) == 3 for r in ends) and ends[0] != ends[1]  # the ends of the range are valid, and differ
    for bad in (float("nan"), 7.0, -3, float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="beta must be a number from 0 to 1"):
            searcher.search(**both, k=3, beta=bad)


@pytest.mark.parametrize("user_setting", [None, "MALLOC_ARENA_MAX=2"])
def test_a_search_process_keeps_freed_buffers_for_the_next_query(tmp_path, user_setting):
    """Each query's activations (tens of MB) were unmapped when freed and mapped anew, zeroed by the kernel page by
    page: 18,400 page faults and 67-90 ms of system time per composed query. A user's own MALLOC_* setting stands."""
    code = (
        "import resource\n"
        "from dermcir.cli._memory import keep_freed_buffers\n"
        "print(keep_freed_buffers())\n"
        "import torch\n"
        "for _ in range(20):  # the heap settles in a few rounds (measured: 4 to 7)\n"
        "    torch.ones(70 << 18).sum()  # a 70 MB buffer, freed each time, as a query's activations\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    torch.ones(70 << 18).sum()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if user_setting:
        name, value = user_setting.split("=")
        env[name] = value
    set_here, faults = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout.split()
    if user_setting:
        assert set_here == "False" and int(faults) > 10_000  # 70 MB of 4 kB pages, faulted in on every round
    else:
        assert set_here == "True" and int(faults) < 100
