import csv as std_csv
import io
import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermcir.data import ImageError, LoadReport, category_counts, load_case_csv, load_derm7pt, load_rgb
from dermcir.data.cache import preprocess_cases
from dermcir.data.categories import category_of
from dermcir.data.images import remove_black_border

from .conftest import SHARED_DERM7PT, synthetic_lesion, write_release


def _rows(spec):
    return [{"diagnosis": dx} for dx, n in spec for _ in range(n)]


def test_categories_are_mapped_and_thresholded(tmp_path):
    rows = _rows([("clark nevus", 3), ("blue nevus", 2), ("melanoma (in situ)", 4), ("seborrheic keratosis", 2),
                  ("melanosis", 1), ("basal cell carcinoma", 2)])
    root = write_release(tmp_path / "r", rows)
    cases, report = load_derm7pt(root, min_cases=3)
    assert category_counts(cases) == {"nevus": 5, "melanoma": 4, "benign keratosis-like": 3}
    assert report.dropped_categories == {"basal cell carcinoma": 2}
    cases, _ = load_derm7pt(root, min_cases=4)
    assert set(category_counts(cases)) == {"nevus", "melanoma"}


def test_unknown_diagnosis_is_reported_not_fatal(tmp_path):
    root = write_release(tmp_path / "r", _rows([("clark nevus", 2), ("something new", 1)]))
    cases, report = load_derm7pt(root, min_cases=1)
    assert len(cases) == 2
    assert any("unknown diagnosis 'something new'" in why for _, why in report.skipped)


def test_missing_and_corrupt_images_are_named_and_skipped(tmp_path):
    rows = _rows([("clark nevus", 4)])
    rows[1]["_no_image"] = True
    root = write_release(tmp_path / "r", rows)
    (root / "images" / "SYN" / "img002.jpg").write_bytes((root / "images" / "SYN" / "img002.jpg").read_bytes()[:300])
    (root / "images" / "SYN" / "img003.jpg").write_bytes(b"not an image at all")
    cases, report = load_derm7pt(root, min_cases=1)
    assert [c.case_id for c in cases] == ["1", "3", "4"]
    assert any("img001.jpg" in what and "missing" in why for what, why in report.skipped)
    kept, images = preprocess_cases(cases, 32, report=report, progress=False)
    assert [c.case_id for c in kept] == ["1"]
    assert images.shape == (1, 32, 32, 3) and images.dtype == np.uint8
    reasons = dict(report.skipped)
    assert "truncated" in reasons[str(root / "images" / "SYN" / "img002.jpg")]
    assert "not a recognised image" in reasons[str(root / "images" / "SYN" / "img003.jpg")]


def test_preprocessing_is_cached(tmp_path, monkeypatch):
    root = write_release(tmp_path / "r", _rows([("clark nevus", 2)]))
    cases, _ = load_derm7pt(root, min_cases=1)
    first = preprocess_cases(cases, 32, progress=False)[1]
    from dermcir.data import cache

    monkeypatch.setattr(cache, "preprocess", lambda *a, **k: pytest.fail("cache miss on second run"))
    np.testing.assert_array_equal(preprocess_cases(cases, 32, progress=False)[1], first)


def test_a_cache_that_cannot_be_written_keeps_every_good_image(tmp_path, caplog):
    """A full disk or a read-only cache is the cache's problem, not the image's: no case is left out."""
    root = write_release(tmp_path / "r", _rows([("clark nevus", 3)]))
    cases, _ = load_derm7pt(root, min_cases=1)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")  # every write into it fails, even as root
    report = LoadReport()
    with caplog.at_level("WARNING", logger="dermcir"):
        kept, images = preprocess_cases(cases, 32, cache_dir=blocker, report=report, progress=False)
    assert kept == cases and images.shape == (3, 32, 32, 3) and report.skipped == []
    np.testing.assert_array_equal(images, preprocess_cases(cases, 32, progress=False)[1])
    assert f"could not write 3 preprocessed image(s) into the cache {blocker / 'images'}" in caplog.text


