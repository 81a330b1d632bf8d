"""Case collections: the Derm7pt release loader and the generic ``id,image,diagnosis,...`` CSV loader.

Both produce :class:`Case` records and a :class:`LoadReport` that names every row or file left out and why, and every
checklist value left out of a kept case; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermcir.data.categories import DIAGNOSIS_TO_CATEGORY, category_of
from dermcir.data.text import CHECKLIST_FIELDS, checklist_key, render_report, validate_checklist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Case:
    """One biopsy-confirmed case: an image, its diagnosis and its structured checklist fields."""

    case_id: str
    image: Path
    diagnosis: str
    category: str
    fields: dict[str, str] = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        # Checked where a case is made, not where it is used: an index stores these values as they are, and a value it
        # cannot read back (an int id from a spreadsheet, a NaN checklist cell) would leave the whole index unloadable.
        if not isinstance(self.case_id, str) or not self.case_id.strip():
            raise (TypeError if not isinstance(self.case_id, str) else ValueError)(
                f"case_id must be a non-empty string, got {self.case_id!r} (image {self.image})"
            )
        for name in ("diagnosis", "category"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"case {self.case_id!r}: {name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.image, (str, os.PathLike)):
            raise TypeError(f"case {self.case_id!r}: image must be a path, got {type(self.image).__name__}")
        object.__setattr__(self, "image", Path(self.image))  # a str path is a common way to write one
        if not isinstance(self.fields, Mapping):
            raise TypeError(f"case {self.case_id!r}: fields must map checklist fields to values, got "
                            f"{type(self.fields).__name__}")
        for key, value in self.fields.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"case {self.case_id!r}: fields must map names to strings, got {key!r}: {value!r}")

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
    min_cases: int | None = None  # the threshold that decided ``dropped_categories``
    #: (``file:row``, reason) for each checklist value left out of a case that was kept: the case's text reads the
    #: field as not given. The reason names the case, the column, the value and the allowed values. These rows are
    #: not in ``skipped``, which lists only what was left out whole.
    fields_left_out: list[tuple[str, str]] = field(default_factory=list)

    def copy(self) -> LoadReport:
        """A copy that a run can add to (what preprocessing leaves out) and leave the caller's report as it was."""
        return LoadReport(n_rows=self.n_rows, skipped=list(self.skipped), dropped_categories=dict(self.dropped_categories),
                          min_cases=self.min_cases, fields_left_out=list(self.fields_left_out))

    def categories_left_out(self) -> dict[str, Any]:
        """What the category threshold left out, for a run's records: ``{"min_cases", "categories": {name: n}}``."""
        return {"min_cases": self.min_cases, "categories": dict(self.dropped_categories)}

    def apply_threshold_again(self, cases: list[Case], images: Any) -> tuple[list[Case], Any]:
        """The loader's category threshold (``min_cases``) once more, after preprocessing left unreadable images out:
        they can take a category under it, and the run must then leave the category out as the loader would have.

        ``images``: the cases' images, an array indexed by case. Returns the cases and images kept; the categories
        left out join ``dropped_categories``, with a warning.
        """
        if self.min_cases is None:
            return cases, images
        under = {cat: n for cat, n in Counter(c.category for c in cases).items() if n < self.min_cases}
        if not under:
            return cases, images  # no copy of the images (about 0.7 GB for the 888 cases at 512 px)
        log.warning("categories left out: fewer than %d usable cases once unreadable images were left out: %s",
                    self.min_cases, under)
        self.dropped_categories.update(under)
        rows = [i for i, c in enumerate(cases) if c.category not in under]
        return [cases[i] for i in rows], images[rows]

    def skip(self, what: str, reason: str) -> None:
        log.warning("skipping %s: %s", what, reason)
        self.skipped.append((what, reason))


_CASE_CSV = "a UTF-8 CSV with a header row: id, image, diagnosis[, category][, checklist fields]"
_META_CSV = "a UTF-8 CSV with a header row: case_num, diagnosis, derm, ... (the Derm7pt meta file)"

#: csv's field size limit is process-wide; loaders raise it to the file's length while they read, one at a time.
_FIELD_LIMIT_LOCK = threading.Lock()

_SEPARATOR_NAMES = {",": "comma", ";": "semicolon", "\t": "tab"}


