"""The query text: a meta-report rendered from a case's structured checklist fields.

The template only reads the fields in :data:`CHECKLIST_FIELDS`. Diagnosis, management, diagnostic difficulty and the
seven-point score are never read, so the text cannot leak the answer (``tests/test_text.py`` checks every shared row).
The template is versioned: a checkpoint records :data:`TEMPLATE_VERSION` and refuses a mismatching one.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping

TEMPLATE_VERSION = "meta-report-v1"

#: field -> (phrase used in the report, allowed values). Values follow the Derm7pt release's spelling.
CHECKLIST_FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pigment_network": ("pigment network", ("absent", "typical", "atypical")),
    "streaks": ("streaks", ("absent", "regular", "irregular")),
    "pigmentation": (
        "pigmentation",
        ("absent", "diffuse regular", "diffuse irregular", "localized regular", "localized irregular"),
    ),
    "regression_structures": ("regression structures", ("absent", "blue areas", "white areas", "combinations")),
    "dots_and_globules": ("dots and globules", ("absent", "regular", "irregular")),
    "blue_whitish_veil": ("blue-whitish veil", ("absent", "present")),
    "vascular_structures": (
        "vascular structures",
        ("absent", "arborizing", "comma", "hairpin", "within regression", "wreath", "dotted", "linear irregular"),
    ),
    "elevation": ("elevation", ("flat", "palpable", "nodular")),
    "location": (
        "location",
        (
            "abdomen", "acral", "back", "buttocks", "chest", "genital areas", "head neck", "lower limbs",
            "upper limbs",
        ),
    ),
    "sex": ("sex", ("female", "male")),
}

#: Fields that must never reach the text (they are, or give away, the answer).
FORBIDDEN_FIELDS = ("diagnosis", "management", "level_of_diagnostic_difficulty", "seven_point_score")

_SEVEN_POINT = tuple(list(CHECKLIST_FIELDS)[:7])


#: Common spellings of a checklist value that mean one allowed value and nothing else: field -> {spelling: value}.
#: Read wherever a checklist is given (an archive's CSV, ``--checklist``, the HTTP form).
VALUE_SPELLINGS = {"sex": {"m": "male", "f": "female"}}


def has_visible(text: str) -> bool:
    """Whether ``text`` holds a character other than spaces, controls and invisible format characters (U+200B)."""
    return any(unicodedata.category(ch)[0] not in "CZ" for ch in text)


def checklist_key(name: str) -> str:
    """A user-given field name as the checklist spells it ("Pigment-Network" → "pigment_network")."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def validate_checklist(fields: Mapping[str, str]) -> dict[str, str]:
    """Normalise user-given checklist fields, rejecting unknown names and values.

    A blank value (``""``, spaces, ``None``) means "not given", as an empty CSV cell or the page's "(not given)" does:
    the field is left out, though its name is still checked. (The HTTP form dropped such fields while the CLI and
    Python refused them as an "unknown value ''".)

    Raises:
        ValueError: naming the field or value and listing what is allowed.
        TypeError: not a mapping, or a field name that is not a string.
    """
    if not isinstance(fields, Mapping):
        raise TypeError(f"checklist must map field names to values, got {type(fields).__name__}")
    clean: dict[str, str] = {}
    spelled: dict[str, str] = {}  # key -> the name it was given as
    for name, value in fields.items():
        if not isinstance(name, str):
            raise TypeError(f"checklist field names are strings, got {name!r}")
        key = checklist_key(name)
        if key not in CHECKLIST_FIELDS:
            raise ValueError(f"unknown checklist field {name!r}; allowed fields: {', '.join(CHECKLIST_FIELDS)}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # not given: so no second value either (an empty "Streaks" beside "streaks=regular")
        if key in spelled:  # "Streaks" and "streaks": which one the clinician meant is not ours to guess
            raise ValueError(f"checklist field {key!r} is given twice ({spelled[key]!r} and {name!r}); give it once")
        spelled[key] = name
        allowed = CHECKLIST_FIELDS[key][1]
        val = str(value).strip().lower().replace("_", " ")
        val = VALUE_SPELLINGS.get(key, {}).get(val, val)
        if val not in allowed:
            raise ValueError(f"unknown value {value!r} for checklist field {key!r}; allowed values: {', '.join(allowed)}")
        clean[key] = val
    return clean


def render_report(fields: Mapping[str, str | None]) -> str:
    """Render the meta-report for one case.

    Fields that are missing or empty are left out rather than guessed. Values outside the known vocabulary (a newer
    release) are rendered as they are: the text encoder reads words, not ids.

    Example:
        >>> render_report({"pigment_network": "atypical", "blue_whitish_veil": "present", "sex": "male"})
        'Dermoscopy: pigment network atypical; blue-whitish veil present. Patient: male.'
    """
    findings, patient = [], []
    for key, (phrase, _allowed) in CHECKLIST_FIELDS.items():
        value = fields.get(key)
        if value is None or (isinstance(value, float)) or not str(value).strip():
            continue
        part = f"{phrase} {str(value).strip().lower()}"
        if key in _SEVEN_POINT:
            findings.append(part)
        elif key == "sex":
            patient.append(str(value).strip().lower())
        else:
            patient.append(part)
    text = []
    if findings:
        text.append("Dermoscopy: " + "; ".join(findings) + ".")
    if patient:
        text.append("Patient: " + ", ".join(patient) + ".")
    return " ".join(text)
