"""The persistent case index: format, scores, add/remove, atomic writes, fingerprints, HNSW."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from dermcir.checkpoint import fingerprint, load_checkpoint
from dermcir.cli import main
from dermcir.data import Case, LoadReport, preprocess
from dermcir.data.images import load_rgb
from dermcir.index import (
    HEATMAP_SIZE,
    FingerprintMismatchError,
    IndexExistsError,
    NothingToIndexError,
    VectorParams,
    _store,
    add_cases,
    build_index,
    open_index,
    remove_cases,
)
from dermcir.index.case_index import CASES, HEATMAPS, HNSW, MANIFEST, VECTORS
from dermcir.models import ComposedRetrievalModel

from .searchkit import make_cases, make_checkpoint, make_index, one_torch_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One tiny checkpoint and its loaded model, shared by the module (loading it is the slow part)."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("kit") / "ckpt")
    return ckpt, load_checkpoint(ckpt)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, kit) -> tuple[Path, Path, list]:
    return make_index(tmp_path_factory.mktemp("built"), 12, *kit)


@pytest.fixture
def fresh(tmp_path: Path, kit):
    """Build a new small index in this test's folder: ``fresh(n)`` → (checkpoint, root, cases)."""
    return lambda n=6, **kw: make_index(tmp_path, n, *kit, **kw)


def _opts(tmp_path: Path, kit) -> dict:
    return {"model": kit[1], "cache_dir": tmp_path / "cache", "progress": False}


def test_version_folder_holds_documented_files_and_no_pickles(built):
    ckpt, root, cases = built
    # mapped, not read into memory: a search reads k heatmaps (they were 147 MB of RAM at 100,000 cases)
    loaded = open_index(root)
    assert isinstance(loaded.heatmaps, np.memmap) and isinstance(loaded.vectors, np.memmap)
    folder = _store.current_version(root)
    assert (root / "CURRENT").read_text().strip() == folder.name
    assert {p.name for p in folder.iterdir()} == {MANIFEST, CASES, VECTORS, HEATMAPS}  # exact index: no graph file
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["fingerprint"] == fingerprint(ckpt) and manifest["count"] == len(cases)
    assert manifest["vector_search"]["kind"] == "flat" and manifest["embedding_dim"] == 6 * 32
    vectors = np.load(folder / VECTORS, allow_pickle=False)
    heatmaps = np.load(folder / HEATMAPS, allow_pickle=False)
    assert vectors.dtype == np.float32 and vectors.shape == (12, 192)
    assert heatmaps.dtype == np.float16 and heatmaps.shape == (12, 3, HEATMAP_SIZE, HEATMAP_SIZE)
    records = [json.loads(line) for line in (folder / CASES).read_text().splitlines()]
    assert [r["case_id"] for r in records] == [c.case_id for c in cases]
    assert records[1]["category"] == "melanoma" and records[1]["fields"]["blue_whitish_veil"] == "present"
    assert "melanoma" not in records[1]["text"]  # the stored text is the leak-free template


def test_stored_vectors_are_encode_target_of_each_row(built, kit):
    _ckpt, root, cases = built
    index = open_index(root)
    model = kit[1]
    images = np.stack([preprocess(load_rgb(c.image), 64) for c in cases])
    with torch.no_grad():
        expected = model.encode_target(images).numpy()
    np.testing.assert_allclose(np.asarray(index.vectors), expected, atol=1e-5)
    for row, hits in enumerate(index.search(expected[:4], 1)):  # each target's best match is itself
        assert hits[0].row == row


def test_heatmaps_are_max_scaled_attention(built):
    heat = open_index(built[1]).heatmaps.astype(np.float32)
    assert heat.min() >= 0 and np.allclose(heat.max(axis=(2, 3)), 1.0, atol=1e-3)


def test_bad_images_are_reported_by_name_and_skipped(tmp_path, kit):
    ckpt = kit[0]
    cases = make_cases(tmp_path / "images", 6)
    cases[2].image.write_bytes(b"not an image at all")
    cases[4].image.write_bytes(cases[4].image.read_bytes()[:60])  # truncated
    report = LoadReport()
    update = build_index(cases, ckpt, tmp_path / "index", report=report, **_opts(tmp_path, kit))
    assert update.added == 4 and open_index(tmp_path / "index").case_ids == ["c000", "c001", "c003", "c005"]
    named = [what for what, _ in update.skipped]
    assert named == [str(cases[2].image), str(cases[4].image)]
    assert report.skipped == update.skipped


def test_no_usable_image_is_an_error_and_leaves_nothing(tmp_path, kit):
    ckpt = kit[0]
    cases = make_cases(tmp_path / "images", 2)
    for c in cases:
        c.image.write_bytes(b"x")
    with pytest.raises(ValueError, match="none of the 2 cases had a usable image"):
        build_index(cases, ckpt, tmp_path / "index", **_opts(tmp_path, kit))
    with pytest.raises(FileNotFoundError, match="no dermcir index"):
        open_index(tmp_path / "index")


