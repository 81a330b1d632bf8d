"""Case collections: the Derm7pt release loader and the generic ``id,image,diagnosis,...`` CSV loader.

Both produce :class:`Case` records and a :class:`LoadReport` that names every row or file left out and why; nothing
is dropped silently.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dermcir.data.categories import category_of
from dermcir.data.text import CHECKLIST_FIELDS, render_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One biopsy-confirmed case: an image, its diagnosis and its structured checklist fields."""

    case_id: str
    image: Path
    diagnosis: str
    category: str
    fields: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def text(self) -> str:
        """The meta-report used as query text (never contains the diagnosis)."""
        return render_report(self.fields)


@dataclass
class LoadReport:
    """What a loader kept and what it left out, with the reason for each."""

    n_rows: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row or file, reason)
    dropped_categories: dict[str, int] = field(default_factory=dict)  # category -> cases, below threshold

    def skip(self, what: str, reason: str) -> None:
        log.warning("skipping %s: %s", what, reason)
        self.skipped.append((what, reason))


def _fields_of(row: pd.Series) -> dict[str, str]:
    out = {}
    for key in CHECKLIST_FIELDS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
            continue
        out[key] = str(value).strip().lower()
    return out


def load_derm7pt(
    root: str | Path, min_cases: int = 50, categories: list[str] | None = None
) -> tuple[list[Case], LoadReport]:
    """Load an official-layout Derm7pt release (``meta/meta.csv`` + ``images/``).

    Args:
        root: the ``release_v0`` folder.
        min_cases: keep categories with at least this many usable cases (the protocol uses 50).
        categories: keep only these categories (after the threshold); ``None`` keeps all that pass.

    Returns:
        The cases, in meta-file order, and the report of what was left out (missing image files, unknown
        diagnoses, categories under the threshold).

    Raises:
        FileNotFoundError: ``root`` has no ``meta/meta.csv``.
        ValueError: the meta file lacks a required column.
    """
    root = Path(root)
    meta = root / "meta" / "meta.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not found; expected a Derm7pt release folder with meta/meta.csv and images/")
    table = pd.read_csv(meta, dtype=str, keep_default_na=False)
    missing = [c for c in ("case_num", "diagnosis", "derm") if c not in table.columns]
    if missing:
        raise ValueError(f"{meta}: missing column(s) {missing}; columns present: {list(table.columns)}")
    report = LoadReport(n_rows=len(table))
    cases = []
    for i, row in table.iterrows():
        what = f"{meta}:{i + 2} (case {row['case_num']})"
        try:
            category = category_of(row["diagnosis"])
        except ValueError as exc:
            report.skip(what, str(exc))
            continue
        image = root / "images" / row["derm"]
        if not row["derm"].strip():
            report.skip(what, "empty 'derm' image column")
            continue
        if not image.is_file():
            report.skip(str(image), f"image file missing (row {what})")
            continue
        cases.append(Case(row["case_num"], image, row["diagnosis"].strip().lower(), category, _fields_of(row)))
    return _apply_threshold(cases, report, min_cases, categories)


def load_case_csv(
    csv_path: str | Path, image_root: str | Path | None = None, min_cases: int = 1
) -> tuple[list[Case], LoadReport]:
    """Load a clinic's own archive: a CSV with columns ``id``, ``image``, ``diagnosis`` and optional checklist fields.

    ``image`` paths are relative to ``image_root`` (default: the CSV's folder). ``category`` may be given as a column;
    otherwise it is derived from the diagnosis through the category table, and rows whose diagnosis is unknown use
    the diagnosis itself as their category.
    """
    csv_path = Path(csv_path)
    base = Path(image_root) if image_root else csv_path.parent
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in ("id", "image", "diagnosis") if c not in table.columns]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; expected id,image,diagnosis[,category][,checklist]")
    report = LoadReport(n_rows=len(table))
    cases, seen = [], set()
    for i, row in table.iterrows():
        what = f"{csv_path}:{i + 2}"
        case_id = row["id"].strip()
        if not case_id:
            report.skip(what, "empty id")
            continue
        if case_id in seen:
            report.skip(what, f"duplicate id {case_id!r}")
            continue
        image = base / row["image"].strip()
        if not image.is_file():
            report.skip(str(image), f"image file missing (row {what})")
            continue
        diagnosis = row["diagnosis"].strip().lower()
        category = row.get("category", "").strip().lower() if "category" in table.columns else ""
        if not category:
            try:
                category = category_of(diagnosis)
            except ValueError:
                category = diagnosis
        seen.add(case_id)
        cases.append(Case(case_id, image, diagnosis, category, _fields_of(row)))
    return _apply_threshold(cases, report, min_cases, None)


def _apply_threshold(
    cases: list[Case], report: LoadReport, min_cases: int, categories: list[str] | None
) -> tuple[list[Case], LoadReport]:
    counts = Counter(c.category for c in cases)
    keep = {cat for cat, n in counts.items() if n >= min_cases}
    if categories is not None:
        unknown = set(categories) - set(counts)
        if unknown:
            raise ValueError(f"categories {sorted(unknown)} not present; present: {sorted(counts)}")
        keep &= set(categories)
    report.dropped_categories = {cat: n for cat, n in counts.items() if cat not in keep}
    if report.dropped_categories:
        log.info("categories left out (fewer than %d cases or not selected): %s", min_cases, report.dropped_categories)
    return [c for c in cases if c.category in keep], report


def category_counts(cases: list[Case]) -> dict[str, int]:
    """Number of cases per category, largest first."""
    return dict(Counter(c.category for c in cases).most_common())
