from __future__ import annotations

import numpy as np
import pytest

from deepmedix.clinical import FIVE, OBSERVATIONS, corpus_f1, label, label_f1, positive_set
from deepmedix.data import phantom
from deepmedix.data import phantom_text as pt

POS, NEG, UNC = 1.0, 0.0, -1.0

# (text, observation, expected value): positive, negative and uncertain for every observation
CASES = [
    ("The mediastinum is widened.", "Enlarged Cardiomediastinum", POS),
    ("The cardiomediastinal silhouette is within normal limits.", "Enlarged Cardiomediastinum", NEG),
    ("Possible mediastinal widening.", "Enlarged Cardiomediastinum", UNC),
    ("The heart is mildly enlarged.", "Cardiomegaly", POS),
    ("Moderate cardiomegaly.", "Cardiomegaly", POS),
    ("Heart size is normal.", "Cardiomegaly", NEG),
    ("The heart is not enlarged.", "Cardiomegaly", NEG),
    ("The heart may be enlarged.", "Cardiomegaly", UNC),
    ("Borderline heart size.", "Cardiomegaly", UNC),
    ("Patchy opacity in the left lower lobe.", "Lung Opacity", POS),
    ("The lungs are clear.", "Lung Opacity", NEG),
    ("Questionable opacity at the right base.", "Lung Opacity", UNC),
    ("A 1.5 cm nodule in the right upper lobe.", "Lung Lesion", POS),
    ("No pulmonary nodules or masses.", "Lung Lesion", NEG),
    ("Possible nodule at the left apex.", "Lung Lesion", UNC),
    ("Moderate pulmonary edema.", "Edema", POS),
    ("No pulmonary edema.", "Edema", NEG),
    ("Mild pulmonary vascular congestion.", "Edema", UNC),  # CheXpert: congestion is uncertain edema
    ("Right lower lobe consolidation.", "Consolidation", POS),
    ("No focal consolidation.", "Consolidation", NEG),
    ("Consolidation cannot be excluded.", "Consolidation", UNC),
    ("Findings are consistent with pneumonia.", "Pneumonia", POS),
    ("No evidence of pneumonia.", "Pneumonia", NEG),
    ("Opacity concerning for pneumonia.", "Pneumonia", UNC),
    ("Bibasilar atelectasis.", "Atelectasis", POS),
    ("There is no atelectasis.", "Atelectasis", NEG),
    ("Left basilar opacity, likely atelectasis.", "Atelectasis", UNC),
    ("Small right apical pneumothorax.", "Pneumothorax", POS),
    ("Pneumothorax has resolved.", "Pneumothorax", NEG),
    ("No pneumothorax is seen.", "Pneumothorax", NEG),
    ("Cannot exclude a tiny pneumothorax.", "Pneumothorax", UNC),
    ("Small bilateral pleural effusions.", "Pleural Effusion", POS),
    ("No pleural effusion.", "Pleural Effusion", NEG),
    ("Possible small left effusion.", "Pleural Effusion", UNC),
    ("Pleural thickening at the right apex.", "Pleural Other", POS),
    ("No pleural thickening.", "Pleural Other", NEG),
    ("Blunting may reflect pleural thickening.", "Pleural Other", UNC),
    ("Healed left rib fractures.", "Fracture", POS),
    ("No displaced rib fracture.", "Fracture", NEG),
    ("Questionable fracture of the right seventh rib.", "Fracture", UNC),
    ("Endotracheal tube terminates 4 cm above the carina.", "Support Devices", POS),
    ("Interval removal of the nasogastric tube.", "Support Devices", NEG),
    ("Possible catheter fragment.", "Support Devices", UNC),
    ("No acute cardiopulmonary process.", "No Finding", POS),
    ("Moderate cardiomegaly.", "No Finding", None),
]


@pytest.mark.parametrize("text,obs,expected", CASES, ids=[f"{o}:{t[:30]}" for t, o, _ in CASES])
def test_observation_value(text, obs, expected):
    assert label(text)[obs] == expected


def test_label_has_all_observations_in_order():
    assert OBSERVATIONS[0] == "No Finding" and len(OBSERVATIONS) == 14
    out = label("Small left pleural effusion.")
    assert tuple(out) == OBSERVATIONS
    assert {k for k, v in out.items() if v is not None} == {"Pleural Effusion"}