def test_an_unreadable_cache_file_is_recomputed_not_a_lost_case(tmp_path, caplog):
    root = write_release(tmp_path / "r", _rows([("clark nevus", 2)]))
    cases, _ = load_derm7pt(root, min_cases=1)
    first = preprocess_cases(cases, 32, cache_dir=tmp_path / "cache", progress=False)[1]
    broken = sorted((tmp_path / "cache" / "images").glob("*.npy"))
    for path in broken:
        path.write_bytes(b"not an npy file")
    report = LoadReport()
    with caplog.at_level("WARNING", logger="dermcir"):
        kept, images = preprocess_cases(cases, 32, cache_dir=tmp_path / "cache", report=report, progress=False)
    assert kept == cases and report.skipped == []
    np.testing.assert_array_equal(images, first)
    assert all(f"cache file {path} unreadable" in caplog.text for path in broken)


def test_border_removal_uneven_and_absent():
    img = np.asarray(synthetic_lesion(0, (90, 60, 40), size=(120, 80), border=0)).copy()
    framed = img.copy()
    framed[:7], framed[-3:], framed[:, :11], framed[:, -1:] = 0, 0, 0, 0
    out = remove_black_border(framed)
    assert out.shape == (80 - 10, 120 - 12, 3)
    assert out.min(axis=(0, 1)).max() > 0
    np.testing.assert_array_equal(remove_black_border(img), img)  # no frame: unchanged
    dark = np.zeros((50, 50, 3), np.uint8)
    np.testing.assert_array_equal(remove_black_border(dark), dark)  # all dark: not cropped away


def test_a_dark_lesion_at_an_edge_is_not_taken_for_the_frame():
    """A blue-black lesion wider than the field of view, touching the top edge inside a 12-px frame: its rows were
    trimmed as frame, 250 of 512 rows, and 84 % of the lesion was lost without a word."""
    img = np.full((512, 768, 3), (170, 120, 100), np.uint8)  # skin
    img[:250, 30:740] = (20, 15, 35)  # the lesion's dark rows: over 90 % of the width
    img[:12], img[-12:], img[:, :10], img[:, -10:] = 0, 0, 0, 0  # the scanner frame
    out = remove_black_border(img)
    # the frame goes on every side (top and bottom: solid black bars of equal width); the lesion's rows all stay
    assert out.shape[0] == 512 - 24
    assert (out[: 250 - 12, 20:730].max(axis=2) < 40).all()
    assert out.shape[1] == 768 - 20  # the side frames go as before
    lesion_only = img.copy()
    lesion_only[-12:] = (170, 120, 100)  # no bar facing the top one: the top edge, frame and lesion, is kept
    assert remove_black_border(lesion_only).shape == (512 - 0, 768 - 20, 3)


@pytest.mark.parametrize("axis", [0, 1])
def test_screen_capture_bars_wider_than_a_quarter_are_trimmed(axis):
    """A portrait photo shown on a 16:9 screen has solid black bars of 31 % of the width on both sides; they were
    kept (longer than a frame may be), and the lesion was squeezed into a third of the view."""
    photo = np.asarray(synthetic_lesion(0, (90, 60, 40), size=(300, 420), border=0)).copy()  # 300 wide, 420 high
    if axis == 1:
        canvas = np.zeros((420, 747, 3), np.uint8)
        canvas[:, 223:523] = photo
        canvas[:, :223] = np.random.default_rng(0).integers(0, 9, (420, 223, 3))  # JPEG noise in the bars
    else:
        photo = photo.transpose(1, 0, 2).copy()  # a landscape photo letterboxed on a tall screen
        canvas = np.zeros((747, 420, 3), np.uint8)
        canvas[223:523] = photo
    np.testing.assert_array_equal(remove_black_border(canvas), photo)
    one_side = canvas.copy()
    if axis == 1:
        one_side[:, 523:] = 200  # a bar on one side only is not a pair of bars: kept
    else:
        one_side[523:] = 200
    assert remove_black_border(one_side).shape[axis] == 747


def test_load_rgb_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cases = {
        "gray.png": Image.fromarray(rgb[..., 0]),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "alpha.png": Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)]), "RGBA"),
        "deep.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "float.tif": Image.fromarray(rgb[..., 0].astype(np.float32) * 4.0),  # mode F: read-only from Pillow
    }
    for name, img in cases.items():
        img.save(tmp_path / name)
        out = load_rgb(tmp_path / name)
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
        if name in ("deep.png", "float.tif"):  # one channel of 16 or 32 bits, scaled to its maximum
            np.testing.assert_allclose(out[..., 1], rgb[..., 0] * (255 / rgb[..., 0].max()), atol=1, err_msg=name)
    with_nan = rgb[..., 0].astype(np.float32)
    with_nan[0, :3] = (np.nan, np.inf, -np.inf)
    Image.fromarray(with_nan).save(tmp_path / "nan.tif")
    out = load_rgb(tmp_path / "nan.tif")
    assert out[0, :3, 0].tolist() == [0, 0, 0] and out[1:, :, 0].max() > 200
    with pytest.raises(ImageError, match="nothere.jpg: file not found"):
        load_rgb(tmp_path / "nothere.jpg")