def _read_rows(path: Path, expected: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the data rows of a CSV file, each row with the file line it starts on.

    Every field is a string, as written (an empty cell is ``""``). Blank lines, and rows whose cells are all blank
    (whitespace, or only commas as a spreadsheet exports an empty row), are passed over. A row shorter than the header
    is padded with empty cells; empty cells beyond the header (a trailing comma, as spreadsheets export it) are
    dropped. A cell may be as long as the file (csv's default limit of 131,072 characters is lifted while reading).
    Anything else that is not a plain CSV with a header row is a :class:`ValueError` that starts with the file's path
    and line and says what was expected; among them a quoted field that is never closed (which would otherwise take
    in every row after it) and text after a quoted field's closing quote.
    """
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode Text", and other UTF-16 exports
        raise ValueError(f"{path}: UTF-16 text; expected {expected} (in Excel: Save As, \"CSV UTF-8\")")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        byte, line = exc.object[exc.start], exc.object[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}, e.g. an accent saved as Latin-1 or Windows-1252); "
            f"expected {expected} (in Excel: Save As, \"CSV UTF-8\")"
        ) from None
    # strict: a quote left open is an error at the end of the file, not a field that swallows every later row
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, delimiter=_delimiter(path, text))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    line = 1
    with _FIELD_LIMIT_LOCK:
        limit = csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        try:
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not any(value.strip() for value in fields):  # a blank line, or a row of blank cells
                    continue
                if header is None:
                    header = [name.strip() for name in fields]
                    repeated = sorted({name for name in header if name and header.count(name) > 1})
                    if repeated:
                        raise ValueError(f"{path}:{start}: column(s) {repeated} appear more than once in the header")
                    continue
                extra = fields[len(header):]
                if any(value.strip() for value in extra):
                    raise ValueError(
                        f"{path}:{start}: {len(fields)} fields but the header has {len(header)} ({', '.join(header)}); "
                        f"a value holding a {_SEPARATOR_NAMES.get(reader.dialect.delimiter, 'separator')} must be quoted"
                    )
                fields = fields[: len(header)] + [""] * (len(header) - len(fields))
                rows.append((start, dict(zip(header, fields))))
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise ValueError(
                    f"{path}:{line}: a quoted field in the row that starts on this line is never closed (the file "
                    f"ends inside it); expected {expected}"
                ) from None
            if "expected after" in str(exc):
                raise ValueError(
                    f"{path}:{reader.line_num}: text after the closing quote of a quoted field (in the row that starts "
                    f"on line {line}); a quote inside a quoted value is written twice (\"\"); expected {expected}"
                ) from None
            raise ValueError(f"{path}:{reader.line_num}: {exc}; expected {expected}") from None
        finally:
            csv.field_size_limit(limit)
    if header is None:
        raise ValueError(f"{path}: empty file; expected {expected}")
    return header, rows


def _delimiter(path: Path, text: str) -> str:
    """The field separator: a comma, unless the header line holds none but holds semicolons or tabs.

    Excel writes ``;`` where the decimal separator is a comma (most of Europe), and "Text (Tab delimited)" writes
    tabs. Read with commas, such a header is one column, and the file is refused for columns it does have.
    """
    header = next((line for line in text.splitlines() if line.strip()), "")
    if "," in header:
        return ","
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        if sep in header:
            log.info("%s: read as separated by %s (its header line holds no comma)", path, name)
            return sep
    return ","


def _checklist_columns(path: Path, header: list[str]) -> dict[str, str]:
    """Checklist field -> the column that holds it, by the checklist's spelling rule (``Pigment Network`` is
    ``pigment_network``). Two columns naming one field are an error naming both."""
    columns: dict[str, str] = {}
    for name in header:
        key = checklist_key(name)
        if key not in CHECKLIST_FIELDS:
            continue
        if key in columns:
            raise ValueError(
                f"{path}: columns {columns[key]!r} and {name!r} both name the checklist field {key!r}; keep one"
            )
        columns[key] = name
    return columns


def _fields_of(row: dict[str, str], columns: dict[str, str]) -> dict[str, str]:
    """The Derm7pt meta row's checklist fields, as written (a newer release's values are kept: the text reads words)."""
    return {key: row[column].strip().lower() for key, column in columns.items() if row[column].strip()}


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
        ValueError: the meta file is not a UTF-8 CSV with a header row, a row has more fields than the header, or
            a required column is missing (the message starts with the file's path).
    """
    root = Path(root)
    meta = root / "meta" / "meta.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: not found; expected a Derm7pt release folder with meta/meta.csv and images/")
    header, table = _read_rows(meta, _META_CSV)
    missing = [c for c in ("case_num", "diagnosis", "derm") if c not in header]
    if missing:
        raise ValueError(f"{meta}: missing column(s) {missing}; columns present: {header}")
    checklist = _checklist_columns(meta, header)
    absent = [key for key in CHECKLIST_FIELDS if key not in checklist]
    if absent:  # the query texts are rendered from these columns: say which ones they will never mention
        log.warning("%s: no column for checklist field(s) %s; the query texts will not mention them%s", meta,
                    ", ".join(absent), "" if checklist else " (they will be empty)")
    report = LoadReport(n_rows=len(table))
    cases, seen = [], set()
    for line, row in table:
        case_id = row["case_num"].strip()
        what = f"{meta}:{line} (case {case_id})"
        # a case number names the case in search results and in an index, so it must be there and be unique
        if not case_id:
            report.skip(f"{meta}:{line}", "empty case_num")
            continue
        if case_id in seen:
            report.skip(what, f"duplicate case_num {case_id!r}")
            continue
        try:
            category = category_of(row["diagnosis"])
        except ValueError as exc:
            report.skip(what, str(exc))
            continue
        derm = row["derm"].strip()  # a stray space would name a file that is not there
        if not derm:
            report.skip(what, "empty 'derm' image column")
            continue
        image = root / "images" / derm
        if not image.is_file():
            report.skip(str(image), f"image file missing (row {what})")
            continue
        seen.add(case_id)  # only once kept: a row left out (a mistyped image) must not shut out its corrected row
        cases.append(Case(case_id, image, row["diagnosis"].strip().lower(), category, _fields_of(row, checklist)))
    return _apply_threshold(cases, report, min_cases, categories)


