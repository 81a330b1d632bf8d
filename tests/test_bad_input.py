"""Every bad input of the issue gets a correct result or a clear error, from Python, HTTP and the CLI, and the
service keeps serving afterwards."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dermcir.cli import main
from dermcir.data import ImageError, preprocess
from dermcir.index import EmptyIndexError, remove_cases
from dermcir.search import MAX_TEXT_CHARS, CaseSearcher, QueryError
from dermcir.service import create_app

from .searchkit import (  # noqa: F401 (one_torch_thread is a fixture)
    bad_variants,
    encode,
    exif_rotated,
    exif_with_a_text_tag,
    good_variants,
    lesion,
    make_index,
    one_torch_thread,
)

GOOD = good_variants()
BAD = bad_variants()
#: what each bad file's error must say (besides its name)
BAD_REASON = {
    "truncated_jpeg": "truncated",
    "corrupt_jpeg": "not a recognised image format",
    "not_an_image": "not a recognised image format",
    "decompression_bomb": "decompression bomb",
    "damaged_dds": "not a recognised image format",  # not a photo format (its NotImplementedError was a 500)
    "icon": "not a recognised image format",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("bad")
    _ckpt, root, _cases = make_index(tmp, 6)
    searcher = CaseSearcher(root)
    return tmp, root, searcher, TestClient(create_app(searcher))


def _post(client: TestClient, image: bytes | None, name: str = "query.jpg", **fields):
    files = {"image": (name, image, "image/jpeg")} if image is not None else None
    return client.post("/search", data={k: str(v) for k, v in fields.items()}, files=files)


def _still_serving(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert _post(client, encode(lesion()), k=2).status_code == 200


@pytest.mark.parametrize("name", sorted(GOOD))
def test_unusual_images_give_results(env, name):
    *_, searcher, client = env
    response = searcher.search(image=GOOD[name], text="pigment network typical", k=3, heatmaps=True)
    assert response.mode == "composed" and len(response.results) == 3
    assert response.query_view.shape == (64, 64, 3)
    res = _post(client, GOOD[name], name=f"{name}.jpg", k=3)
    assert res.status_code == 200 and len(res.json()["results"]) == 3


def test_exif_rotation_is_applied(env):
    *_, searcher, _client = env
    stored, upright = exif_rotated()
    view = searcher.search(image=stored, k=1, heatmaps=True).query_view
    assert (view == preprocess(upright, 64)).all()
    assert not (view == preprocess(upright.transpose(1, 0, 2), 64)).all()


def test_a_malformed_exif_tag_does_not_cost_the_image_or_its_orientation(env):
    """Pillow's exif_transpose raised TypeError on a resolution tag written as text: a 500 over HTTP, a traceback
    from the CLI, a failed index build, for a photo whose pixels are intact."""
    tmp, root, searcher, client = env
    stored, upright = exif_with_a_text_tag()
    view = searcher.search(image=stored, k=1, heatmaps=True).query_view
    assert (view == preprocess(upright, 64)).all()
    assert _post(client, stored, k=2).status_code == 200
    (tmp / "exif_text.jpg").write_bytes(stored)
    assert main(["search", "--index", str(root), "--image", str(tmp / "exif_text.jpg"), "-k", "1", "--json"]) == 0


def test_an_overlong_text_gets_the_search_s_own_error_over_http_however_long(env):
    """Over 1 MB, a text part got Starlette's "Part exceeded maximum size of 1024KB", naming neither the field
    nor its limit."""
    *_, client = env
    huge = "a" * (1024 * 1024 + 1)
    res = _post(client, None, text=huge, k=2)
    assert res.status_code == 400 and res.json()["detail"].startswith("text is 1,048,577 characters long; the limit")
    res = client.post("/search", data={"text": huge, "k": "2"})  # a URL-encoded form
    assert res.status_code == 400 and "the limit is 10,000" in res.json()["detail"]
    _still_serving(client)


@pytest.mark.parametrize("name", sorted(BAD))
def test_unusable_images_are_refused_by_name(env, name):
    *_, searcher, client = env
    with pytest.raises(ImageError, match=f"{name}.jpg: .*{BAD_REASON[name]}"):
        searcher.search(image=BAD[name], image_name=f"{name}.jpg", k=3)
    res = _post(client, BAD[name], name=f"{name}.jpg", k=3)
    assert res.status_code == 400
    assert res.json()["detail"].startswith(f"{name}.jpg: ") and BAD_REASON[name] in res.json()["detail"]
    _still_serving(client)


@pytest.mark.parametrize("name", sorted(BAD))
def test_cli_names_the_unusable_file(env, name, capsys):
    tmp, root, *_ = env
    path = tmp / f"{name}.jpg"
    path.write_bytes(BAD[name])
    assert main(["search", "--index", str(root), "--image", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and BAD_REASON[name] in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["grayscale", "16bit_png", "10x10"])
def test_cli_accepts_unusual_images(env, name, capsys):
    tmp, root, *_ = env
    path = tmp / f"{name}.img"
    path.write_bytes(GOOD[name])
    assert main(["search", "--index", str(root), "--image", str(path), "-k", "2", "--json"]) == 0


def test_empty_text(env):
    *_, searcher, client = env
    assert searcher.search(image=encode(lesion()), text="", k=2).mode == "image"  # blank text = no text
    assert _post(client, encode(lesion()), text="   ", k=2).json()["query"]["mode"] == "image"
    with pytest.raises(ValueError, match="a query needs an image, a text or checklist fields"):
        searcher.search(text="  \n ", k=2)
    res = _post(client, None, text="", k=2)
    assert res.status_code == 400 and "a query needs an image" in res.json()["detail"]
    _still_serving(client)


@pytest.mark.parametrize("invisible", ["\u200b", "\x00", "\u2060\u200d", "\t\u00a0\u3000"])
def test_a_text_of_invisible_characters_is_no_text(env, invisible):
    """A zero-width space pasted in with copied text was searched as a text: the tokenizer reads it as nothing, yet
    with an image it replaced the image-only ranking by another one, reported as a composed query."""
    *_, searcher, client = env
    image = encode(lesion())
    alone = searcher.search(image=image, k=3)
    response = searcher.search(image=image, text=invisible, k=3)
    assert response.mode == "image" and response.text is None
    assert [r.case_id for r in response.results] == [r.case_id for r in alone.results]
    with pytest.raises(ValueError, match="a query needs an image, a text or checklist fields"):
        searcher.search(text=invisible, k=2)
    assert _post(client, image, text=invisible, k=2).json()["query"]["mode"] == "image"


@pytest.mark.parametrize("text", ["😀", "🙂🙂🙂", "x" * 3000])
def test_a_text_of_no_known_word_is_refused(env, capsys, text):
    """Each read as the one unknown token: every such text gave the same ranking, with nothing to say so."""
    _tmp, root, searcher, client = env
    says = "has no word the text encoder knows"
    with pytest.raises(ValueError, match=says):
        searcher.search(text=text, k=2)
    with pytest.raises(ValueError, match=says):
        searcher.search(image=encode(lesion()), text=text, k=2)
    res = _post(client, None, text=text, k=2)
    assert res.status_code == 400 and says in res.json()["detail"]
    assert main(["search", "--index", str(root), "--text", text]) == 2
    assert says in capsys.readouterr().err
    # a known word beside them is a text
    assert searcher.search(text=f"blue-whitish veil {text}", k=2).mode == "text"


def test_an_empty_image_path_is_a_query_error(env):
    *_, searcher, _client = env
    for empty in ("", b""):  # "" was read as the current folder: ": cannot read file (Is a directory)"
        with pytest.raises(QueryError, match="image is empty: give a path, the bytes of an image file or a uint8 array"):
            searcher.search(image=empty, text="blue-whitish veil present", k=2)


def test_an_empty_uploaded_file_is_named_like_an_empty_file_anywhere(env, capsys):
    """Over HTTP (and so on the page) an empty upload got the Python API's "image is empty: give a path, the bytes
    of an image file or a uint8 array ...", without the file's name; the CLI said "empty.png: file is empty"."""
    tmp, root, searcher, client = env
    res = _post(client, b"", name="empty.png", k=2)
    assert res.status_code == 400 and res.json()["detail"] == "empty.png: file is empty"
    (tmp / "empty.png").write_bytes(b"")
    assert main(["search", "--index", str(root), "--image", str(tmp / "empty.png"), "-k", "2"]) == 2
    assert f"{tmp / 'empty.png'}: file is empty" in capsys.readouterr().err
    with pytest.raises(ImageError, match="^empty.png: file is empty$"):
        searcher.search(image=b"", image_name="empty.png", k=2)


