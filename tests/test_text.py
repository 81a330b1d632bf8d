import csv

import pytest

from dermcir.data import load_derm7pt
from dermcir.data.categories import DIAGNOSIS_TO_CATEGORY
from dermcir.data.text import CHECKLIST_FIELDS, render_report, validate_checklist

from .conftest import SHARED_DERM7PT


def test_template_reads_only_checklist_fields():
    fields = {k: v[1][-1] for k, v in CHECKLIST_FIELDS.items()}
    text = render_report({**fields, "diagnosis": "melanoma", "management": "excision", "seven_point_score": "9",
                          "level_of_diagnostic_difficulty": "high"})
    assert "melanoma" not in text and "excision" not in text and "9" not in text and "high" not in text
    assert "blue-whitish veil present" in text and "location upper limbs" in text


def test_missing_fields_are_left_out_not_guessed():
    assert render_report({"streaks": "irregular"}) == "Dermoscopy: streaks irregular."
    assert render_report({"streaks": "", "sex": None}) == ""


@pytest.mark.integration
@pytest.mark.skipif(not SHARED_DERM7PT.is_dir(), reason="shared Derm7pt copy not present")
def test_no_text_of_the_shared_data_leaks_the_answer():
    cases, _ = load_derm7pt(SHARED_DERM7PT)
    with open(SHARED_DERM7PT / "meta" / "meta.csv", newline="", encoding="utf-8-sig") as fh:
        meta = {row["case_num"].strip(): row for row in csv.DictReader(fh)}
    leaking_words = set(DIAGNOSIS_TO_CATEGORY) | {"melanoma", "nevus", "keratosis", "melanosis", "excision",
                                                  "follow up", "no further examination", "difficulty", "score"}
    assert len(cases) == 888
    for case in cases:
        text = case.text.lower()
        row = meta[case.case_id]
        assert row["diagnosis"] not in text, case.case_id
        assert row["management"] not in text, case.case_id
        assert f"difficulty {row['level_of_diagnostic_difficulty']}" not in text
        assert not any(ch.isdigit() for ch in text), (case.case_id, text)  # the score is a number; no numbers at all
        assert not any(w in text for w in leaking_words), (case.case_id, text)


def test_validate_checklist_rejects_unknown_names_and_values():
    assert validate_checklist({"Blue-Whitish Veil": "Present"}) == {"blue_whitish_veil": "present"}
    with pytest.raises(ValueError, match="unknown checklist field 'colour'.*allowed fields: pigment_network"):
        validate_checklist({"colour": "brown"})
    with pytest.raises(ValueError, match="unknown value 'sometimes' for checklist field 'streaks'.*absent, regular"):
        validate_checklist({"streaks": "sometimes"})


def test_a_checklist_field_given_twice_in_two_spellings_is_refused_not_resolved():
    with pytest.raises(ValueError, match=r"checklist field 'streaks' is given twice \('Streaks' and 'streaks'\)"):
        validate_checklist({"Streaks": "absent", "streaks": "irregular"})
    with pytest.raises(ValueError, match="given twice"):  # even when both say the same
        validate_checklist({"blue-whitish veil": "present", "Blue_Whitish_Veil": "present"})


def test_sex_reads_m_and_f_wherever_a_checklist_is_given():
    """The archive CSV read M/F, but `--checklist sex=M` and the HTTP form refused it."""
    assert validate_checklist({"sex": "M"}) == {"sex": "male"}
    assert validate_checklist({"Sex": " f "}) == {"sex": "female"}
    with pytest.raises(ValueError, match="unknown value 'x' for checklist field 'sex'"):
        validate_checklist({"sex": "x"})