@pytest.mark.parametrize("text,expected", [
    ("No effusion, but there is a small pneumothorax.", {"Pleural Effusion": NEG, "Pneumothorax": POS}),
    ("No pneumothorax; however, there is a left effusion.", {"Pleural Effusion": POS, "Pneumothorax": NEG}),
    ("No consolidation, although mild atelectasis is present.", {"Consolidation": NEG, "Atelectasis": POS}),
    ("No pleural effusion, pneumothorax, or focal airspace consolidation is seen.",
     {"Pleural Effusion": NEG, "Pneumothorax": NEG, "Consolidation": NEG}),
    ("Mild bibasilar atelectasis without definite consolidation.", {"Atelectasis": POS, "Consolidation": NEG}),
    ("Effusion is small and pneumothorax is not seen.", {"Pleural Effusion": POS, "Pneumothorax": NEG}),
    ("Right lower lobe opacity, no effusion, consistent with pneumonia.",
     {"Lung Opacity": POS, "Pleural Effusion": NEG, "Pneumonia": POS}),
    ("Mild cardiomegaly with possible small effusion.", {"Cardiomegaly": POS, "Pleural Effusion": UNC}),
    ("Heart is enlarged and mediastinal contours are normal.",
     {"Cardiomegaly": POS, "Enlarged Cardiomediastinum": NEG}),
])
def test_negation_and_uncertainty_scope(text, expected):
    out = label(text)
    assert {k: out[k] for k in expected} == expected


@pytest.mark.parametrize("text", ["Cannot exclude pneumonia.", "Pneumonia cannot be excluded.",
                                  "Pneumonia is not excluded.", "Cannot rule out early pneumonia.",
                                  "Pneumonia can not be ruled out."])
def test_double_negation_is_uncertain(text):
    assert label(text)["Pneumonia"] == UNC


@pytest.mark.parametrize("text", ["Heart size is normal.", "The heart size is normal.",
                                  "Cardiac silhouette is within normal limits.", "Normal heart size.",
                                  "The heart size is at the upper limits of normal."])
def test_normal_heart_size_is_negative(text):
    out = label(text)
    assert out["Cardiomegaly"] == NEG and out["No Finding"] == POS


@pytest.mark.parametrize("text", ["The cardiomediastinal silhouette is normal.",
                                  "Cardiomediastinal silhouette is within normal limits.",
                                  "The cardiomediastinal silhouette is unremarkable.",
                                  "Mediastinal and hilar contours are unremarkable."])
def test_normal_cardiomediastinum_is_negative(text):
    assert label(text)["Enlarged Cardiomediastinum"] == NEG


@pytest.mark.parametrize("text", ["No acute cardiopulmonary process.", "No acute abnormality.",
                                  "Normal chest radiograph.", "NO PLEURAL EFFUSION. LUNGS ARE CLEAR."])
def test_normal_reports_are_no_finding_only(text):
    assert positive_set(label(text)) == {"No Finding"}


def test_no_finding_rules():
    devices = label("Left PICC line terminates in the low SVC.")
    assert devices["Support Devices"] == POS and devices["No Finding"] == POS  # devices don't count
    assert label("Possible small left effusion.")["No Finding"] is None  # uncertain counts
    negs = label("No pneumothorax. No pleural effusion. Heart size is normal.")
    assert negs["No Finding"] == POS and negs["Pneumothorax"] == NEG
    assert all(v is None for v in label("").values()) and all(v is None for v in label("  \n").values())
    emphysema = label("Severe emphysema.")  # abnormal outside the 14 (as CheXpert): no finding is not claimed
    assert all(v is None for v in emphysema.values())
    assert label("No emphysema.")["No Finding"] == POS
    for text, _, _ in CASES:  # never negative
        assert label(text)["No Finding"] in (POS, None)


@pytest.mark.parametrize("text,expected", [
    ("No effusion on the left. Small right pleural effusion.", POS),  # positive beats negative
    ("Possible right effusion. No left effusion.", UNC),             # uncertain beats negative
    ("Possible effusion. Small left effusion.", POS),                 # positive beats uncertain
    ("No pleural effusion. Effusion is not seen.", NEG),
])
def test_precedence_across_mentions(text, expected):
    assert label(text)["Pleural Effusion"] == expected


def test_wording_details():
    chf = label("Findings are consistent with CHF.")
    assert chf["Edema"] == POS and chf["Cardiomegaly"] == UNC  # CheXpert's heart-failure rule
    assert label("Pneumothorax with a visible pleural line.")["Support Devices"] is None
    assert label("Portable AP view of the chest.")["Support Devices"] is None
    massive = label("Massive right pleural effusion.")
    assert massive["Pleural Effusion"] == POS and massive["Lung Lesion"] is None
    assert label("Pericardial effusion.")["Pleural Effusion"] is None
    assert label("Compared to ___, the heart is ___ enlarged.")["Cardiomegaly"] == POS
    assert label("Atelectasis vs. pneumonia.")["Pneumonia"] == UNC
    assert label("Pacemaker leads terminate in the heart.")["Cardiomegaly"] is None
    assert label("Heart size is stable.")["Cardiomegaly"] == UNC  # CheXpert: stable size is uncertain
    assert label("No new consolidation.")["Consolidation"] == UNC  # CheXpert: "no new" is uncertain