def test_add_and_remove_without_rebuilding(tmp_path, kit, fresh):
    _ckpt, root, _cases = fresh(6)
    before = open_index(root)
    more = make_cases(tmp_path / "more", 3, start=100)
    update = add_cases(root, more, **_opts(tmp_path, kit))  # checkpoint from the manifest
    after = open_index(root)
    assert (update.added, update.total) == (3, 9) and after.version != before.version
    np.testing.assert_array_equal(np.asarray(after.vectors[:6]), np.asarray(before.vectors))  # old rows untouched
    assert after.case_ids[-3:] == ["c100", "c101", "c102"]

    again = add_cases(root, more[:1], **_opts(tmp_path, kit))
    assert again.added == 0 and "already indexed" in again.skipped[0][1] and again.version == after.version

    removed = remove_cases(root, ["c001", "c101"])
    final = open_index(root)
    assert removed.removed == 2 and "c001" not in final.case_ids and len(final) == 7
    row = final.row_of("c102")
    np.testing.assert_array_equal(np.asarray(final.vectors[row]), np.asarray(after.vectors[after.row_of("c102")]))
    with pytest.raises(ValueError, match="not in index.*nothing was removed"):
        remove_cases(root, ["c000", "nope"])
    # removing nothing publishes nothing, as adding nothing does: three identical versions used to push the one
    # before the real removal out of those kept for going back
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("v"))
    for _ in range(3):
        nothing = remove_cases(root, [])
        assert (nothing.version, nothing.removed, nothing.total) == (final.version, 0, 7)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("v")) == kept
    # one id given as a string would be read letter by letter ("c102": "c", "1", ...); an int id is not an id
    with pytest.raises(TypeError, match=r"not one string; pass \['c102'\]"):
        remove_cases(root, "c102")
    with pytest.raises(TypeError, match="case ids are strings; got 12; nothing was removed"):
        remove_cases(root, ["c000", 12])
    assert len(open_index(root)) == 7


def test_a_case_the_index_could_not_read_back_is_refused_when_it_is_made(tmp_path, kit, fresh):
    """An int id (read with pandas), a blank id, a None category or a NaN checklist cell used to be indexed, and the
    version published with it could not be loaded again: every later search and update failed on cases.jsonl."""
    _ckpt, root, cases = fresh(2)
    good = cases[0]
    for change, message in [
        ({"case_id": 1042}, "case_id must be a non-empty string, got 1042"),
        ({"case_id": " "}, "case_id must be a non-empty string"),
        ({"category": None}, "case 'c9': category must be a string, got None"),
        ({"fields": {"sex": float("nan")}}, "case 'c9': fields must map names to strings, got 'sex': nan"),
        ({"fields": ["sex"]}, "case 'c9': fields must map checklist fields to values, got list"),
        ({"image": 3}, "case 'c9': image must be a path, got int"),
    ]:
        made = {"case_id": "c9", "image": good.image, "diagnosis": "nevus", "category": "nevus", "fields": {}}
        with pytest.raises((TypeError, ValueError), match=re.escape(message)):
            Case(**{**made, **change})
    as_text = Case("c9", str(good.image), good.diagnosis, good.category, good.fields)  # a str path is a path
    assert as_text.image == good.image
    assert add_cases(root, [as_text], **_opts(tmp_path, kit)).added == 1
    assert open_index(root).case_ids[-1] == "c9"


def test_replace_re_encodes_a_changed_image(tmp_path, kit, fresh):
    _ckpt, root, cases = fresh(3)
    old = np.asarray(open_index(root).vectors[0]).copy()
    other = make_cases(tmp_path / "other", 2, start=50)[1]
    cases[0].image.write_bytes(other.image.read_bytes())
    update = add_cases(root, cases[:1], replace=True, **_opts(tmp_path, kit))
    index = open_index(root)
    assert (update.added, update.removed, len(index)) == (1, 1, 3)
    assert not np.allclose(np.asarray(index.vectors[index.row_of("c000")]), old)


def test_other_model_is_refused_for_updates(tmp_path, fresh):
    _ckpt, root, _cases = fresh(3)
    other = make_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(FingerprintMismatchError, match="not the model that encoded index"):
        add_cases(root, make_cases(tmp_path / "m", 1, start=9), checkpoint=other, progress=False)


def test_a_model_handed_in_must_be_the_checkpoints_own(tmp_path, kit, fresh):
    """``model=`` saves loading the checkpoint again; a model of another checkpoint would have been encoded with and
    recorded under this checkpoint's fingerprint."""
    ckpt, root, _cases = fresh(3)
    other_ckpt = make_checkpoint(tmp_path / "other", seed=1)
    other = load_checkpoint(other_ckpt)
    new = make_cases(tmp_path / "m", 1, start=9)
    with pytest.raises(ValueError, match=r"model= is the model of another checkpoint \(fingerprint "):
        add_cases(root, new, model=other, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="model= is the model of another checkpoint"):
        build_index(new, ckpt, tmp_path / "index2", model=other, cache_dir=tmp_path / "cache", progress=False)
    unloaded = ComposedRetrievalModel(other.config, pretrained=False)  # built in memory, never saved: nothing says which it is
    with pytest.raises(ValueError, match="model= is a model not loaded with load_checkpoint"):
        add_cases(root, new, model=unloaded, cache_dir=tmp_path / "cache", progress=False)
    own = load_checkpoint(ckpt).train()  # batch norm in training mode: a vector would depend on its batch
    with pytest.raises(ValueError, match=r"is in training mode; call model.eval\(\)"):
        add_cases(root, new, model=own, cache_dir=tmp_path / "cache", progress=False)
    assert len(open_index(root)) == 3 and not (tmp_path / "index2").exists()
    assert add_cases(root, new, model=kit[1], cache_dir=tmp_path / "cache", progress=False).added == 1


def test_failed_write_leaves_previous_version_live(tmp_path, monkeypatch, kit, fresh):
    ckpt, root, cases = fresh(4)
    live = open_index(root)
    real_save = np.save

    def disk_full(path, arr, **kw):
        if str(path).endswith(HEATMAPS):  # vectors already written: fail half-way through the version
            raise OSError(28, "No space left on device")
        return real_save(path, arr, **kw)

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        add_cases(root, make_cases(tmp_path / "more", 2, start=20), **_opts(tmp_path, kit))
    with pytest.raises(OSError):
        build_index(cases, ckpt, root, overwrite=True, **_opts(tmp_path, kit))
    monkeypatch.undo()
    after = open_index(root)
    assert after.version == live.version and after.case_ids == live.case_ids
    assert not list(root.glob(".tmp-*"))  # the failed versions were cleaned up


