"""deepmedix.data.text: sections, normalisation, PHI scrubbing, duplicate keys."""

from __future__ import annotations

import pytest

from deepmedix.data.text import clean_report_text, dedupe_key, normalize, scrub_phi, sections

# ---------------------------------------------------------------------------------------------------- PHI

# (input, the PHI that must be gone, the text around it that must stay)
PHI = [
    # dates
    ("Compared to the study of 01/02/2003.", "01/02/2003", "Compared to the study of ___."),
    ("Prior from 1/2/03 shows the same.", "1/2/03", "Prior from ___ shows the same."),
    ("Exam date 2003-01-02, portable.", "2003-01-02", "Exam date ___, portable."),
    ("Seen on 2003/1/2 as well.", "2003/1/2", "Seen on ___ as well."),
    ("Compared with 12-31-2019 radiograph.", "12-31-2019", "Compared with ___ radiograph."),
    ("Dated 02.01.2003 outside film.", "02.01.2003", "Dated ___ outside film."),
    ("Since Jan 2, 2003 unchanged.", "Jan 2, 2003", "Since ___ unchanged."),
    ("Since January 2nd 2003 unchanged.", "January 2nd 2003", "Since ___ unchanged."),
    ("Prior on 2 January 2003.", "2 January 2003", "Prior on ___."),
    ("Prior on the 2nd of Jan.", "2nd of Jan", "Prior on the ___."),
    ("Outside film 02-Jan-2003.", "02-Jan-2003", "Outside film ___."),
    ("Compared to Sept. 14.", "Sept. 14", "Compared to ___."),
    ("Stable since March 2003.", "March 2003", "Stable since ___."),
    ("COMPARISON: DEC 5, 2011.", "DEC 5, 2011", "COMPARISON: ___."),
    ("Mild pulmonary edema, improved from 12/14.", "12/14", "improved from ___."),
    ("COMPARISON: 3/12", "3/12", "COMPARISON: ___"),
    # times
    ("Called at 10:45 am to the floor.", "10:45", "Called at ___ to the floor."),
    ("Discussed at 9:15 a.m. by telephone.", "9:15", "Discussed at ___ by telephone."),
    ("Time of exam 23:05:10.", "23:05:10", "Time of exam ___."),
    ("Notified at 10 PM.", "10 PM", "Notified at ___."),
    ("Paged at 1045 hours.", "1045 hours", "Paged at ___."),
    # phones, e-mail, URLs
    ("Please call (617) 555-1234 with questions.", "555-1234", "Please call ___ with questions."),
    ("Reading room 617-555-1234.", "617-555-1234", "Reading room ___."),
    ("Reading room 617.555.1234.", "617.555.1234", "Reading room ___."),
    ("Call +1 617 555 1234 now.", "617 555 1234", "Call ___ now."),
    ("Call 555-1234 now.", "555-1234", "Call ___ now."),
    ("Fax: 617 555 9876.", "9876", "Fax: ___."),
    ("Pager #34567 for the fellow.", "34567", "Pager #___ for the fellow."),
    ("ext. 4421 for questions", "4421", "ext. ___ for questions"),
    ("Email jane.doe@hospital.org for images.", "jane.doe@hospital.org", "Email ___ for images."),
    ("See https://pacs.example.org/study?id=5 for images.", "pacs.example", "See ___ for images."),
    ("See www.example.com/report.", "www.example.com", "See ___"),
    # identifiers
    ("MRN: 1234567", "1234567", "MRN: ___"),
    ("Accession #12345678 received.", "12345678", "Accession #___ received."),
    ("SSN 123-45-6789 on file.", "123-45-6789", "SSN ___ on file."),
    ("Patient ID A1234567.", "A1234567", "Patient ID ___."),
    ("Medical record number 0012345.", "0012345", "Medical record number ___."),
    ("Unit No: 88-1234.", "88-1234", "Unit No: ___."),
    ("Order # 445566 placed.", "445566", "Order # ___ placed."),
    ("Reference 98765432 on the requisition.", "98765432", "Reference ___ on the requisition."),
    ("Social security 123-45-6789.", "123-45-6789", "Social security ___."),
    # names after titles
    ("Findings discussed with Dr. Smith.", "Smith", "Findings discussed with Dr. ___."),
    ("Findings discussed with Dr. John A. Smith at bedside.", "John", "Findings discussed with Dr. ___ at bedside."),
    ("DISCUSSED WITH DR. SMITH AT BEDSIDE.", "SMITH", "DISCUSSED WITH DR. ___ AT BEDSIDE."),
    ("DISCUSSED WITH DR SMITH AT BEDSIDE.", "SMITH", "DISCUSSED WITH DR ___ AT BEDSIDE."),
    ("Reviewed with Dr Jones today.", "Jones", "Reviewed with Dr ___ today."),
    ("Results given to Doctor Patel.", "Patel", "Results given to Doctor ___."),
    ("Mr. Jones was positioned.", "Jones", "Mr. ___ was positioned."),
    ("Mrs. O'Brien-Jones's prior film.", "Brien", "Mrs. ___'s prior film."),
    ("Ms. Lee tolerated the exam.", "Lee", "Ms. ___ tolerated the exam."),
    ("Miss Garcia, the patient.", "Garcia", "Miss ___, the patient."),
    ("Per Prof. van Gogh-Smith and Dr. McDonald.", "McDonald", "Per Prof. ___ and Dr. ___."),
    ("Dr. de la Cruz called back.", "Cruz", "Dr. ___ called back."),
    ("Signed: John Smith, MD", "John Smith", "Signed: ___, MD"),
    ("Read by Jane Q. Public, M.D.", "Jane", "Read by ___, M.D."),
    # names after hand-off phrases
    ("Findings discussed with Jane Smith by telephone.", "Jane Smith", "Findings discussed with ___ by telephone."),
    ("Paged Smith at 4 pm.", "Smith", "Paged ___ at ___."),
    ("Results were communicated to Alex Brown.", "Alex Brown", "Results were communicated to ___."),
    ("Findings discussed with the ED attending Jane Smith.", "Jane", "discussed with the ED attending ___."),
    ("d/w Patel", "Patel", "d/w ___"),
    # ages over 89
    ("92-year-old man with cough.", "92", "___-year-old man with cough."),
    ("History: 95 year old woman.", "95", "History: ___ year old woman."),
    ("A 91 yo female.", "91", "A ___ yo female."),
    ("A 101 y/o female.", "101", "A ___ y/o female."),
    ("Patient aged 97 with dyspnea.", "97", "Patient aged ___ with dyspnea."),
    ("AGE: 93", "93", "AGE: ___"),
    # long digit runs
    ("Study 8812345 reviewed.", "8812345", "Study ___ reviewed."),
    ("Ref 123456 for comparison.", "123456", "Ref ___ for comparison."),
]