def test_positive_set_policies():
    labels = {"Edema": UNC, "Cardiomegaly": POS, "Fracture": NEG, "Pneumonia": None}
    assert positive_set(labels) == {"Edema", "Cardiomegaly"}
    assert positive_set(labels, "negative") == {"Cardiomegaly"}
    assert positive_set(labels, "ignore") == {"Cardiomegaly"}
    with pytest.raises(ValueError, match="'maybe'"):
        positive_set(labels, "maybe")


def test_label_f1():
    assert label_f1("Moderate cardiomegaly.", "Moderate cardiomegaly.") == 1.0
    assert label_f1("Moderate cardiomegaly.", "Small right pneumothorax.") == 0.0
    assert label_f1("Cardiomegaly. Small left effusion.", "The heart is enlarged.") == pytest.approx(2 / 3)
    assert label_f1("", "") == 1.0  # both empty
    assert label_f1("Possible pneumonia.", "Cannot exclude effusion.", "negative") == 1.0  # both empty
    assert label_f1("", "No acute process.") == 0.0
    assert label_f1("No acute process.", "") == 0.0
    assert label_f1("No acute process.", "The lungs are clear.") == 1.0  # both "No Finding"
    assert label_f1("Possible pneumonia.", "Pneumonia.") == 1.0
    assert label_f1("Possible pneumonia.", "Pneumonia.", uncertain="negative") == 0.0
    assert label_f1("Possible pneumonia.", "Pneumonia.", uncertain="ignore") == 0.0
    with pytest.raises(ValueError, match="'sometimes'"):
        label_f1("a", "b", uncertain="sometimes")


PREDS = ["Moderate cardiomegaly. Small left pleural effusion.", "No acute cardiopulmonary process.",
         "Right lower lobe consolidation.", "Mild pulmonary edema. No effusion."]
REFS = ["Moderate cardiomegaly. No pleural effusion.", "The lungs are clear. No pneumothorax.",
        "Right lower lobe atelectasis.", "Possible pulmonary edema."]


