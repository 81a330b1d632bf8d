"""The comparison table and chart: paper rows, measured rows (main, variants, ablations), the easier-task section,
errors on bad inputs, and the ``dermcir compare`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dermcir.baselines import IMAGE_ONLY_DATABASE, METADATA_BOTH_SIDES
from dermcir.evaluation.compare import (
    EASIER_TASK_MARK,
    PAPER_ROWS,
    chart_series,
    load_results,
    mark_other_splits,
    measured_rows,
    run_labels,
    write_comparison,
)
from dermcir.evaluation.results import build_results, fold_row
from dermcir.files import write_json_atomic


def _rows(offset: float, n_folds: int = 3) -> list[dict]:
    """Fold rows from real score matrices, so the schema is exactly what the benchmark writes."""
    rng = np.random.default_rng(int(offset))
    q, db = np.array(["a", "b", "a", "b"]), np.array(["a", "a", "b", "b", "b"])
    return [fold_row(f, rng.normal(size=(4, 5)) + offset * (q[:, None] == db[None, :]), q, db) for f in range(n_folds)]


def _write_run(folder: Path, method: str, offset: float, **extra) -> Path:
    write_json_atomic(folder / "results.json", build_results(method, _rows(offset), **extra))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    easier = build_results("snf-dca:metadata-both-sides", _rows(5.0), display_name="SNF-DCA [metadata-both-sides]",
                           protocol=f"image + metadata query, {METADATA_BOTH_SIDES}")
    baseline = _write_run(tmp_path / "snf-dca", "snf-dca", 2.0, display_name="SNF-DCA (test)",
                          protocol=f"image + metadata query, {IMAGE_ONLY_DATABASE}", profile="cpu", device="cpu",
                          seconds=12.3, variants={"metadata-both-sides": easier})
    composed = _write_run(tmp_path / "composed", "composed", 3.0, profile="gpu",
                          ablations={"image-only": build_results("image-only", _rows(1.0))})
    return [composed, baseline]


def test_markdown_has_paper_rows_measured_rows_and_separates_the_easier_task(runs: list[Path], tmp_path: Path) -> None:
    md_path, png_path = write_comparison(runs, tmp_path / "out" / "comparison.md", title="Test comparison")
    md = md_path.read_text()
    assert md.startswith("# Test comparison")
    assert "| Table 1 | Proposed composed model (Swin-T + BERT, global-local) | 81.7 ± 2.7 | 79.3 ± 2.9 | 82.4 ± 3.6 | " \
           "87.3 ± 3.2 |" in md
    assert "| 80.4 ± 2.7 | 77.6 ± 3.5 | 80.9 ± 2.6 | 83.2 ± 1.9 |" in md
    assert "| Table 1 | DAHNET (Jiang et al. 2024) | n/a | n/a | n/a | n/a |" in md
    doc = load_results(runs[1])
    per_fold = " / ".join(f"{f['mAP']:.1f}" for f in doc["folds"])
    main_line = next(line for line in md.splitlines() if line.startswith("| SNF-DCA (test) |"))
    assert f"{doc['mean']['mAP']:.1f} ± {doc['std']['mAP']:.1f}" in main_line and per_fold in main_line
    assert "cpu profile on cpu, 12 s" in main_line
    assert "| composed [image-only] |" in md  # the composed model's ablations are rows too
    seed_part, easier_part = md.split("easier task, not comparable")
    assert "SNF-DCA [metadata-both-sides]" in easier_part and "SNF-DCA [metadata-both-sides]" not in seed_part
    assert f"]({png_path.name})" in md


def test_chart_is_a_png_beside_the_markdown(runs: list[Path], tmp_path: Path) -> None:
    import matplotlib.image

    md_path, png_path = write_comparison(runs, tmp_path / "comparison.md")
    assert png_path == md_path.with_suffix(".png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(png_path).shape
    assert width > 600 and height > 300


def test_measured_rows_flags_the_easier_protocol(runs: list[Path]) -> None:
    rows = measured_rows(load_results(runs[1]), "snf-dca")
    assert [r.seed_protocol for r in rows] == [True, False]
    assert [r.main for r in rows] == [True, False]
    assert EASIER_TASK_MARK in METADATA_BOTH_SIDES and EASIER_TASK_MARK not in IMAGE_ONLY_DATABASE


def test_a_partial_run_says_which_folds_it_averages(tmp_path: Path) -> None:
    partial = build_results("composed", _rows(3.0, n_folds=2), profile="cpu", n_folds=5, folds_run=[1, 2])
    full = build_results("composed", _rows(3.0, n_folds=5), profile="cpu", n_folds=5, folds_run=[0, 1, 2, 3, 4])
    assert measured_rows(partial, "one")[0].setting == "cpu profile, only folds 1, 2 of 5"
    assert measured_rows(full, "all")[0].setting == "cpu profile"
    # its means are over two folds' queries: another split, shown apart from (and not charted with) whole runs
    assert measured_rows(partial, "one")[0].split == "? cases, 5 folds, seed ?, folds 1, 2 only"
    assert measured_rows(full, "all")[0].split == "? cases, 5 folds, seed ?"
    rows = mark_other_splits(measured_rows(full, "all") + measured_rows(partial, "one"))
    assert [r.seed_protocol for r in rows] == [True, False]
    cut = build_results("composed", _rows(3.0, n_folds=1), profile="gpu", n_folds=5, folds_run=[0], complete=False)
    assert measured_rows(cut, "cut")[0].setting == "gpu profile, only folds 0 of 5 (the run had not ended)"


def test_only_the_two_known_paper_rows_have_numbers() -> None:
    known = [p.name for p in PAPER_ROWS if p.mean is not None]
    assert known == ["Proposed composed model (Swin-T + BERT, global-local)", "ResNet50-CosSim (Tschandl et al. 2019)"]


def test_bad_inputs_give_clear_errors(runs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no results.json"):
        write_comparison([tmp_path / "nowhere"], tmp_path / "c.md")
    with pytest.raises(ValueError, match="ending in .md"):
        write_comparison(runs, tmp_path / "c.txt")
    with pytest.raises(ValueError, match="no run folders"):
        write_comparison([], tmp_path / "c.md")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_results(tmp_path / "broken")
    (tmp_path / "broken" / "results.json").write_text(json.dumps({"folds": []}))
    with pytest.raises(ValueError, match=r"missing \['mean', 'std'\]"):
        load_results(tmp_path / "broken")



@pytest.mark.parametrize(("damage", "says"), [
    (lambda d: d["mean"].update(mAP=None), r"'mean' holds non-numbers \{'mAP': None\}"),
    (lambda d: d.update(std=5), r"'std' must map \['mAP', 'Acc@1', 'Acc@2', 'Acc@4'\] to numbers, got 5"),
    (lambda d: [f.pop("mAP") for f in d["folds"]], r"folds \[0, 1, 2\] lack a numeric 'mAP'"),
    (lambda d: d.update(folds={"0": 1}), r"'folds' must be a list of fold rows"),
])
def test_a_results_file_with_unreadable_values_is_named(tmp_path: Path, damage, says) -> None:
    """Parseable JSON whose values the table cannot read: before, a TypeError or KeyError traceback without the file."""
    doc = build_results("composed", _rows(3.0))
    damage(doc)
    (tmp_path / "results.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"{tmp_path / 'results.json'}: {says}"):
        load_results(tmp_path)


def test_a_results_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=f"{tmp_path / 'results.json'}: not valid JSON"):
        load_results(tmp_path)


def test_the_chart_tells_runs_of_one_method_apart(tmp_path: Path) -> None:
    cpu = _write_run(tmp_path / "cv_cpu", "dermcir-composed", 2.0, profile="cpu")
    gpu = _write_run(tmp_path / "cv_gpu", "dermcir-composed", 3.0, profile="gpu")
    other = _write_run(tmp_path / "snf", "snf-dca", 1.0)
    rows = [r for run in (cpu, gpu, other) for r in measured_rows(load_results(run), run.name)]
    labels = [label for label, _, _ in chart_series(rows)]
    assert labels[-3:] == ["dermcir-composed (cv_cpu)", "dermcir-composed (cv_gpu)", "snf-dca"]


def test_runs_whose_folder_names_collide_are_told_apart(tmp_path: Path) -> None:
    """Each run was named by the last part of its path: ``a/cv`` and ``b/cv`` had one name in the table and the
    chart, and every run given as its results.json (documented as allowed) was called "results.json"."""
    a = _write_run(tmp_path / "a" / "cv", "dermcir-composed", 2.0)
    b = _write_run(tmp_path / "b" / "cv", "dermcir-composed", 3.0)
    solo = _write_run(tmp_path / "solo", "snf-dca", 1.0)
    assert run_labels([a, b, solo / "results.json", a]) == ["a/cv", "b/cv", "solo", "a/cv"]
    md, _png = write_comparison([a / "results.json", b / "results.json", solo], tmp_path / "cmp.md")
    table = md.read_text()
    assert "| a/cv |" in table and "| b/cv |" in table and "| solo |" in table and "results.json |" not in table


def test_compare_command(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dermcir.cli import main

    out = tmp_path / "cmp" / "table.md"
    assert main(["compare", *map(str, runs), "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".png").is_file()
    assert str(out) in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_a_run_on_another_split_is_shown_apart_with_its_split(tmp_path: Path, caplog) -> None:
    """A run with another seed, fold count or set of cases sat among the protocol's rows, unmarked."""
    split = {"n_cases": 888, "n_folds": 3, "seed": 0}
    runs = [_write_run(tmp_path / "a", "composed", 3.0, **split),
            _write_run(tmp_path / "b", "snf-dca", 2.0, **split),
            _write_run(tmp_path / "c", "dahnet", 1.0, **{**split, "seed": 7})]
    with caplog.at_level("WARNING"):
        md_path, _ = write_comparison(runs, tmp_path / "comparison.md")
    seed_part, other_part = md_path.read_text().split("another split or set of cases than the rows above")
    assert "| composed |" in seed_part and "| snf-dca |" in seed_part and "| dahnet |" not in seed_part
    assert "| dahnet |" in other_part and "888 cases, 3 folds, seed 7" in other_part
    assert "888 cases, 3 folds, seed 0" in seed_part
    assert "c ran on 888 cases, 3 folds, seed 7, not on 888 cases, 3 folds, seed 0 as the other runs did" in caplog.text
    rows = mark_other_splits([r for run in runs for r in measured_rows(load_results(run), run.name)])
    assert [r.seed_protocol for r in rows] == [True, True, False]