@pytest.mark.parametrize("text,phi,want", PHI, ids=[p[0][:40] for p in PHI])
def test_phi_is_scrubbed(text, phi, want):
    out = scrub_phi(text)
    assert phi not in out, out
    assert want in out, out
    assert "___" in out


def test_there_are_many_phi_cases():
    assert len(PHI) >= 30


# clinical text that must come back unchanged
CLINICAL = [
    "IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: There is a 3.2 cm nodule in the left lower lobe.",
    "5 mm nodule in the right upper lobe.",
    "Compression deformity of T12 is unchanged.",
    "Degenerative changes at C5-6 and C6-7.",
    "Mass measures 10 x 12 mm.",
    "Mass measures 2.5 x 3.1 x 4.0 cm.",
    "PA and lateral views of the chest.",
    "2 views of the chest were obtained.",
    "ET tube 4 cm above the carina.",
    "The endotracheal tube terminates 4.5 cm above the carina.",
    "Lung volumes are 20% lower than before.",
    "Oxygen saturation 95% on room air.",
    "Heart size is top normal. ___ year old man.",
    "Discussed with Dr. ___ at ___ on ___.",
    "The right PICC terminates in the mid SVC.",
    "Left lower lobe opacity may represent atelectasis.",
    "May represent pneumonia in the appropriate clinical setting.",
    "NG tube tip in the stomach, side port at the GE junction.",
    "Levels T4-T5 show mild wedging.",
    "Right IJ central venous catheter ends at the cavoatrial junction.",
    "Moderate cardiomegaly, unchanged since 2012.",
    "Small bilateral effusions, left greater than right.",
    "Sternotomy wires 1-7 are intact.",
    "No pneumothorax. Findings discussed with the referring physician.",
    "Findings discussed with the Emergency Department by telephone.",
    "Findings were communicated to the ICU team.",
    "Portable AP chest radiograph at 45 degrees.",
    "Heart size is normal. Mediastinal contours are normal.",
    "DR CHEST PA AND LATERAL",
    "History of MS. Heart size is normal.",
    "Severe MR. Mild cardiomegaly.",
    "Chest tube with side hole 2 cm lateral to the rib margin.",
    "Status post CABG with 7 intact sternal wires.",
    "Findings: heart size normal 10/20 (ratio)?",
    "3/4 of the left lung is collapsed.",
    "Stable since the 2 prior exams.",
    "Patient is 45 years old.",
    "An 89-year-old woman.",
    "Lung markings extend to the apex over 3 to 4 cm.",
    "A 14 Fr pigtail catheter in the right base.",
    "Xray Chest PA and Lateral XXXX.",
    "Heart size normal. XXXX is seen in the right base.",
    "Cardiothoracic ratio 0.55.",
    "Dense 5x5 mm calcified granuloma.",
    "Unchanged from prior radiograph dated ___.",
    "WET READ: ___ ___ ___ Bibasilar opacities.",
    "The patient was informed of the findings.",
    "Called to the bedside for evaluation.",
    "Doctor was notified of the findings.",
    "Motor strength 5/5.",
    "Findings discussed with de novo lesions in mind.",
    "Called Back for additional views.",
    "Informed Consent was obtained.",
    "Reviewed with Radiology Attending.",
    "There is a 1.8 x 1.5 cm nodular opacity projecting over the right 4th anterior rib.",
    "Multiple old rib fractures on the left, 5th through 8th ribs.",
    "Kyphoplasty at L1 and T11-12.",
    "PICC 48 cm in length.",
    "Recommend CT chest in 3-6 months.",
    "Follow-up CT in 3 months recommended per Fleischner Society guidelines.",
    "The findings were discussed with ___, M.D. by ___, M.D. on the telephone on ___.",
]