def test_a_folder_given_as_the_query_image_is_called_a_folder(env, capsys):
    tmp, root, *_ = env
    assert main(["search", "--index", str(root), "--image", str(tmp), "-k", "2"]) == 2
    assert f"{tmp}: is a folder; --image takes one image file" in capsys.readouterr().err  # was "not found"


def test_a_blank_checklist_value_is_not_given_in_every_interface(env, capsys):
    """HTTP dropped a blank field (a form template's empty pigment_network=) while the CLI and Python refused it as
    "unknown value ''": one rule now, as an empty CSV cell: not given. The field's name is still checked."""
    _tmp, root, searcher, client = env
    image = encode(lesion())
    alone = [r.case_id for r in searcher.search(image=image, checklist={"streaks": "irregular"}, k=3).results]
    for blank in ("", "  ", None):
        got = searcher.search(image=image, checklist={"streaks": "irregular", "pigment_network": blank}, k=3)
        assert [r.case_id for r in got.results] == alone and got.text == "Dermoscopy: streaks irregular."
    assert [r["case_id"] for r in _post(client, image, streaks="irregular", pigment_network="", k=3).json()["results"]
            ] == alone
    assert main(["search", "--index", str(root), "--checklist", "pigment_network=", "--checklist", "streaks=irregular",
                 "--text", "", "--json", "-k", "3"]) == 0
    assert '"text": "Dermoscopy: streaks irregular."' in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown checklist field 'colour'"):
        searcher.search(image=image, checklist={"colour": ""}, k=3)
    # a blank spelling beside a given one is no second value, in Python as over HTTP (HTTP dropped it first)
    both = {"Streaks": "", "streaks": "irregular"}
    assert searcher.search(image=image, checklist=both, k=3).text == "Dermoscopy: streaks irregular."
    assert _post(client, image, k=3, **both).json()["query"]["text"] == "Dermoscopy: streaks irregular."