def test_case_csv_loader(tmp_path):
    synthetic_lesion(0, (1, 2, 3)).save(tmp_path / "a.jpg")
    synthetic_lesion(1, (1, 2, 3)).save(tmp_path / "b.jpg")
    (tmp_path / "cases.csv").write_text(
        "id,image,diagnosis,streaks\nA,a.jpg,clark nevus,irregular\nB,b.jpg,dermatofibroma,\nC,c.jpg,melanoma,\n"
        "A,b.jpg,melanoma,\n"
    )
    cases, report = load_case_csv(tmp_path / "cases.csv")
    assert [(c.case_id, c.category) for c in cases] == [("A", "nevus"), ("B", "dermatofibroma")]
    assert cases[0].fields == {"streaks": "irregular"}
    assert len(report.skipped) == 2
    with pytest.raises(ValueError, match="missing column"):
        (tmp_path / "bad.csv").write_text("name,image\n")
        load_case_csv(tmp_path / "bad.csv")


def test_category_table_errors_list_known():
    assert category_of("Melanoma (in situ)") == "melanoma"
    with pytest.raises(ValueError, match="known diagnoses: basal cell carcinoma"):
        category_of("wart")


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DERM7PT.is_dir(), reason="shared Derm7pt copy not present")
def test_shared_release_counts_and_preprocessing():
    cases, report = load_derm7pt(SHARED_DERM7PT)
    assert len(cases) == 888 and not report.skipped
    assert category_counts(cases) == {"nevus": 575, "melanoma": 252, "benign keratosis-like": 61}
    rep = LoadReport()
    kept, images = preprocess_cases(cases[:6], 128, report=rep, progress=False)
    assert len(kept) == 6 and images.shape == (6, 128, 128, 3)
    # borders removed: no frame rows of pure black remain at the image edges
    assert (images[:, :2].max(axis=(1, 2, 3)) > 40).all()


def test_missing_meta_is_a_clear_error(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="meta.csv: not found"):
        load_derm7pt(tmp_path)