def test_killed_build_leaves_previous_version_live(tmp_path, kit, fresh):
    ckpt, root, cases = fresh(4)
    live = open_index(root)
    # A separate process that is SIGKILLed half-way through writing a new version (after vectors.npy).
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from pathlib import Path
        from dermcir.data import Case
        from dermcir.index import build_index
        real = np.save
        def save(path, arr, **kw):
            if str(path).endswith("heatmaps.npy"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, arr, **kw)
        np.save = save
        cases = [Case(f"k{{i}}", Path(p), "nevus", "nevus") for i, p in enumerate({[str(c.image) for c in cases]!r})]
        build_index(cases, {str(ckpt)!r}, {str(root)!r}, cache_dir=Path({str(tmp_path / "cache")!r}), progress=False,
                    overwrite=True)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(root.glob(".tmp-*")), "the killed writer should have left its temporary folder"
    after = open_index(root)
    assert after.version == live.version and after.case_ids == live.case_ids
    # The next writer cleans up after the killed one.
    add_cases(root, make_cases(tmp_path / "more", 1, start=30), **_opts(tmp_path, kit))
    assert not list(root.glob(".tmp-*")) and len(open_index(root)) == 5


def test_readers_never_see_a_half_written_index(tmp_path, kit, fresh):
    _ckpt, root, _cases = fresh(4)
    extra = make_cases(tmp_path / "more", 4, start=40)
    errors, seen = [], set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                index = open_index(root)
                assert len(index.records) == len(index.vectors) == index.manifest["count"]
                seen.add(len(index))
                time.sleep(0.002)  # leave the writer some of the GIL
            except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
                errors.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i, case in enumerate(extra):  # publish 6 versions (older ones are garbage-collected meanwhile)
        add_cases(root, [case], **_opts(tmp_path, kit))
        if i % 2:
            remove_cases(root, [case.case_id])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(seen) > 1 and len(open_index(root)) == 6
    versions = [p for p in root.iterdir() if p.name.startswith("v")]
    assert len(versions) == _store.KEEP_VERSIONS


def test_refuses_to_write_into_a_foreign_folder(tmp_path, kit):
    ckpt = kit[0]
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.docx").write_text("precious")
    with pytest.raises(ValueError, match="not part of a dermcir index"):
        build_index(make_cases(tmp_path / "i", 2), ckpt, tmp_path / "home", **_opts(tmp_path, kit))
    assert os.listdir(tmp_path / "home") == ["thesis.docx"]


def test_a_foreign_out_folder_is_refused_before_encoding(tmp_path, kit, monkeypatch):
    import dermcir.index.build

    def encode_cases(*_args, **_kw):
        raise AssertionError("images were encoded before the output folder was checked")

    monkeypatch.setattr(dermcir.index.build, "encode_cases", encode_cases)
    (tmp_path / "ckpt-copy").mkdir()
    (tmp_path / "ckpt-copy" / "config.json").write_text("{}")  # e.g. --out given the checkpoint folder
    with pytest.raises(ValueError, match="not part of a dermcir index"):
        build_index(make_cases(tmp_path / "i", 2), kit[0], tmp_path / "ckpt-copy", **_opts(tmp_path, kit))


def test_a_leftover_pointer_file_is_removed_by_the_next_writer(tmp_path, fresh):
    _ckpt, root, _cases = fresh(3)
    (root / ".tmp-CURRENT-0a1b2c3d").write_text("v000009-000000\n")  # a pointer swap killed before os.replace
    (root / ".tmp-0a1b2c3d").mkdir()  # a version folder being written
    remove_cases(root, ["c001"])
    assert not list(root.glob(".tmp-*")) and open_index(root).case_ids == ["c000", "c002"]


def test_hnsw_index_matches_exact_and_extends(tmp_path, kit, fresh):
    ckpt, flat_root, cases = fresh(12)
    hnsw_root = tmp_path / "hnsw"
    build_index(cases, ckpt, hnsw_root, params=VectorParams(kind="hnsw", hnsw_m=8), **_opts(tmp_path, kit))
    assert (_store.current_version(hnsw_root) / HNSW).is_file()
    flat, hnsw = open_index(flat_root), open_index(hnsw_root)
    queries = np.asarray(flat.vectors[:5]) * 0.5
    for a, b in zip(flat.search(queries, 5), hnsw.search(queries, 5), strict=True):
        assert [h.row for h in a] == [h.row for h in b]  # a small graph is searched exhaustively
    add_cases(hnsw_root, make_cases(tmp_path / "more", 2, start=60), **_opts(tmp_path, kit))
    grown = open_index(hnsw_root)
    assert len(grown) == 14 and grown.search(np.asarray(grown.vectors[-1:]), 1)[0][0].row == 13
    remove_cases(hnsw_root, ["c060"])
    assert open_index(hnsw_root).case_ids[-1] == "c061"


def test_bad_vector_params_are_named():
    with pytest.raises(ValueError, match="index kind 'ivf' is not known; choose one of flat, hnsw"):
        VectorParams(kind="ivf")
    with pytest.raises(ValueError, match="ef_search must be a whole number ≥ 1, got 0"):
        VectorParams(ef_search=0)
    # faiss's HNSW crashes the process (segfault) when vectors are added to a graph with one link per node
    with pytest.raises(ValueError, match="hnsw_m must be a whole number ≥ 2, got 1"):
        VectorParams(kind="hnsw", hnsw_m=1)
    with pytest.raises(ValueError, match="ef_construction must be a whole number ≥ 1, got 2.5"):
        VectorParams(ef_construction=2.5)
    # numpy's integers are whole numbers ("hnsw_m must be a whole number ≥ 2, got np.int64(16)"), stored as ints
    params = VectorParams(kind="hnsw", hnsw_m=np.int64(16), ef_search=np.int32(64))
    assert (params.hnsw_m, params.ef_search) == (16, 64) and type(params.hnsw_m) is int