@pytest.mark.parametrize("text", CLINICAL, ids=[c[:40] for c in CLINICAL])
def test_clinical_text_survives(text):
    assert scrub_phi(text) == text


def test_there_are_many_clinical_cases():
    assert len(CLINICAL) >= 30


def test_scrub_is_idempotent_and_keeps_marks():
    texts = [t for t, _, _ in PHI] + CLINICAL
    for t in texts:
        once = scrub_phi(t)
        assert scrub_phi(once) == once
    assert scrub_phi("___") == "___"
    assert scrub_phi("") == ""


def test_full_report_scrub():
    report = ("FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n\n INDICATION: 92-year-old woman with cough.\n\n"
              " COMPARISON: 01/02/2003.\n\n FINDINGS:\n\n A 3.2 cm nodule in the left lower lobe. ET tube 4 cm above"
              " the carina.\n\n IMPRESSION:\n\n Nodule. Findings discussed with Dr. John Smith at 10:45 am on"
              " Jan 3, 2003 by telephone (pager 12345).\n")
    out = clean_report_text(report)
    for phi in ("92", "01/02/2003", "John", "Smith", "10:45", "Jan 3", "2003", "12345"):
        assert phi not in out
    for keep in ("3.2 cm nodule in the left lower lobe", "ET tube 4 cm above the carina", "IMPRESSION:",
                 "FINDINGS:", "CHEST (PA AND LAT)", "Dr. ___"):
        assert keep in out
    assert "\n" not in out


def test_clean_report_text_normalizes_then_scrubs():
    assert clean_report_text("  Seen by\nDr.   Smith \r\n on 1/2/03 ") == "Seen by Dr. ___ on ___"
    assert clean_report_text("") == ""
    assert clean_report_text(None) == ""  # type: ignore[arg-type]