def test_a_large_16_bit_image_decodes_without_float64_copies():
    # a 16-bit upload is small on the wire but large decoded; its conversion must not multiply that by eight
    buf = io.BytesIO()
    Image.new("I;16", (2000, 1500), 1000).save(buf, format="PNG")
    tracemalloc.start()
    try:
        rgb = load_rgb(buf.getvalue(), name="deep.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.shape == (1500, 2000, 3) and rgb.dtype == np.uint8 and int(rgb.max()) == 255
    assert peak < 10 * 2000 * 1500, f"peak {peak / 1e6:.0f} MB while decoding a 3 MP 16-bit image"


def test_an_eps_upload_never_reaches_ghostscript(monkeypatch):
    """Pillow reads EPS by running Ghostscript on the file: with gs installed, an upload became a PostScript program
    run on the server. Only the photo formats are read now; here gs is made to look installed and its calls recorded."""
    from PIL import EpsImagePlugin

    calls = []

    def record_and_fail(command, **_kwargs):
        calls.append(command)
        raise OSError("no real Ghostscript in the test")

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")
    monkeypatch.setattr(EpsImagePlugin.subprocess, "check_call", record_and_fail)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(runs on the server) print\nshowpage\n%%EOF\n"
    with pytest.raises(ImageError, match=r"lesion.jpg: not a recognised image format \(accepted: JPEG, PNG, TIFF"):
        load_rgb(eps, name="lesion.jpg")
    assert calls == []


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF"])
def test_the_photo_formats_are_read(fmt):
    buf = io.BytesIO()
    synthetic_lesion(1, (90, 60, 40), size=(48, 32)).save(buf, format=fmt)
    assert load_rgb(buf.getvalue(), name=f"x.{fmt.lower()}").shape == (32, 48, 3)


def test_an_image_ten_times_longer_than_wide_is_read_and_a_strip_refused():
    """An image is resized to a square; resizing a 1 x 40,000,000 strip took 1.8 GB and 23 s (a square of as many
    pixels 0.7 GB and 7 s), from a 300 kB upload. The size is read from the header: nothing is decoded."""
    buf = io.BytesIO()
    synthetic_lesion(1, (90, 60, 40), size=(200, 20)).save(buf, format="PNG")
    assert load_rgb(buf.getvalue()).shape == (20, 200, 3)
    from .searchkit import png_declaring

    for w, h in ((20_001, 1_999), (1, 39_990_000)):
        with pytest.raises(ImageError, match=f"strip.png: is {w}x{h} pixels, one side more than 10 times the other"):
            load_rgb(png_declaring(w, h), name="strip.png")


def test_any_decoder_error_is_the_file_s_fault(monkeypatch):
    """Pillow's decoders raise more than OSError on a damaged file (NotImplementedError, struct.error, TypeError):
    each must be an ImageError naming the file (it was a 500 over HTTP)."""
    from PIL import PngImagePlugin

    buf = io.BytesIO()
    synthetic_lesion(1, (90, 60, 40), size=(32, 32)).save(buf, format="PNG")
    for error in (NotImplementedError("Unknown pixel format flags 1"), TypeError("bad tag"), KeyError("x")):
        def fail(self, error=error):
            raise error

        monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", fail)
        with pytest.raises(ImageError, match="damaged.png: corrupt or truncated image"):
            load_rgb(buf.getvalue(), name="damaged.png")


def _clinic_csv(tmp_path: Path, text: str, images: int = 3) -> Path:
    for i in range(images):
        synthetic_lesion(i, (90, 60, 40)).save(tmp_path / f"img{i}.jpg")
    (tmp_path / "cases.csv").write_text(text, encoding="utf-8")
    return tmp_path / "cases.csv"


def test_case_csv_row_with_empty_diagnosis_is_left_out_and_named(tmp_path):
    csv = _clinic_csv(tmp_path, "id,image,diagnosis\nA,img0.jpg,melanoma\nB,img1.jpg,\nC,img2.jpg,  \nB,img1.jpg,nevus\n")
    cases, report = load_case_csv(csv)
    # B's empty-diagnosis row does not claim the id: the later, usable row B is kept
    assert [(c.case_id, c.diagnosis, c.category) for c in cases] == [("A", "melanoma", "melanoma"), ("B", "nevus", "nevus")]
    assert report.skipped == [(f"{csv}:3", "empty diagnosis"), (f"{csv}:4", "empty diagnosis")]


def test_case_csv_checklist_headers_follow_the_checklist_spelling(tmp_path, caplog):
    csv = _clinic_csv(
        tmp_path,
        "id,image,diagnosis,Pigment_Network,blue whitish veil, Streaks ,Dots-And-Globules,notes\n"
        "A,img0.jpg,melanoma,atypical,present,Irregular,regular,seen twice\n",
    )
    with caplog.at_level("WARNING", logger="dermcir"):
        cases, report = load_case_csv(csv)
    assert cases[0].fields == {"pigment_network": "atypical", "blue_whitish_veil": "present", "streaks": "irregular",
                               "dots_and_globules": "regular"}
    assert report.skipped == []
    assert "column(s) ['notes'] ignored" in caplog.text  # not a checklist field: said, not silently dropped
    (tmp_path / "twice.csv").write_text("id,image,diagnosis,pigment_network,Pigment Network\nA,img0.jpg,nevus,typical,\n")
    with pytest.raises(ValueError, match=r"twice.csv: columns 'pigment_network' and 'Pigment Network' both name the "
                                         r"checklist field 'pigment_network'"):
        load_case_csv(tmp_path / "twice.csv")
    (tmp_path / "same.csv").write_text("id,image,diagnosis,streaks,streaks\nA,img0.jpg,nevus,absent,irregular\n")
    with pytest.raises(ValueError, match=r"same.csv:1: column\(s\) \['streaks'\] appear more than once"):
        load_case_csv(tmp_path / "same.csv")  # pandas would have read the second one as 'streaks.1' and dropped it


def test_case_csv_bad_checklist_values_leave_the_field_out_not_the_case_and_are_reported(tmp_path, caplog):
    csv = _clinic_csv(
        tmp_path,
        "id,image,diagnosis,streaks,blue_whitish_veil,pigmentation,Location,sex\n"
        "A,img0.jpg,melanoma,irregluar,yes,,left forearm,M\n"
        "B,img1.jpg,nevus,regular,,Diffuse_Regular,back,f\n"
        "C,img2.jpg,nevus,,,,Left Forearm,female\n"
        "D,img9.jpg,nevus,irregluar,,,,\n",  # left out whole (no image): its bad field is not reported as well
    )
    with caplog.at_level("WARNING", logger="dermcir"):
        cases, report = load_case_csv(csv)
    # the biopsy-confirmed cases are kept; a bad value is left out of its case ("not given"), never guessed; spelling
    # is normalised by the checklist's own rule; M and F in the sex column are male and female
    assert [(c.case_id, c.fields) for c in cases] == [
        ("A", {"sex": "male"}),
        ("B", {"streaks": "regular", "pigmentation": "diffuse regular", "location": "back", "sex": "female"}),
        ("C", {"sex": "female"}),
    ]
    assert cases[0].text == "Patient: male."
    assert report.skipped == [(f"{tmp_path / 'img9.jpg'}", f"image file missing (row {csv}:5)")]
    assert [what for what, _ in report.fields_left_out] == [f"{csv}:2"] * 3 + [f"{csv}:4"]
    reasons = [why for _, why in report.fields_left_out]
    assert reasons[0].startswith("case 'A': column 'streaks': unknown value 'irregluar'")
    assert "allowed values: absent, regular, irregular" in reasons[0] and "the case is kept without it" in reasons[0]
    assert "column 'blue_whitish_veil': unknown value 'yes'" in reasons[1] and "allowed values: absent, present" in reasons[1]
    assert "column 'Location': unknown value 'left forearm'" in reasons[2] and "upper limbs" in reasons[2]
    assert reasons[3].startswith("case 'C': column 'Location': unknown value 'Left Forearm'")
    # one warning per column, with the count, the allowed values and the first rows: not silently
    assert f"{csv}: column 'Location': 2 value(s) outside the allowed values (abdomen, " in caplog.text
    assert "row 2 'left forearm', row 4 'Left Forearm'" in caplog.text
    assert f"{csv}: column 'streaks': 1 value(s)" in caplog.text


def test_case_csv_fields_left_out_of_cases_under_the_threshold_are_not_reported(tmp_path):
    csv = _clinic_csv(tmp_path, "id,image,diagnosis,sex\nA,img0.jpg,melanoma,x\nB,img1.jpg,nevus,y\nC,img2.jpg,nevus,\n")
    cases, report = load_case_csv(csv, min_cases=2)
    assert [c.case_id for c in cases] == ["B", "C"] and report.dropped_categories == {"melanoma": 1}
    assert [what for what, _ in report.fields_left_out] == [f"{csv}:3"]


def test_unclosed_quotes_are_an_error_naming_the_row_not_swallowed_rows(tmp_path):
    expected = "expected a UTF-8 CSV with a header row: id, image, diagnosis"
    _clinic_csv(tmp_path, "id,image,diagnosis\n")  # the images
    for name, text in {
        "end.csv": 'id,image,diagnosis\nA,img0.jpg,melanoma\nB,"img1.jpg,nevus\nC,img2.jpg,nevus\nD,img0.jpg,nevus\n',
        "notes.csv": 'id,image,diagnosis,notes\nA,img0.jpg,melanoma,x\nB,img1.jpg,nevus,"5 mm\nC,img2.jpg,nevus,y\n',
    }.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError) as exc:
            load_case_csv(tmp_path / name)
        assert str(exc.value).startswith(f"{tmp_path / name}:3: a quoted field in the row that starts on this line is "
                                         "never closed"), str(exc.value)
        assert expected in str(exc.value)
    # a quote that closes early and takes in the next row without ending the file: text after its closing quote
    (tmp_path / "early.csv").write_text('id,image,diagnosis\nA,"img0.jpg,melanoma\nB,"img1.jpg",nevus\nC,img2.jpg,x\n')
    with pytest.raises(ValueError, match=r"early.csv:3: text after the closing quote of a quoted field \(in the row that "
                                         r"starts on line 2\)"):
        load_case_csv(tmp_path / "early.csv")
    # quotes that do close, a doubled quote and a quote inside an unquoted value are fine
    (tmp_path / "ok.csv").write_text('id,image,diagnosis,notes\n"A",img0.jpg,melanoma,"a ""5 mm"" lesion,\nhealed"\n'
                                     'B,img1.jpg,nevus,5" wide\n')
    cases, _ = load_case_csv(tmp_path / "ok.csv")
    assert [c.case_id for c in cases] == ["A", "B"]
    root = write_release(tmp_path / "r", _rows([("clark nevus", 3)]))
    meta = root / "meta" / "meta.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], lines[1], lines[2].replace(",", ',"', 1), lines[3]]) + "\n")
    with pytest.raises(ValueError, match=r"meta.csv:3: a quoted field in the row that starts on this line is never "):
        load_derm7pt(root, min_cases=1)