def test_cases_from_a_generator_are_indexed_and_other_objects_named(tmp_path, kit, fresh):
    """A generator was consumed by the id check: build_index then failed with "object of type 'generator' has no
    len()" after loading the model, and add_cases said there was no new case."""
    cases = make_cases(tmp_path / "images", 3)
    root = tmp_path / "index"
    assert build_index((c for c in cases), kit[0], root, **_opts(tmp_path, kit)).total == 3
    more = make_cases(tmp_path / "more", 2, start=10)
    assert add_cases(root, iter(more), **_opts(tmp_path, kit)).added == 2
    with pytest.raises(TypeError, match=r"cases must be Case objects, got str \(1 of 1\)"):
        add_cases(root, [str(more[0].image)], **_opts(tmp_path, kit))
    with pytest.raises(TypeError, match="cases must be a collection of Case objects, got Case"):
        add_cases(root, more[0], **_opts(tmp_path, kit))


def test_repeated_case_ids_are_refused(tmp_path, kit):
    cases = make_cases(tmp_path / "images", 3)
    with pytest.raises(ValueError, match="case ids must be unique; repeated: c001"):
        build_index([*cases, cases[1]], kit[0], tmp_path / "index", **_opts(tmp_path, kit))


@pytest.mark.parametrize("bad", [".", ".."])
def test_dot_ids_are_refused_naming_the_case(tmp_path, kit, bad):
    # "/cases/../image" is "/image" to a browser: such a case could never be shown by the web page
    cases = make_cases(tmp_path / "images", 3)
    cases[1] = Case(bad, cases[1].image, cases[1].diagnosis, cases[1].category, cases[1].fields)
    expected = f"case id {bad!r} (image {cases[1].image}) cannot be used: '.' and '..' are path steps in a URL"
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_index(cases, kit[0], tmp_path / "index", **_opts(tmp_path, kit))
    assert not (tmp_path / "index").exists() or not any((tmp_path / "index").iterdir())
    root = make_index(tmp_path / "ok", 2, *kit)[1]
    with pytest.raises(ValueError, match=re.escape(expected)):
        add_cases(root, cases[1:2], **_opts(tmp_path, kit))
    dotted = [Case(i, c.image, c.diagnosis, c.category, c.fields) for i, c in zip(("...", ".a"), cases[::2], strict=True)]
    assert build_index(dotted, kit[0], tmp_path / "dots", **_opts(tmp_path, kit)).total == 2  # only "." and ".."


@pytest.fixture(scope="module")
def hnsw_built(tmp_path_factory: pytest.TempPathFactory, kit) -> Path:
    tmp = tmp_path_factory.mktemp("hnsw")
    return make_index(tmp, 4, *kit, params=VectorParams(kind="hnsw", hnsw_m=8))[1]


def _without_count(data: bytes) -> bytes:
    manifest = json.loads(data)
    del manifest["count"]
    return json.dumps(manifest).encode()