def test_corpus_f1_by_hand():
    # pred {Cm, PE} / ref {Cm}; {NF} / {NF}; {Cons} / {Atel}; {Edema} / {Edema (uncertain)}
    out = corpus_f1(PREDS, REFS)
    assert out["n"] == 4
    assert (out["micro_precision"], out["micro_recall"]) == (pytest.approx(3 / 5), pytest.approx(3 / 4))
    assert out["micro_f1"] == pytest.approx(2 / 3)  # tp 3, fp 2, fn 1
    assert out["macro_f1"] == pytest.approx(3 / 4)  # Cm 1, NF 1, Atel 0, Edema 1
    assert out["micro_f1_5"] == pytest.approx(4 / 7)  # tp 2 (Cm, Edema), fp 2 (PE, Cons), fn 1 (Atel)
    assert out["macro_f1_5"] == pytest.approx(2 / 3)  # Atel 0, Cm 1, Edema 1
    per = out["per_observation"]
    assert set(per) == set(OBSERVATIONS)
    assert per["Cardiomegaly"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per["Pleural Effusion"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert per["Atelectasis"]["support"] == 1 and per["Atelectasis"]["f1"] == 0.0
    assert per["Fracture"]["support"] == 0


def test_corpus_f1_policies_and_subsets():
    neg = corpus_f1(PREDS, REFS, uncertain="negative")  # the reference's edema no longer counts
    assert neg["micro_f1"] == pytest.approx(0.5)  # tp 2, fp 3, fn 1
    assert neg["macro_f1"] == pytest.approx(2 / 3)  # Cm 1, NF 1, Atel 0
    assert neg["micro_f1_5"] == pytest.approx(1 / 3)
    assert neg["macro_f1_5"] == pytest.approx(1 / 2)
    sub = corpus_f1(PREDS, REFS, observations=("Cardiomegaly", "Atelectasis"))
    assert set(sub["per_observation"]) == {"Cardiomegaly", "Atelectasis"}
    assert sub["micro_f1"] == pytest.approx(2 / 3) and sub["macro_f1"] == pytest.approx(0.5)
    assert sub["micro_f1_5"] == pytest.approx(4 / 7)  # the five are always the five
    assert set(FIVE) <= set(OBSERVATIONS)
    assert corpus_f1([], [])["micro_f1"] == 0.0


def test_corpus_f1_errors():
    with pytest.raises(ValueError, match="2 vs 3"):
        corpus_f1(["a", "b"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="'often'"):
        corpus_f1(["a"], ["a"], uncertain="often")
    with pytest.raises(ValueError, match="Heart Attack"):
        corpus_f1(["a"], ["a"], observations=("Heart Attack",))


_PHANTOM_TO_CHEXPERT = {"cardiomegaly": "Cardiomegaly", "left pleural effusion": "Pleural Effusion",
                        "right pleural effusion": "Pleural Effusion", "nodule": "Lung Lesion", "mass": "Lung Lesion",
                        "pneumothorax": "Pneumothorax", "consolidation": "Consolidation", "atelectasis": "Atelectasis"}


def _check_phantom_report(text: str, findings) -> None:
    out = label(text)
    expected = {_PHANTOM_TO_CHEXPERT[f] for f in findings} or {"No Finding"}
    if "opacity" in text.lower():  # "patchy / plate-like opacity ... consistent with ..."
        expected.add("Lung Opacity")
    assert positive_set(out) == expected, text
    assert UNC not in out.values(), text


def test_phantom_reports_round_trip():
    assert set(_PHANTOM_TO_CHEXPERT) == set(pt.FINDINGS)
    for seed in range(400):
        rng = np.random.default_rng(seed)
        labels = [] if seed % 4 == 0 else rng.choice(pt.FINDINGS, size=1 + seed % 3, replace=False).tolist()
        specs = pt.plan_findings(rng, labels)
        view = "AP" if seed % 2 else "PA"
        findings = pt.findings_text(rng, specs, view)
        _check_phantom_report(findings, labels)
        _check_phantom_report(pt.impression_text(rng, specs), labels)
        out = label(findings)
        if "cardiomegaly" not in labels:  # the normal-heart sentence is a negative mention
            assert NEG in (out["Cardiomegaly"], out["Enlarged Cardiomediastinum"]), findings
        if not labels:
            assert out["Lung Opacity"] == NEG, findings  # "the lungs are clear"


def test_phantom_dataset_records():
    n = 0
    for _, recs in phantom.iter_studies(n_patients=8, size=64, seed=3, vqa_per_study=0):
        for r in recs:
            if r["task"].startswith("report"):
                _check_phantom_report(r["answer"], r["findings"])
                n += 1
    assert n >= 16


def test_long_report():
    base = ("PA and lateral views of the chest. The heart is mildly enlarged. There is a small left pleural effusion "
            "with adjacent atelectasis, not significantly changed. No pneumothorax. Left basilar opacity may "
            "represent atelectasis, though pneumonia is not excluded. Right IJ catheter tip in the mid SVC. "
            "Mediastinal and hilar contours are unremarkable. No acute osseous abnormality. Mild degenerative "
            "changes of the thoracic spine. Pulmonary vasculature is normal. Compared to the prior radiograph "
            "from ___, there is no new focal consolidation, and the endotracheal tube has been removed. Clinical "
            "correlation is recommended. Study {}.")
    texts = [base.format(i) for i in range(50)]  # distinct texts: each labelled afresh, not from the cache
    assert 90 <= len(texts[0].split()) <= 110
    assert {k: v for k, v in label(texts[0]).items() if v is not None} == {
        "Cardiomegaly": POS, "Pleural Effusion": POS, "Atelectasis": POS, "Support Devices": POS,
        "Enlarged Cardiomediastinum": NEG, "Pneumothorax": NEG,
        "Lung Opacity": UNC, "Pneumonia": UNC, "Consolidation": UNC}  # "no new" is uncertain, as in CheXpert
    assert all(label(t) == label(texts[0]) for t in texts[1:])  # the study number changes nothing


def test_degenerate_repetitive_text_does_not_hang():
    """Cues are looked for within a bounded reach of each mention, so one long clause of repeated mentions is
    labelled in linear time. In a child process, which finishes both texts (390k and 600k characters, 30,000
    mentions each) in about a second and a half; the 60 s limit is a hang detector, not a speed target: looking
    at everything before each mention (quadratic) takes minutes."""
    import json
    import subprocess
    import sys

    code = ("import json; from deepmedix.clinical import label; "
            "print(json.dumps([label('the heart is ' * 30000), label('no pleural effusion ' * 30000)]))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("label() did not finish two 30,000-mention texts in 60 s: not linear in the text")
    assert proc.returncode == 0, proc.stderr[-2000:]
    heart, effusion = ({k: v for k, v in d.items() if v is not None} for d in json.loads(proc.stdout))
    assert heart == {"No Finding": POS}  # a size anchor with no size word is no mention
    assert effusion == {"Pleural Effusion": NEG, "No Finding": POS}