def test_blank_rows_of_a_case_csv_are_passed_over_not_left_out(tmp_path):
    csv = _clinic_csv(tmp_path, "\n  \nid,image,diagnosis\nA,img0.jpg,melanoma\n   \n\t\n , ,\nB,img1.jpg,nevus\n,,\n")
    cases, report = load_case_csv(csv)
    assert [c.case_id for c in cases] == ["A", "B"]
    assert report.skipped == [] and report.n_rows == 2


def test_blank_rows_of_a_derm7pt_meta_file_are_passed_over(tmp_path):
    root = write_release(tmp_path / "r", _rows([("clark nevus", 2)]))
    meta = root / "meta" / "meta.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], "   ", lines[1], "," * 5, lines[2], " "]) + "\n")
    cases, report = load_derm7pt(root, min_cases=1)
    assert [c.case_id for c in cases] == ["1", "2"]
    assert report.skipped == [] and report.n_rows == 2


def test_case_csv_trailing_commas_and_unreadable_files(tmp_path):
    csv = _clinic_csv(tmp_path, "id,image,diagnosis,streaks\nA,img0.jpg,melanoma,irregular,\nB,img1.jpg,nevus,absent,\n")
    cases, report = load_case_csv(csv)  # a spreadsheet export's trailing comma: an empty extra cell, not a shift
    assert [(c.case_id, c.image.name, c.diagnosis, c.fields) for c in cases] == [
        ("A", "img0.jpg", "melanoma", {"streaks": "irregular"}), ("B", "img1.jpg", "nevus", {"streaks": "absent"})]
    assert report.skipped == []

    expected = "expected a UTF-8 CSV with a header row: id, image, diagnosis"
    (tmp_path / "extra.csv").write_text("id,image,diagnosis\nA,img0.jpg,melanoma\nB,img1.jpg,melanoma, in situ\n")
    with pytest.raises(ValueError, match=r"extra.csv:3: 4 fields but the header has 3 \(id, image, diagnosis\)"):
        load_case_csv(tmp_path / "extra.csv")
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(ValueError) as exc:
        load_case_csv(tmp_path / "empty.csv")
    assert str(exc.value).startswith(f"{tmp_path / 'empty.csv'}: empty file; {expected}")
    (tmp_path / "latin1.csv").write_bytes("id,image,diagnosis\nA,img0.jpg,nævus\n".encode("latin-1"))
    with pytest.raises(ValueError) as exc:
        load_case_csv(tmp_path / "latin1.csv")
    # the line, not a byte offset, and the way out: Excel users cannot find "offset 192"
    assert str(exc.value).startswith(f"{tmp_path / 'latin1.csv'}:2: not UTF-8 text (byte 0xe6")
    assert expected in str(exc.value) and 'Save As, "CSV UTF-8"' in str(exc.value)
    (tmp_path / "utf16.csv").write_text("id,image,diagnosis\nA,img0.jpg,melanoma\n", encoding="utf-16")
    with pytest.raises(ValueError, match=r"utf16.csv: UTF-16 text; expected a UTF-8 CSV .*CSV UTF-8"):
        load_case_csv(tmp_path / "utf16.csv")

    # a long cell (here in an ignored notes column) is read, as pandas read it, past csv's default limit of 131,072
    # characters; the process-wide limit is put back afterwards
    limit = std_csv.field_size_limit()
    notes = "x" * 300_000 + "\n" + "y" * 300_000
    (tmp_path / "huge.csv").write_text(f'id,image,diagnosis,notes\nA,img0.jpg,melanoma,"{notes}"\nB,img1.jpg,nevus,\n')
    cases, report = load_case_csv(tmp_path / "huge.csv")
    assert [(c.case_id, c.diagnosis) for c in cases] == [("A", "melanoma"), ("B", "nevus")] and report.skipped == []
    assert std_csv.field_size_limit() == limit