@pytest.mark.parametrize(
    "name, damage, reason",
    [
        (MANIFEST, lambda b: b"{bad", "Expecting property name"),
        (MANIFEST, _without_count, "missing key(s) count"),
        (CASES, lambda b: b[:-30], "line 4"),
        (VECTORS, lambda b: b"\x93NUMPY garbage", "corrupt"),
        # a NaN row: faiss left that case out of every result without a word
        (VECTORS, lambda b: b[: -4 * 8] + np.full(8, np.nan, np.float32).tobytes(), "row 3, case 'c003', holds NaN"),
        (HEATMAPS, lambda b: b[:100], "corrupt"),
        (HNSW, lambda b: b[: len(b) // 2], "FAISS index"),
    ],
)
def test_a_corrupt_index_file_is_named(tmp_path, hnsw_built, capsys, name, damage, reason):
    root = tmp_path / "index"
    shutil.copytree(hnsw_built, root)
    path = _store.current_version(root) / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match="corrupt or unreadable") as caught:
        open_index(root)
    assert str(path) in str(caught.value) and reason in str(caught.value)
    assert main(["search", "--index", str(root), "--text", "streaks absent"]) == 2  # one line, exit 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "corrupt or unreadable" in err


# ---- rebuilding, version numbers, updates that add nothing, damaged records, the writer lock -------------------------
def test_a_build_over_a_non_empty_index_is_refused_unless_overwrite(tmp_path, kit, fresh, monkeypatch):
    ckpt, root, cases = fresh(4)
    live = open_index(root)
    new = make_cases(tmp_path / "new", 2, start=60)
    import dermcir.index.build

    real_encode = dermcir.index.build.encode_cases
    monkeypatch.setattr(dermcir.index.build, "encode_cases", lambda *a, **k: pytest.fail("encoded before refusing"))
    with pytest.raises(IndexExistsError, match=r"already holds an index of 4 cases .*--add.*--rebuild"):
        build_index(new, ckpt, root, overwrite=False, **_opts(tmp_path, kit))
    assert open_index(root).version == live.version
    monkeypatch.setattr(dermcir.index.build, "encode_cases", real_encode)
    update = build_index(new, ckpt, root, overwrite=True, **_opts(tmp_path, kit))  # on purpose: every case replaced
    assert (update.added, update.removed, update.total) == (2, 4, 2)
    assert open_index(root).case_ids == ["c060", "c061"] and (root / live.version).is_dir()  # kept for a rollback
    remove_cases(root, ["c060", "c061"])  # an empty index may be built over without overwrite
    assert build_index(cases, ckpt, root, overwrite=False, **_opts(tmp_path, kit)).removed == 0


def test_a_damaged_index_is_not_rebuilt_without_overwrite(tmp_path, kit, fresh):
    ckpt, root, cases = fresh(2)
    (_store.current_version(root) / MANIFEST).write_text("{damaged")
    with pytest.raises(IndexExistsError, match="cannot be read"):
        build_index(cases, ckpt, root, overwrite=False, **_opts(tmp_path, kit))
    update = build_index(cases, ckpt, root, overwrite=True, **_opts(tmp_path, kit))
    assert update.removed == 0 and len(open_index(root)) == 2  # how many it held is unknown


def test_versions_past_999999_stay_readable_and_ordered(tmp_path, fresh):
    _ckpt, root, _cases = fresh(6)
    only = _store.current_version(root)
    only.rename(root / "v999998-abcdef")
    (root / "CURRENT").write_text("v999998-abcdef\n")
    names = []
    for case_id in ("c000", "c001", "c002", "c003"):
        names.append(remove_cases(root, [case_id]).version)
        assert open_index(root).version == names[-1]  # the pointer names a version every reader accepts
    assert [n.split("-")[0] for n in names] == ["v999999", "v1000000", "v1000001", "v1000002"]
    kept = sorted(p.name.split("-")[0] for p in root.iterdir() if p.name.startswith("v"))
    assert kept == ["v1000000", "v1000001", "v1000002"]  # the oldest by number were collected, not by name
    assert open_index(root).case_ids == ["c004", "c005"]


def test_an_add_with_no_usable_case_is_an_error(tmp_path, kit, fresh):
    _ckpt, root, cases = fresh(3)
    live = open_index(root).version
    broken = make_cases(tmp_path / "broken", 2, start=40)
    for c in broken:
        c.image.write_bytes(b"not an image")
    with pytest.raises(NothingToIndexError, match=r"none of the 2 new cases had a usable image \(2 left out"):
        add_cases(root, broken, **_opts(tmp_path, kit))
    report = LoadReport()
    report.skip("csv:2", "image file missing")  # the loader left every row out
    with pytest.raises(NothingToIndexError, match="no usable new case .*csv:2"):
        add_cases(root, [], report=report, **_opts(tmp_path, kit))
    # already indexed ones do not hide that the new one failed, and the error quotes the failure, not them
    with pytest.raises(NothingToIndexError, match=rf"1 left out, e.g. {broken[0].image}: .*\); 1 already indexed"):
        add_cases(root, [cases[0], broken[0]], **_opts(tmp_path, kit))
    report = LoadReport()
    report.skip("csv:9", "image file missing")  # a re-exported archive: the indexed cases + a new row left out
    with pytest.raises(NothingToIndexError, match=r"no usable new case \(1 left out, e.g. csv:9: image file missing\); 2 "):
        add_cases(root, cases[:2], report=report, **_opts(tmp_path, kit))
    assert add_cases(root, cases[:2], **_opts(tmp_path, kit)).added == 0  # only known ids: documented, not an error
    assert open_index(root).version == live


def test_an_add_whose_index_checkpoint_has_gone_names_it(tmp_path):
    # without a checkpoint, add_cases encodes with the one the index records; one moved away since is named
    ckpt, root, _cases = make_index(tmp_path, 3)
    live = open_index(root).version
    ckpt.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"{ckpt / 'config.json'}: not found; a checkpoint folder holds"):
        add_cases(root, make_cases(tmp_path / "new", 1, start=40), cache_dir=tmp_path / "cache", progress=False)
    assert open_index(root).version == live and len(open_index(root)) == 3


def _bad_records(records: list[dict]) -> dict[str, tuple[list, str]]:
    no_key = [{k: v for k, v in r.items() if k != "diagnosis"} if i == 1 else r for i, r in enumerate(records)]
    wrong_type = [dict(r, fields=["streaks"]) if i == 2 else r for i, r in enumerate(records)]
    numeric_id = [dict(r, case_id=7) if i == 0 else r for i, r in enumerate(records)]
    repeated = [dict(r, case_id="c000") if i == 2 else r for i, r in enumerate(records)]
    return {
        "missing_key": (no_key, "line 2: missing key(s) diagnosis"),
        "not_an_object": ([*records[:2], ["c009"], *records[3:]], "line 3: expected a JSON object, got list"),
        "wrong_type": (wrong_type, "line 3: 'fields' must be an object of strings"),
        "numeric_id": (numeric_id, "line 1: 'case_id' must be a string"),
        "repeated_id": (repeated, "line 3: case_id 'c000' repeats line 1"),
    }


@pytest.mark.parametrize("damage", ["missing_key", "not_an_object", "wrong_type", "numeric_id", "repeated_id"])
def test_bad_case_records_are_refused_on_load(tmp_path, built, damage):
    root = tmp_path / "index"
    shutil.copytree(built[1], root)
    path = _store.current_version(root) / CASES
    records = [json.loads(line) for line in path.read_text().splitlines()][:4]
    lines, reason = _bad_records(records)[damage]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    manifest = path.parent / MANIFEST  # keep the counts consistent: only the records are wrong
    doc = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**doc, "count": 4}))
    vectors = path.parent / VECTORS
    np.save(vectors, np.load(vectors)[:4])
    np.save(path.parent / HEATMAPS, np.load(path.parent / HEATMAPS)[:4])
    with pytest.raises(ValueError, match="corrupt or unreadable") as caught:
        open_index(root)
    assert str(path) in str(caught.value) and reason in str(caught.value)