def load_case_csv(
    csv_path: str | Path, image_root: str | Path | None = None, min_cases: int = 1
) -> tuple[list[Case], LoadReport]:
    """Load a clinic's own archive: a CSV with columns ``id``, ``image``, ``diagnosis`` and optional checklist fields.

    ``image`` paths are relative to ``image_root`` (default: the CSV's folder). ``category`` may be given as a column;
    otherwise it is derived from the diagnosis through the category table, and rows whose diagnosis is unknown use
    the diagnosis itself as their category.

    Checklist columns are found by the checklist's spelling rule (:func:`~dermcir.data.text.checklist_key`:
    ``Pigment Network`` and ``pigment-network`` are ``pigment_network``); other columns are ignored, with a warning
    naming them. An empty checklist cell means "not given".

    The core columns are found whatever their case and spacing (``ID``, ``Image``, ``Case ID``); a file separated by
    semicolons or tabs (a European or "Tab delimited" Excel export) is read as such when its header holds no comma.
    A Windows path (``images\\case001.jpg``) finds its file. Line breaks and runs of spaces inside a diagnosis or
    category are read as one space.

    Rows that cannot be used are left out and named by ``file:row`` with the reason in the report's ``skipped``: an
    empty or repeated id, an empty diagnosis, an empty image column, a missing image file, an image already used by an
    earlier row, or a ``category`` that is one of the category table's and contradicts the table's category for a
    diagnosis it knows (a melanoma given as ``nevus``). A category of the clinic's own (``Melanocytic``) is kept as
    given. Diagnoses outside the category table, which become categories of their own, are named in one warning with
    the closest table entry; ids that differ only in letter case are named in another.

    A checklist value outside the field's allowed values (a typo such as ``irregluar``, free text in a ``Location``
    column) leaves that field out of the case, not the case: the case is kept and its text reads the field as not
    given, rather than saying something the clinic did not write. Each such field is listed in the report's
    ``fields_left_out`` as (``file:row``, reason naming the case, the column, the value and the allowed values), and
    one warning per column says how many and shows the first few. Values are compared in lower case with ``_`` read
    as a space; ``M`` and ``F`` in the ``sex`` column read as ``male`` and ``female``.

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: the file is not a UTF-8 CSV with a header row, a row has more (non-empty) fields than the header,
            a required column is missing, or two columns name the same checklist field (the message starts with
            the file's path).
    """
    csv_path = Path(csv_path)
    base = Path(image_root) if image_root else csv_path.parent
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: not found; expected {_CASE_CSV}")
    header, table = _read_rows(csv_path, _CASE_CSV)
    core = _core_columns(csv_path, header)
    missing = [c for c in ("id", "image", "diagnosis") if c not in core]
    if missing:
        raise ValueError(f"{csv_path}: missing column(s) {missing}; expected {_CASE_CSV}; columns present: {header}")
    checklist = _checklist_columns(csv_path, header)
    ignored = [name for name in header if name and name not in core.values() and name not in checklist.values()]
    if ignored:
        log.warning("%s: column(s) %s ignored: not id, image, diagnosis, category or a checklist field (%s)",
                    csv_path, ignored, ", ".join(CHECKLIST_FIELDS))
    report = LoadReport(n_rows=len(table))
    cases, seen = [], set()
    image_rows: dict[Path, tuple[str, str]] = {}  # a kept case's image -> (its id, its file:row)
    left_out: list[tuple[str, str, str, str, str]] = []  # (case id, file:row, column, value, reason)
    for line, row in table:
        row = {**row, **{key: row[column] for key, column in core.items()}}  # "Case ID" read as "id", and so on
        what = f"{csv_path}:{line}"
        case_id = row["id"].strip()
        if not case_id:
            report.skip(what, "empty id")
            continue
        if case_id in seen:
            report.skip(what, f"duplicate id {case_id!r}")
            continue
        # a line break or a double space inside a quoted cell would split the result tables' lines
        diagnosis = " ".join(row["diagnosis"].split()).lower()
        if not diagnosis:
            report.skip(what, "empty diagnosis")
            continue
        fields, bad = {}, []
        for key, column in checklist.items():
            value = row[column].strip()
            if not value:
                continue  # not given
            try:
                fields.update(validate_checklist({key: value}))
            except ValueError as exc:
                bad.append((column, value, f"case {case_id!r}: column {column!r}: {exc}"))
        if not row["image"].strip():
            report.skip(what, "empty image column")
            continue
        image = _image_path(base, row["image"].strip())
        if not image.is_file():
            report.skip(str(image), f"image file missing (row {what})")
            continue
        try:
            derived = category_of(diagnosis)
        except ValueError:
            derived = None
        category = " ".join(row.get("category", "").split()).lower()
        if category in _TABLE_CATEGORIES and derived is not None and category != derived:
            # a melanoma filed as a nevus would be shown to a clinician as a benign match
            report.skip(what, f"case {case_id!r}: category {category!r} contradicts its diagnosis {diagnosis!r} "
                              f"(a {derived!r} in the category table); correct one of them, or leave the category "
                              "empty to derive it from the diagnosis")
            continue
        if not category:
            category = derived or diagnosis
        resolved = image.resolve()
        same = image_rows.get(resolved)
        if same is not None:  # one picture twice would be returned twice, tied, possibly under two diagnoses
            report.skip(what, f"case {case_id!r}: its image {image} is already case {same[0]!r} (row {same[1]}); "
                              "one image is one case")
            continue
        image_rows[resolved] = (case_id, what)
        seen.add(case_id)
        cases.append(Case(case_id, image, diagnosis, category, fields))
        left_out.extend((case_id, what, column, value, reason) for column, value, reason in bad)
    _warn_unknown_diagnoses(csv_path, cases, "category" in core)
    _warn_ids_equal_but_for_case(csv_path, cases)
    cases, report = _apply_threshold(cases, report, min_cases, None)
    kept = {c.case_id for c in cases}
    left_out = [item for item in left_out if item[0] in kept]  # not the fields of a case under the threshold
    report.fields_left_out = [(what, f"{reason}; the case is kept without it") for _, what, _, _, reason in left_out]
    by_column: dict[str, list[tuple[str, str]]] = {}
    for _, what, column, value, _ in left_out:
        by_column.setdefault(column, []).append((what.rsplit(":", 1)[1], value))
    for column, found in by_column.items():
        allowed = CHECKLIST_FIELDS[checklist_key(column)][1]
        examples = ", ".join(f"row {row} {value!r}" for row, value in found[:5]) + (", ..." if len(found) > 5 else "")
        log.warning(
            "%s: column %r: %d value(s) outside the allowed values (%s) left out of their cases, which are kept "
            "without them: %s", csv_path, column, len(found), ", ".join(allowed), examples,
        )
    return cases, report


