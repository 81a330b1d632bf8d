"""Data: case loaders, the category table, the query-text template, image preprocessing, caches and splits."""

from dermcir.data.cases import Case, LoadReport, category_counts, load_case_csv, load_derm7pt
from dermcir.data.categories import DIAGNOSIS_TO_CATEGORY, category_of
from dermcir.data.images import ImageError, load_rgb, preprocess, remove_black_border
from dermcir.data.text import CHECKLIST_FIELDS, TEMPLATE_VERSION, render_report, validate_checklist

__all__ = [
    "CHECKLIST_FIELDS", "DIAGNOSIS_TO_CATEGORY", "TEMPLATE_VERSION", "Case", "ImageError", "LoadReport",
    "category_counts", "category_of", "load_case_csv", "load_derm7pt", "load_rgb", "preprocess",
    "remove_black_border", "render_report", "validate_checklist",
]