def test_two_overlapping_writers_keep_each_others_cases(tmp_path, kit, fresh, monkeypatch):
    import dermcir.index.build

    _ckpt, root, _cases = fresh(3)
    first, second = make_cases(tmp_path / "a", 2, start=70), make_cases(tmp_path / "b", 2, start=80)
    real_encode = dermcir.index.build.encode_cases
    encoding = threading.Event()

    def slow_encode(model, cases, *args, **kwargs):
        if cases[0].case_id == "c070":
            encoding.set()
            time.sleep(1.0)  # the second writer starts (and, without the lock, reads the index) meanwhile
        return real_encode(model, cases, *args, **kwargs)

    monkeypatch.setattr(dermcir.index.build, "encode_cases", slow_encode)
    errors = []

    def writer(cases) -> None:
        try:
            add_cases(root, cases, **_opts(tmp_path, kit))
        except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
            errors.append(repr(exc))

    a = threading.Thread(target=writer, args=(first,))
    a.start()
    assert encoding.wait(30)
    b = threading.Thread(target=writer, args=(second,))
    b.start()
    a.join()
    b.join()
    assert not errors, errors
    assert sorted(open_index(root).case_ids) == ["c000", "c001", "c002", "c070", "c071", "c080", "c081"]


def test_an_update_reports_its_own_version_not_a_later_writers(tmp_path, kit, fresh, monkeypatch):
    import dermcir.index.build

    _ckpt, root, _cases = fresh(4)
    real_lock, others = dermcir.index.build.writer_lock, []

    @contextmanager
    def lock_then_another_writer(path, *args, **kwargs):
        with real_lock(path, *args, **kwargs):
            yield
        if not others:  # another writer publishes as soon as the lock is released
            others.append(None)
            others[0] = remove_cases(root, ["c003"])

    monkeypatch.setattr(dermcir.index.build, "writer_lock", lock_then_another_writer)
    update = remove_cases(root, ["c001"])
    assert update.version != others[0].version
    ids = [json.loads(line)["case_id"] for line in (root / update.version / CASES).read_text().splitlines()]
    assert ids == ["c000", "c002", "c003"]


