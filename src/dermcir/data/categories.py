"""The one table that maps Derm7pt's fine-grained diagnoses to the retrieval categories.

Derm7pt labels each case with a fine-grained diagnosis string (``clark nevus``, ``melanoma (in situ)``, ...). The
retrieval protocol compares *categories*; every mapping decision lives here and nowhere else.

| category                 | diagnoses                                                                                   |
| ------------------------ | ------------------------------------------------------------------------------------------- |
| nevus                    | blue, clark, combined, congenital, dermal, recurrent, reed or spitz nevus                   |
| melanoma                 | melanoma, melanoma (in situ), (less than 0.76 mm), (0.76 to 1.5 mm), (more than 1.5 mm),    |
|                          | melanoma metastasis                                                                         |
| benign keratosis-like    | seborrheic keratosis, melanosis                                                             |
| basal cell carcinoma     | basal cell carcinoma                                                                        |
| dermatofibroma           | dermatofibroma                                                                              |
| lentigo                  | lentigo                                                                                     |
| vascular lesion          | vascular lesion                                                                             |
| miscellaneous            | miscellaneous                                                                               |

The last five only occur in the full 1,011-case release and fall below the ≥ 50-case threshold of the protocol.
"""

from __future__ import annotations

NEVUS = "nevus"
MELANOMA = "melanoma"
BENIGN_KERATOSIS = "benign keratosis-like"

DIAGNOSIS_TO_CATEGORY: dict[str, str] = {
    "blue nevus": NEVUS,
    "clark nevus": NEVUS,
    "combined nevus": NEVUS,
    "congenital nevus": NEVUS,
    "dermal nevus": NEVUS,
    "recurrent nevus": NEVUS,
    "reed or spitz nevus": NEVUS,
    "melanoma": MELANOMA,
    "melanoma (in situ)": MELANOMA,
    "melanoma (less than 0.76 mm)": MELANOMA,
    "melanoma (0.76 to 1.5 mm)": MELANOMA,
    "melanoma (more than 1.5 mm)": MELANOMA,
    "melanoma metastasis": MELANOMA,
    "seborrheic keratosis": BENIGN_KERATOSIS,
    "melanosis": BENIGN_KERATOSIS,
    "basal cell carcinoma": "basal cell carcinoma",
    "dermatofibroma": "dermatofibroma",
    "lentigo": "lentigo",
    "vascular lesion": "vascular lesion",
    "miscellaneous": "miscellaneous",
}


def category_of(diagnosis: str) -> str:
    """Category of a fine-grained diagnosis; unknown diagnoses raise with the list of known ones."""
    key = diagnosis.strip().lower()
    try:
        return DIAGNOSIS_TO_CATEGORY[key]
    except KeyError:
        known = ", ".join(sorted(DIAGNOSIS_TO_CATEGORY))
        raise ValueError(f"unknown diagnosis {diagnosis!r}; known diagnoses: {known}") from None