#: The categories of the category table: a clinic's own category names (``Melanocytic``) are its own business, but one
#: of these given against a diagnosis the table files elsewhere is a contradiction.
_TABLE_CATEGORIES = frozenset(DIAGNOSIS_TO_CATEGORY.values())

#: A clinic CSV's core columns, by the name the header gives after the checklist's spelling rule (``Case ID`` is
#: ``case_id``).
_CORE_NAMES = {"id": "id", "case_id": "id", "image": "image", "diagnosis": "diagnosis", "category": "category"}


def _core_columns(path: Path, header: list[str]) -> dict[str, str]:
    """id / image / diagnosis / category -> the column that holds it, whatever its case and spacing (``ID``,
    ``Image``, ``Case ID``). Two columns naming one of them are an error naming both."""
    columns: dict[str, str] = {}
    for name in header:
        key = _CORE_NAMES.get(checklist_key(name))
        if key is None:
            continue
        if key in columns:
            raise ValueError(f"{path}: columns {columns[key]!r} and {name!r} both name the {key!r} column; keep one")
        columns[key] = name
    return columns


def _image_path(base: Path, cell: str) -> Path:
    """The image a CSV cell names; a Windows path (``images\\case001.jpg``) is read with ``/`` where ``\\`` is no
    separator, so an archive exported on Windows finds its files."""
    image = base / cell
    if "\\" in cell and os.sep == "/" and not image.is_file():
        image = base / cell.replace("\\", "/")
    return image