def test_an_unwritable_out_is_found_before_encoding(tmp_path, kit, monkeypatch):
    import dermcir.index.build

    monkeypatch.setattr(dermcir.index.build, "encode_cases", lambda *a, **k: pytest.fail("encoded before writing"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OSError, match="afile"):  # cannot create a folder under a file (as root too)
        build_index(make_cases(tmp_path / "i", 2), kit[0], tmp_path / "afile" / "index", **_opts(tmp_path, kit))


def test_a_failed_build_into_a_new_folder_leaves_nothing(tmp_path, kit):
    cases = make_cases(tmp_path / "images", 2)
    for c in cases:
        c.image.write_bytes(b"x")
    with pytest.raises(NothingToIndexError):
        build_index(cases, kit[0], tmp_path / "new" / "index", **_opts(tmp_path, kit))
    assert not (tmp_path / "new").exists()


def test_updates_of_a_mistyped_root_create_nothing(tmp_path, kit):
    typo = tmp_path / "typo" / "runs" / "idx"
    with pytest.raises(FileNotFoundError, match="no dermcir index here"):
        remove_cases(typo, ["c001"])
    with pytest.raises(FileNotFoundError, match="no dermcir index here"):
        add_cases(typo, make_cases(tmp_path / "i", 1), **_opts(tmp_path, kit))
    assert not (tmp_path / "typo").exists()


def test_a_weights_file_for_the_checkpoint_folder_is_named(tmp_path, kit, fresh):
    ckpt, root, cases = fresh(2)
    weights = next(p for p in ckpt.iterdir() if p.suffix == ".safetensors")
    expected = f"{weights}: is a file; expected a checkpoint folder"
    with pytest.raises(ValueError, match=re.escape(expected)):
        add_cases(root, make_cases(tmp_path / "more", 1, start=50), checkpoint=weights, progress=False)
    with pytest.raises(ValueError, match=re.escape(expected)):
        build_index(cases, weights, tmp_path / "other", progress=False)


def test_device_names_are_checked():
    from dermcir.index import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="device 'gpu' is not known; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_version_collected_while_being_opened_is_retried(tmp_path, fresh, monkeypatch):
    from dermcir.index import case_index

    _ckpt, root, _cases = fresh(3)
    old = _store.current_version(root)
    remove_cases(root, ["c001"])
    new = _store.current_version(root)
    (root / "CURRENT").write_text(old.name + "\n")  # a reader resolves the pointer to the old version ...
    real_load, calls = case_index.load_version, []

    def load_version(folder):
        calls.append(folder.name)
        if len(calls) == 1:  # ... a writer publishes and collects it while faiss reads it: looks corrupt
            (root / "CURRENT").write_text(new.name + "\n")
            raise ValueError(f"{folder / HNSW}: corrupt or unreadable FAISS index")
        return real_load(folder)

    monkeypatch.setattr(case_index, "load_version", load_version)
    assert open_index(root).version == new.name and calls == [old.name, new.name]


# ---- waiting writers, a failed first build's clean-up, going back to a previous version, a bad byte -----------------
class _Waiting(logging.Handler):
    """Sets ``event`` when a writer says it waits for another one (the message writer_lock logs before blocking)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.event, self.messages = threading.Event(), []

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for another writer" in record.getMessage():
            self.messages.append(record.getMessage())
            self.event.set()


@pytest.fixture
def waiting():
    handler, logger = _Waiting(), logging.getLogger("dermcir.index._store")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_writer_that_must_wait_says_so(tmp_path, fresh, waiting):
    _ckpt, root, _cases = fresh(3)
    done = []
    with _store.writer_lock(root):  # a build or an update in progress
        t = threading.Thread(target=lambda: done.append(remove_cases(root, ["c001"])), daemon=True)
        t.start()
        assert waiting.event.wait(30), "the waiting update logged nothing"
        assert not done  # it waits, and said so first
    t.join(30)
    assert waiting.messages == [f"waiting for another writer of {root} (a build or an update is in progress)"]
    assert done and open_index(root).case_ids == ["c000", "c002"]


def test_a_writer_waiting_on_a_removed_lock_file_locks_the_new_one(tmp_path, waiting):
    root, inside = tmp_path / "idx", threading.Event()
    first = ExitStack()
    first.enter_context(_store.writer_lock(root))

    def waiter() -> None:
        with _store.writer_lock(root):
            inside.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    try:
        waiting.event.wait(10)  # the waiter holds the first .lock open and waits to lock it
        (root / ".lock").unlink()  # what a failed first build's clean-up does, under its lock
        with _store.writer_lock(root):  # a third writer, arriving now, locks the new .lock at once
            first.close()
            # Locking the unlinked file would let the waiter in now, beside the third writer.
            assert not inside.wait(1.0), "two writers held the lock at once"
    finally:
        first.close()  # no-op when released above
    t.join(30)
    assert inside.is_set() and waiting.event.is_set()


def _hold_encoding_of(monkeypatch, case_id: str, waiting) -> threading.Event:
    """Make the write that encodes ``case_id`` first hold its lock until another writer waits on it; the event is set
    once that write is encoding."""
    import dermcir.index.build

    real_encode, encoding = dermcir.index.build.encode_cases, threading.Event()

    def slow_encode(model, cases, *args, **kwargs):
        if cases[0].case_id == case_id:
            encoding.set()
            waiting.event.wait(10)
        return real_encode(model, cases, *args, **kwargs)

    monkeypatch.setattr(dermcir.index.build, "encode_cases", slow_encode)
    return encoding


def _run_into(results: dict[str, object], name: str, write) -> None:
    """A writer thread's body: its result, or its exception, under ``name``."""
    try:
        results[name] = write()
    except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
        results[name] = exc


def test_a_failed_first_build_does_not_strand_a_build_waiting_on_it(tmp_path, kit, monkeypatch, waiting):
    out = tmp_path / "new" / "index"
    bad = make_cases(tmp_path / "bad", 1, start=90)
    bad[0].image.write_bytes(b"x")
    good = make_cases(tmp_path / "good", 2)
    # the failing build holds the lock until the other one waits on it
    encoding = _hold_encoding_of(monkeypatch, "c090", waiting)
    results: dict[str, object] = {}

    def builder(name, cases) -> None:
        _run_into(results, name, lambda: build_index(cases, kit[0], out, **_opts(tmp_path, kit)))

    a = threading.Thread(target=builder, args=("failing", bad), daemon=True)
    a.start()
    assert encoding.wait(30)
    b = threading.Thread(target=builder, args=("good", good), daemon=True)
    b.start()
    a.join(60)
    b.join(60)
    assert isinstance(results["failing"], NothingToIndexError), results
    assert not isinstance(results["good"], Exception), results["good"]  # was: No such file or directory .tmp-...
    assert waiting.event.is_set()  # the good build did wait on the failing one's lock file
    assert open_index(out).case_ids == ["c000", "c001"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("v")) == [".lock", "CURRENT"]


def test_an_update_started_during_the_first_build_waits_for_it(tmp_path, kit, monkeypatch, waiting):
    """docs/search.md says an update waits for a build in progress; during an index's first build it was refused at
    once ("no dermcir index here; build one first"), because the index was looked for before the lock."""
    out = tmp_path / "new" / "index"
    encoding = _hold_encoding_of(monkeypatch, "c000", waiting)  # the first build holds the lock till the update waits
    results: dict[str, object] = {}
    build = threading.Thread(target=_run_into, args=(results, "build", lambda: build_index(
        make_cases(tmp_path / "first", 3), kit[0], out, **_opts(tmp_path, kit))), daemon=True)
    build.start()
    assert encoding.wait(30)
    new = make_cases(tmp_path / "later", 1, start=50)
    add = threading.Thread(target=_run_into, args=(results, "add", lambda: add_cases(
        out, new, **_opts(tmp_path, kit))), daemon=True)
    add.start()
    build.join(60)
    add.join(60)
    assert not isinstance(results["add"], Exception), results["add"]
    assert waiting.event.is_set() and open_index(out).case_ids == ["c000", "c001", "c002", "c050"]
    assert remove_cases(out, ["c001"]).total == 3
    # a lock file that nobody holds (left by a killed first build) is no build in progress: refused as before
    stray = tmp_path / "killed"
    stray.mkdir()
    (stray / ".lock").touch()
    with pytest.raises(FileNotFoundError, match="no dermcir index here"):
        remove_cases(stray, ["c000"])


def test_going_back_to_a_previous_version_survives_the_next_write(tmp_path, fresh):
    _ckpt, root, _cases = fresh(4)
    v1 = _store.current_version(root).name
    remove_cases(root, ["c000"])
    remove_cases(root, ["c001"])  # two wrong updates
    (root / "CURRENT").write_text(v1 + "\n")  # going back, as docs/search.md describes
    v4 = remove_cases(root, ["c003"]).version
    versions = sorted(p.name for p in root.iterdir() if p.name.startswith("v"))
    assert v1 in versions and len(versions) == 4  # the restored version stays: this write can be undone too
    (root / "CURRENT").write_text(v1 + "\n")
    assert open_index(root).case_ids == ["c000", "c001", "c002", "c003"]
    (root / "CURRENT").write_text(v4 + "\n")
    v5 = remove_cases(root, ["c002"]).version
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("v"))
    assert kept == [versions[2], v4, v5]  # then the restored and the abandoned ones go, as other old versions do
    assert open_index(root).case_ids == ["c000", "c001"]