def test_a_text_that_is_not_valid_unicode_is_a_query_error(env):
    *_, searcher, _client = env
    for text in ("veil \ud800 present", "\udc80"):
        with pytest.raises(QueryError, match=r"text holds a character that is not valid Unicode \(surrogates not "):
            searcher.search(image=encode(lesion()), text=text, k=2)


def test_100kb_text(env, capsys):
    _tmp, root, searcher, client = env
    huge = "atypical pigment network " * 4096  # 102,400 characters
    with pytest.raises(ValueError, match=f"102,400 characters long; the limit is {MAX_TEXT_CHARS:,}"):
        searcher.search(text=huge, k=2)
    res = _post(client, encode(lesion()), text=huge, k=2)
    assert res.status_code == 400 and "the limit is 10,000" in res.json()["detail"]
    assert main(["search", "--index", str(root), "--text", huge]) == 2
    assert "the limit is 10,000" in capsys.readouterr().err
    # at the character limit it is still far more than the model reads: refused by its token count, not cut
    with pytest.raises(ValueError, match="tokens long; the model reads at most"):
        searcher.search(text="lesion " * (MAX_TEXT_CHARS // 7), k=1)
    _still_serving(client)


def test_a_text_longer_than_the_model_reads_is_refused_not_cut(env, capsys):
    """The tokenizer would keep only the first max_text_tokens: the end of a description would change nothing."""
    _tmp, root, searcher, client = env
    limit = searcher.model.text_encoder.max_tokens
    checklist = {"pigment_network": "atypical", "streaks": "irregular", "blue_whitish_veil": "present"}
    fits = "ulcerated"
    assert searcher.search(text=fits, checklist=checklist, k=1).mode == "text"
    long = "ulcerated and bleeding nodule " * limit
    with pytest.raises(ValueError, match=rf"tokens long; the model reads at most {limit} \(the checklist fields take "
                                         r"\d+\): shorten the free text by at least \d+ tokens"):
        searcher.search(text=long, checklist=checklist, k=1)
    res = _post(client, encode(lesion()), text=long, k=1, **checklist)
    assert res.status_code == 400 and f"the model reads at most {limit}" in res.json()["detail"]
    assert main(["search", "--index", str(root), "--text", long]) == 2
    err = capsys.readouterr().err
    assert f"the model reads at most {limit}:" in err and "checklist" not in err  # no checklist given: not named
    # just at the limit is accepted: the count includes the tokenizer's two special tokens, as the model reads them
    words = "red " * (limit - 2)  # one token per word
    assert len(searcher.model.text_encoder.tokenizer(words)["input_ids"]) == limit
    assert searcher.search(text=words, k=1).mode == "text"
    with pytest.raises(ValueError, match=f"{limit + 1} tokens long"):
        searcher.search(text=words + "red", k=1)
    _still_serving(client)


def test_a_checklist_longer_than_the_model_reads_is_told_to_give_fewer_fields(env, monkeypatch):
    """With no free text to shorten (a model trained with a small max_text_tokens), the advice is about the fields."""
    _tmp, _root, searcher, _client = env
    monkeypatch.setattr(searcher.model.text_encoder, "max_tokens", 20)
    checklist = {"pigment_network": "atypical", "streaks": "irregular", "blue_whitish_veil": "present",
                 "dots_and_globules": "irregular"}
    with pytest.raises(ValueError, match=r"the model reads at most 20 \(the checklist fields take \d+\): give fewer "
                                         "checklist fields"):
        searcher.search(checklist=checklist, k=1)
    with pytest.raises(ValueError, match="give fewer checklist fields"):  # free text does not change the advice
        searcher.search(checklist=checklist, text="ulcerated", k=1)


def test_unknown_checklist_values(env, capsys):
    _tmp, root, searcher, client = env
    with pytest.raises(ValueError, match="unknown value 'wavy' for checklist field 'streaks'; allowed values: absent"):
        searcher.search(checklist={"streaks": "wavy"}, k=2)
    res = _post(client, encode(lesion()), streaks="wavy", k=2)
    assert res.status_code == 400 and "allowed values: absent, regular, irregular" in res.json()["detail"]
    assert main(["search", "--index", str(root), "--checklist", "elevation=towering"]) == 2
    assert "allowed values: flat, palpable, nodular" in capsys.readouterr().err
    _still_serving(client)


def test_empty_index(tmp_path, capsys):
    _ckpt, root, cases = make_index(tmp_path, 2)
    remove_cases(root, [c.case_id for c in cases])
    searcher = CaseSearcher(root)
    with pytest.raises(EmptyIndexError, match="holds no cases"):
        searcher.search(image=encode(lesion()), k=3)
    client = TestClient(create_app(searcher))
    res = _post(client, encode(lesion()), k=3)
    assert res.status_code == 409 and "holds no cases" in res.json()["detail"]
    assert str(tmp_path) not in res.json()["detail"]  # the answer names no server folder (the log does)
    assert client.get("/health").json()["cases"] == 0
    assert main(["search", "--index", str(root), "--text", "streaks absent"]) == 2
    assert "holds no cases" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["cv", "--folds", "1"], "--folds: expected a whole number ≥ 2, got 1"),
        (["cv", "--min-cases", "0"], "--min-cases: expected a whole number ≥ 1, got 0"),
        (["cv", "--time-budget", "-5"], "--time-budget: expected a finite number > 0, got '-5'"),
        (["cv", "--time-budget", "nan"], "--time-budget: expected a finite number > 0, got 'nan'"),
        (["cv", "--only-fold", "-1"], "--only-fold: expected a whole number ≥ 0, got -1"),
        (["cv", "--companion-workers", "two"], "--companion-workers: expected a whole number ≥ 0, got 'two'"),
        (["index", "--hnsw-m", "1"], "--hnsw-m: expected a whole number ≥ 2, got 1"),
        (["index", "--batch-size", "0"], "--batch-size: expected a whole number ≥ 1, got 0"),
        (["search", "-k", "0"], "-k: expected a whole number ≥ 1, got 0"),
        (["serve", "--max-concurrent", "0"], "--max-concurrent: expected a whole number ≥ 1, got 0"),
        (["serve", "--max-waiting", "-1"], "--max-waiting: expected a whole number ≥ 0, got -1"),
        (["serve", "--max-upload-mb", "inf"], "--max-upload-mb: expected a finite number > 0, got 'inf'"),
        (["serve", "--threads", "0"], "--threads: expected a whole number ≥ 1, got 0"),
        (["serve", "--max-connections", "0"], "--max-connections: expected a whole number ≥ 1, got 0"),
        # numpy's and scikit-learn's seeds are 32-bit: -1 failed after the cases had loaded, in scikit-learn's words
        (["cv", "--seed", "-1"], "--seed: expected a whole number from 0 to 4,294,967,295, got -1"),
        (["cv", "--seed", "4294967296"], "--seed: expected a whole number from 0 to 4,294,967,295, got 4294967296"),
    ],
)
def test_impossible_numbers_are_refused_while_parsing(argv, says, capsys):
    """Before anything loads: left to the library, `--folds 1` failed after preprocessing in scikit-learn's words
    (n_splits), and `--max-upload-mb nan` after the model had loaded. (A handler that ran would fail on the missing
    files and return 2, not exit while parsing.)"""
    required = {"cv": ["--data", "x", "--out", "y"], "index": ["--data", "x", "--out", "y"],
                "search": ["--index", "x", "--image", "q.png"], "serve": ["--index", "x"]}[argv[0]]
    with pytest.raises(SystemExit) as caught:
        main([argv[0], *required, *argv[1:]])
    assert caught.value.code == 2 and says in capsys.readouterr().err


def _png(array) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("blank", ["black", "transparent", "one_pixel"])
def test_a_blank_image_is_refused_not_ranked(env, blank):
    """An all-black or fully transparent upload (a failed export) got one and the same ranking, with scores as
    confident as a lesion's; a 1x1 image too."""
    import numpy as np

    *_, searcher, client = env
    image = _png({"black": np.zeros((200, 300, 3), np.uint8),
                  "transparent": np.zeros((200, 300, 4), np.uint8),
                  "one_pixel": np.full((1, 1, 3), 128, np.uint8)}[blank])
    with pytest.raises(QueryError, match=r"upload.png: blank \(one colour all over"):
        searcher.search(image=image, image_name="upload.png", text="pigment network typical", k=3)
    res = _post(client, image, name="upload.png", k=3)
    assert res.status_code == 400 and res.json()["detail"].startswith("upload.png: blank")
    _still_serving(client)