def _hostile(k: int = 1) -> list[tuple[str, str]]:
    """Inputs a backtracking pattern could blow up on (long runs of what a rule starts on), ``k`` times the base
    size, each with what scrubbing must make of it."""
    mrn, dr = "MRN " + " " * 5000 * k + "x", "Dr. " + "A " * 5000 * k
    return [(mrn, mrn),                                     # no digit after the label: not an identifier
            (dr, dr),                                       # one-letter "initials" and no name: not a name
            ("1" * 10000 * k, "___"),                       # one long digit run
            ("pager " + "1 " * 2000 * k + "x", "pager ___ x")]  # the whole number after the label


def test_pathological_input_is_scrubbed_right():
    for text, want in _hostile():
        assert scrub_phi(text) == want, text[:40]


def test_pathological_input_does_not_hang():
    """No catastrophic backtracking: 20 times the inputs above, in a child process that linear scanning finishes
    in about a second. The 60 s limit is a hang detector, not a speed target: a pattern that backtracks
    exponentially, or quadratically over these 100-200k-character runs, takes minutes or never ends."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_text import _hostile; "
            "from deepmedix.data.text import scrub_phi; "
            "bad = [t[:40] for t, want in _hostile(20) if scrub_phi(t) != want]; print(bad); sys.exit(bool(bad))")
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("scrub_phi did not finish the hostile inputs (20x) in 60 s: catastrophic backtracking")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- sections

MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax is seen.  The cardiac and mediastinal silhouettes are
 unremarkable.

 IMPRESSION:

 No acute cardiopulmonary process.
"""

MIMIC_WET = """WET READ: ___ ___ ___ 10:45 AM
  No acute process.
 ______________________________________________________________________________
                                 FINAL REPORT
 HISTORY:  Shortness of breath.

 FINDINGS:  Mild cardiomegaly.
 Small left effusion.

 IMPRESSION:  Small left effusion.
"""

IU = """COMPARISON: None.
INDICATION: Positive TB test
FINDINGS: The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.
IMPRESSION: Normal chest x-XXXX.
"""


def test_sections_mimic():
    s = sections(MIMIC)
    assert s["FINDINGS"] == ("The lungs are clear without focal consolidation. No pleural effusion or pneumothorax "
                             "is seen. The cardiac and mediastinal silhouettes are unremarkable.")
    assert s["IMPRESSION"] == "No acute cardiopulmonary process."
    assert s["EXAMINATION"] == "CHEST (PA AND LAT)"
    assert s["COMPARISON"] == "___"
    assert s["INDICATION"] == "___ year old woman with cough // eval for pneumonia"
    assert "FINAL REPORT" not in s


def test_sections_mimic_wet_read():
    s = sections(MIMIC_WET)
    assert s["WET READ"].startswith("___ ___ ___ 10:45 AM No acute process.")
    assert s["FINDINGS"] == "Mild cardiomegaly. Small left effusion."
    assert s["IMPRESSION"] == "Small left effusion."
    assert s["HISTORY"] == "Shortness of breath."


def test_sections_iu():
    s = sections(IU)
    assert s == {"COMPARISON": "None.", "INDICATION": "Positive TB test",
                 "FINDINGS": "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
                 "IMPRESSION": "Normal chest x-XXXX."}


def test_sections_edge_cases():
    assert sections("") == {}
    assert sections("no headers at all") == {}
    # a repeated header is joined, an empty one dropped
    assert sections("FINDINGS: a.\nIMPRESSION:\nFINDINGS: b.") == {"FINDINGS": "a. b."}
    # a colon inside a sentence is not a header
    assert sections("FINDINGS: ratio 1:2 noted.") == {"FINDINGS": "ratio 1:2 noted."}


# ---------------------------------------------------------------------------------------------------- normalize, dedupe

def test_normalize():
    assert normalize("  a \r\n b\t\tc\n\n d  ") == "a b c d"
    assert normalize("Dr. ___  at ___") == "Dr. ___ at ___"
    assert normalize("") == ""


def test_dedupe_key():
    assert dedupe_key("No acute process.") == dedupe_key("  no ACUTE   process ")
    assert dedupe_key("Dr. ___ called.") == "dr ___ called"
    assert dedupe_key("3.2 cm") == "3 2 cm"
    assert dedupe_key("Heart: normal!") != dedupe_key("Heart: abnormal!")