def test_a_bad_byte_in_the_case_records_is_named_by_its_line(tmp_path, built):
    root = tmp_path / "index"
    shutil.copytree(built[1], root)
    path = _store.current_version(root) / CASES
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 12 and len(b"".join(lines)) < 8192  # one read of a text file would decode them all
    lines[9] = lines[9].replace(b'"diagnosis": "', b'"diagnosis": "\xff', 1)
    path.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match="corrupt or unreadable") as caught:
        open_index(root)
    assert f"{path}: corrupt or unreadable (line 10: 'utf-8' codec can't decode byte 0xff" in str(caught.value)


def test_a_full_disk_at_the_pointer_leaves_no_orphan_version_and_says_what_stays_live(tmp_path, fresh, monkeypatch):
    """ENOSPC while writing CURRENT's temporary file left the complete new version folder (never published) on the
    full disk, in one of the kept slots; the error named no path."""
    _ckpt, root, _cases = fresh(3)
    live = _store.current_version(root)
    real_open = open

    def full_disk(path, *args, **kwargs):
        if str(path).startswith(str(root / ".tmp-CURRENT")):
            raise OSError(28, "No space left on device")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError, match=re.escape(f"{root}: the new index version could not be written ([Errno 28] No "
                                                f"space left on device); version {live.name} stays live")):
        remove_cases(root, ["c001"])
    monkeypatch.undo()
    assert _store.current_version(root) == live and open_index(root).case_ids == ["c000", "c001", "c002"]
    assert sorted(p.name for p in root.iterdir()) == [".lock", "CURRENT", live.name]


def test_a_folder_the_file_system_will_not_sync_does_not_fail_the_write(tmp_path, fresh, monkeypatch):
    """Some file systems (network, FUSE) refuse fsync on a folder (EINVAL): every index write failed there with a
    bare "[Errno 22] Invalid argument"; and an error after the pointer swap reported a live update as failed."""
    import os

    _ckpt, root, _cases = fresh(3)
    real_fsync = os.fsync

    def no_folder_sync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_sync)
    update = remove_cases(root, ["c001"])
    monkeypatch.undo()
    assert open_index(root).case_ids == ["c000", "c002"] and update.version == _store.current_version(root).name


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_tied_scores_come_in_row_order_whatever_k(kind):
    """One image indexed under several ids gives equal scores; which of them came first changed with k (faiss's heap
    order), so the top-1 result was not the first of the top-5."""
    from dermcir.index._vectors import VectorParams, build_vector_index, search_vectors

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    duplicates = [3, 11, 17, 25, 38]
    vectors[duplicates] = vectors[3]  # the same picture five times
    params = VectorParams(kind=kind)
    index = build_vector_index(vectors, params)
    query = vectors[3:4] * 2
    for k in range(1, 41):
        scores, rows = search_vectors(index, query, k, params)
        assert rows[0].tolist() == duplicates[:k] + ([] if k <= 5 else rows[0, 5:].tolist()), k
        assert (np.diff(scores[0]) <= 0).all()
    # many queries at once: each row sorted on its own
    scores, rows = search_vectors(index, np.vstack([query, vectors[:1]]), 3, params)
    assert rows[0].tolist() == duplicates[:3] and rows[1, 0] == 0


def test_index_vectors_and_benchmark_scores_are_exact_float32(tmp_path, kit, monkeypatch):
    """CUDA's convolutions use TF32 by default (a 10-bit mantissa): vectors an index stored or a benchmark scored on a
    GPU differed slightly from those a CPU search computes. Both are now encoded with TF32 off, and the flags put back."""
    from dermcir.devices import exact_float32
    from dermcir.evaluation import cv
    from dermcir.index import _encode

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = (cudnn.allow_tf32, matmul.allow_tf32)
    with pytest.raises(RuntimeError, match="inside"), exact_float32():
        assert not cudnn.allow_tf32 and not matmul.allow_tf32
        raise RuntimeError("inside")
    assert (cudnn.allow_tf32, matmul.allow_tf32) == before

    seen = []
    model = kit[1]
    real = model.encode_target_with_masks
    monkeypatch.setattr(model, "encode_target_with_masks",
                        lambda images: seen.append(cudnn.allow_tf32) or real(images))
    _encode.encode_cases(model, make_cases(tmp_path / "images", 2), cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setattr(cv, "describe_all", lambda *args, **kwargs: seen.append(cudnn.allow_tf32) or {
        "target": None, "composed": None, "text": None})
    monkeypatch.setattr(cv, "target_embeddings", lambda d: d)
    monkeypatch.setattr(cv, "_variants", lambda d, beta: d)
    cv._main_embeddings(model, None, np.arange(2), np.arange(2), torch.device("cpu"),
                        type("Cfg", (), {"full_batches": False})())
    assert seen == [False, False, False] and cudnn.allow_tf32 == before[0]


def test_indexing_on_a_cpu_encodes_small_batches_unless_told(tmp_path, monkeypatch):
    """A batch of 32 on a CPU took 22 s and 3.0 GB for 96 images of 512 px, against 12 s and 1.3 GB in batches of 4."""
    from dermcir.models import ComposedRetrievalModel

    sizes = []
    encode = ComposedRetrievalModel.encode_target_with_masks

    def recorded(self, images):
        sizes.append(len(images))
        return encode(self, images)

    monkeypatch.setattr(ComposedRetrievalModel, "encode_target_with_masks", recorded)
    ckpt = make_checkpoint(tmp_path / "ckpt")
    cases = make_cases(tmp_path / "img", 10)
    build_index(cases, ckpt, tmp_path / "index", device="cpu", progress=False)
    assert sizes == [4, 4, 2]
    sizes.clear()
    build_index(cases, ckpt, tmp_path / "index2", device="cpu", batch_size=32, progress=False)
    assert sizes == [10]