def test_derm7pt_meta_that_is_not_a_csv_is_a_clear_error(tmp_path):
    root = write_release(tmp_path / "r", _rows([("clark nevus", 2)]))
    meta = root / "meta" / "meta.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], *(line + "," for line in lines[1:])]) + "\n")  # trailing commas
    cases, _ = load_derm7pt(root, min_cases=1)
    assert [(c.case_id, c.diagnosis, c.image.name) for c in cases] == [("1", "clark nevus", "img000.jpg"),
                                                                      ("2", "clark nevus", "img001.jpg")]
    meta.write_bytes(b"")
    with pytest.raises(ValueError) as exc:
        load_derm7pt(root)
    assert str(exc.value).startswith(f"{meta}: empty file; expected a UTF-8 CSV with a header row: case_num")
    meta.write_bytes("\n".join(lines).encode() + "\n99,n\xe6vus".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_derm7pt(root)


def test_derm7pt_case_numbers_must_be_there_and_unique_and_cells_are_stripped(tmp_path):
    """A repeated case number used to pass the loader and fail indexing later, naming no row; a space around the
    image path was reported as a missing file that is there."""
    rows = [{"diagnosis": "clark nevus"} for _ in range(5)]
    rows[1]["case_num"] = " "
    rows[2]["case_num"] = "1"  # the first row's number again
    release = write_release(tmp_path / "release_v0", rows)
    meta = release / "meta" / "meta.csv"
    meta.write_text(meta.read_text().replace("SYN/img004.jpg", " SYN/img004.jpg "))
    cases, report = load_derm7pt(release, min_cases=1)
    assert [c.case_id for c in cases] == ["1", "4", "5"]
    assert cases[-1].image == release / "images" / "SYN" / "img004.jpg"
    assert report.skipped == [(f"{meta}:3", "empty case_num"), (f"{meta}:4 (case 1)", "duplicate case_num '1'")]


def test_derm7pt_a_row_left_out_does_not_shut_out_its_corrected_row(tmp_path):
    """A case number was marked seen before its image was checked: the corrected second row of a case whose first
    row named a missing image was refused as a "duplicate" of a case never kept (the CSV loader kept it)."""
    release = write_release(tmp_path / "release_v0", [{"diagnosis": "clark nevus"} for _ in range(3)])
    meta = release / "meta" / "meta.csv"
    lines = meta.read_text().splitlines(keepends=True)
    typo = lines[1].replace("SYN/img000.jpg", "SYN/img000.jpeg")
    meta.write_text(lines[0] + typo + "".join(lines[1:]))  # case 1 twice: a mistyped image, then the right one
    cases, report = load_derm7pt(release, min_cases=1)
    assert [c.case_id for c in cases] == ["1", "2", "3"]
    assert report.skipped == [(str(release / "images" / "SYN" / "img000.jpeg"),
                               f"image file missing (row {meta}:2 (case 1))")]
    meta.write_text(lines[0] + lines[1] + "".join(lines[1:]))  # a true duplicate stays one
    assert load_derm7pt(release, min_cases=1)[1].skipped == [(f"{meta}:3 (case 1)", "duplicate case_num '1'")]


def test_derm7pt_checklist_headers_follow_the_checklist_spelling_and_absent_ones_are_named(tmp_path, caplog):
    """``Pigment Network`` (as the clinic CSV spells it) or a missing checklist column gave every case an empty
    query text without a word, and a run reported image + text figures with no text at all."""
    release = write_release(tmp_path / "release_v0", [{"diagnosis": "melanoma", "streaks": "irregular"}])
    meta = release / "meta" / "meta.csv"
    official = load_derm7pt(release, min_cases=1)[0][0].text
    header, rest = meta.read_text().split("\n", 1)
    meta.write_text(header.replace("pigment_network", "Pigment Network").replace("streaks", "Streaks") + "\n" + rest)
    with caplog.at_level(logging.WARNING, logger="dermcir.data.cases"):
        assert load_derm7pt(release, min_cases=1)[0][0].text == official
    assert "no column for checklist field" not in caplog.text
    kept = [c for c in header.split(",") if c not in ("elevation", "location", "sex")]
    with open(meta, "w", newline="") as fh:
        writer = std_csv.DictWriter(fh, fieldnames=kept, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(std_csv.DictReader(io.StringIO(header + "\n" + rest)))
    with caplog.at_level(logging.WARNING, logger="dermcir.data.cases"):
        text = load_derm7pt(release, min_cases=1)[0][0].text
    assert "irregular" in text and "female" not in text
    assert "no column for checklist field(s) elevation, location, sex; the query texts will not mention them" in caplog.text


def test_case_csv_as_spreadsheets_write_it(tmp_path, caplog):
    """Excel's own headers (ID, Image, Case ID), its European ';' export, tab-separated text, Windows paths and a line
    break inside a quoted diagnosis: each read as meant. Before, `Category` was ignored and replaced by derived
    categories, `ID,Image,Diagnosis` and ';' files were refused, and backslash paths were "image file missing"."""
    (tmp_path / "images").mkdir()
    for i in range(3):
        synthetic_lesion(i, (90, 60, 40)).save(tmp_path / "images" / f"img{i}.jpg")
    expected = [("A", "img0.jpg", "clark nevus", "melanocytic"), ("B", "img1.jpg", "melanoma (in situ)", "melanocytic"),
                ("C", "img2.jpg", "seborrheic keratosis", "keratinocytic")]
    rows = [("A", "images/img0.jpg", "clark nevus", "Melanocytic"),
            ("B", "images\\img1.jpg", "melanoma\n(in  situ)", "Melanocytic"),
            ("C", "images/img2.jpg", "seborrheic keratosis", "Keratinocytic")]

    def write(name, sep, header):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as fh:
            writer = std_csv.writer(fh, delimiter=sep, lineterminator="\r\n")
            writer.writerow(header)
            writer.writerows(rows)
        return tmp_path / name

    for csv, sep in ((write("excel.csv", ",", ["ID", " Image ", "Diagnosis", "Category"]), ","),
                     (write("europe.csv", ";", ["Case ID", "Image", "Diagnosis", "Category"]), ";"),
                     (write("tabs.txt", "\t", ["id", "image", "diagnosis", "category"]), "\t")):
        with caplog.at_level(logging.WARNING, logger="dermcir"):
            caplog.clear()
            cases, report = load_case_csv(csv)
        assert [(c.case_id, c.image.name, c.diagnosis, c.category) for c in cases] == expected, csv.name
        assert report.skipped == [] and not caplog.records, (csv.name, caplog.text)
    (tmp_path / "twice.csv").write_text("ID,id,image,diagnosis\nA,A,images/img0.jpg,melanoma\n")
    with pytest.raises(ValueError, match=r"twice.csv: columns 'ID' and 'id' both name the 'id' column; keep one"):
        load_case_csv(tmp_path / "twice.csv")
    (tmp_path / "semi.csv").write_text("id;image;diagnosis;note\nA;images/img0.jpg;melanoma;1,5 mm;x\n")
    with pytest.raises(ValueError, match=r"semi.csv:2: 5 fields but the header has 4 .*a value holding a semicolon"):
        load_case_csv(tmp_path / "semi.csv")


def test_case_csv_contradictions_are_left_out_and_near_misses_named(tmp_path, caplog):
    """A melanoma filed as a nevus, and one image under two ids, were indexed without a word: a clinician would have
    seen a melanoma shown as a benign match, or one picture twice under two diagnoses."""
    csv = _clinic_csv(tmp_path, "id,image,diagnosis,category\n"
                                "A,img0.jpg,melanoma,nevus\n"       # contradicts the table: left out
                                "B,img1.jpg,melanoma,Melanocytic\n"  # the clinic's own category: kept
                                "C,img1.jpg,clark nevus,\n"          # B's image again: left out
                                "D,img2.jpg,Melanoma in situ,\n"     # no table entry: its own category, named
                                "d,img0.jpg,clark nevus,\n")         # differs from D by case only: kept, named
    with caplog.at_level(logging.WARNING, logger="dermcir"):
        cases, report = load_case_csv(csv)
    assert [(c.case_id, c.category) for c in cases] == [
        ("B", "melanocytic"), ("D", "melanoma in situ"), ("d", "nevus")]
    assert [what for what, _ in report.skipped] == [f"{csv}:2", f"{csv}:4"]
    assert "category 'nevus' contradicts its diagnosis 'melanoma' (a 'melanoma' in the category table)" in \
        report.skipped[0][1]
    assert f"its image {tmp_path / 'img1.jpg'} is already case 'B' (row {csv}:3)" in report.skipped[1][1]
    assert "'melanoma in situ' (did you mean 'melanoma (in situ)'?)" in caplog.text
    assert "differ only in letter case and are kept as separate cases: D / d" in caplog.text