def _warn_unknown_diagnoses(path: Path, cases: list[Case], has_category: bool) -> None:
    """One warning for the diagnoses outside the category table that became categories of their own (a
    near-miss such as ``Melanoma in situ`` is no melanoma to the benchmark), with the closest table entry."""
    unknown = sorted({c.diagnosis for c in cases if c.category == c.diagnosis and c.diagnosis not in DIAGNOSIS_TO_CATEGORY})
    if not unknown:
        return
    described = []
    for diagnosis in unknown[:10]:
        close = difflib.get_close_matches(diagnosis, list(DIAGNOSIS_TO_CATEGORY), n=1, cutoff=0.6)
        described.append(f"{diagnosis!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    log.warning(
        "%s: %d diagnosis/diagnoses not in the category table became categories of their own: %s%s; %s", path,
        len(unknown), ", ".join(described), ", ..." if len(unknown) > 10 else "",
        "give their category in the 'category' column" if has_category
        else "add a 'category' column to group them (e.g. 'melanoma')",
    )


def _warn_ids_equal_but_for_case(path: Path, cases: list[Case]) -> None:
    """Ids that differ only in letter case (``C001`` and ``c001``) are kept as two cases, but said: usually one case
    entered twice."""
    by_folded: dict[str, list[str]] = {}
    for case in cases:
        by_folded.setdefault(case.case_id.casefold(), []).append(case.case_id)
    pairs = [ids for ids in by_folded.values() if len(ids) > 1]
    if pairs:
        log.warning("%s: %d group(s) of ids differ only in letter case and are kept as separate cases: %s%s", path,
                    len(pairs), "; ".join(" / ".join(ids) for ids in pairs[:5]), ", ..." if len(pairs) > 5 else "")


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
    report.min_cases = min_cases
    if report.dropped_categories:
        log.info("categories left out (fewer than %d cases or not selected): %s", min_cases, report.dropped_categories)
    return [c for c in cases if c.category in keep], report


def category_counts(cases: list[Case]) -> dict[str, int]:
    """Number of cases per category, largest first."""
    return dict(Counter(c.category for c in cases).most_common())


def require_query_texts(cases: Sequence[Case]) -> None:
    """Refuse cases without a query text, naming them: training reads every case's text (its composed query).

    A case whose checklist fields are all empty has none (``render_report`` gives ``""``). Indexing needs no text, so
    such cases can still be indexed and found; only a training or benchmark run refuses them, before any image is read.
    """
    empty = [c.case_id for c in cases if not c.text.strip()]
    if empty:
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        raise ValueError(
            f"{len(empty)} of {len(cases)} cases have no query text (none of their checklist fields is given): "
            f"{', '.join(empty[:10])}{more}; training reads a text for every case: fill in their checklist fields, "
            "or leave them out of the training data (they can still be indexed and searched)"
        )
