"""The evaluation suite: subsets, metric values against their direct computation, bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from deepmedix import clinical
from deepmedix.eval import nlg as rm
from deepmedix.eval import suite

FINDINGS = ["the lungs are clear . no pleural effusion .", "small left pleural effusion with basal atelectasis .",
            "the heart is enlarged . mild pulmonary edema .", "right upper lobe consolidation .",
            "no acute cardiopulmonary process .", "there is a left apical pneumothorax ."]


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        ref = FINDINGS[i % len(FINDINGS)]
        pred = FINDINGS[(i + int(rng.integers(0, 2))) % len(FINDINGS)]
        rows.append({"record_id": f"r{i}", "task": "report_findings", "source": "mimic_cxr" if i % 2 else "iu_xray",
                     "raw_output": f"<think> look </think> The answer is: \\boxed{{{pred}}}", "reference": ref})
    for i in range(10):
        rows.append({"record_id": f"v{i}", "task": "vqa", "source": "mimic_cxr", "question_type": "presence" if i < 6
                     else "view", "raw_output": f"\\boxed{{{'yes' if i % 3 else 'no'}}}", "reference": "yes"})
    for i, lab in enumerate(["nodule", "nodule", "effusion"]):
        rows.append({"record_id": f"g{i}", "task": "grounding", "source": "mimic_cxr", "ref_labels": [lab],
                     "raw_output": "<think> here [10, 10, 50, 50] </think> \\boxed{x}",
                     "ref_boxes_frame": [[10, 10, 50, 50 + 40 * i]]})
    return rows


def test_subsets_by_task_source_question_type_and_label():
    names = set(suite.subsets(_rows()))
    assert {"iu_xray/report_findings", "mimic_cxr/report_findings", "all/report_findings", "mimic_cxr/vqa",
            "mimic_cxr/vqa/presence", "mimic_cxr/vqa/view", "mimic_cxr/grounding", "mimic_cxr/grounding/nodule",
            "mimic_cxr/grounding/effusion"} <= names


def test_values_equal_their_direct_computation_and_intervals_hold_them():
    rows = _rows()
    res = suite.evaluate_rows(rows, rounds=300, seed=1, meteor=False)
    mimic = [r for r in rows if r["task"] == "report_findings" and r["source"] == "mimic_cxr"]
    preds = [rm.tokenize(r["raw_output"].split("\\boxed{")[1][:-1]) for r in mimic]
    refs = [rm.tokenize(r["reference"]) for r in mimic]
    coco = rm.corpus_scores(preds, refs, meteor=False)
    entry = res["mimic_cxr/report_findings"]
    assert entry["n"] == 12
    for k in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert entry[k]["value"] == pytest.approx(coco[k], abs=1e-12), k
        assert entry[k]["ci_low"] <= entry[k]["value"] + 1e-9 and entry[k]["value"] - 1e-9 <= entry[k]["ci_high"], k
    chex = clinical.corpus_f1([r["raw_output"].split("\\boxed{")[1][:-1] for r in mimic],
                              [r["reference"] for r in mimic])
    assert entry["chexpert_micro_f1"]["value"] == pytest.approx(chex["micro_f1"])
    assert entry["chexpert_macro_f1"]["value"] == pytest.approx(chex["macro_f1"])
    assert entry["chexpert_micro_f1_5"]["value"] == pytest.approx(chex["micro_f1_5"])
    assert res["mimic_cxr/vqa"]["accuracy"]["value"] == pytest.approx(np.mean([bool(i % 3) for i in range(10)]))
    g = res["mimic_cxr/grounding"]
    assert (g["miou"]["value"] == pytest.approx((1.0 + 0.5 + 1 / 3) / 3)
            and g["acc@0.5"]["value"] == pytest.approx(2 / 3))
    assert res["mimic_cxr/grounding/effusion"]["miou"]["value"] == pytest.approx(1 / 3)


def test_bootstrap_bleu_is_corpus_bleu_of_the_resample():
    rows = [r for r in _rows() if r["task"] == "report_findings"]
    preds = [rm.tokenize(r["raw_output"].split("\\boxed{")[1][:-1]) for r in rows]
    refs = [rm.tokenize(r["reference"]) for r in rows]
    ps = rm.pair_scores(preds, refs, meteor=False)
    idx = np.random.default_rng(3).integers(0, len(rows), len(rows))
    direct = rm.corpus_scores([preds[i] for i in idx], [refs[i] for i in idx], meteor=False)
    assert rm.corpus_bleu(ps.bleu_stats[idx].sum(0, keepdims=True))[3] == pytest.approx(direct["bleu4"], abs=1e-12)


def test_seeded_and_optional_intervals(tmp_path):
    rows = _rows()
    a = suite.evaluate_rows(rows, rounds=50, seed=7, meteor=False)
    assert a == suite.evaluate_rows(rows, rounds=50, seed=7, meteor=False)
    none = suite.evaluate_rows(rows, rounds=0, meteor=False)
    assert "ci_low" not in none["mimic_cxr/vqa"]["accuracy"]
    md = suite.markdown(a)
    assert "### mimic_cxr/vqa/presence (n = 6)" in md and "| accuracy |" in md
    suite.write_png(a, tmp_path / "ci.png")
    assert (tmp_path / "ci.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="rounds"):
        suite.evaluate_rows(rows, rounds=-1)


def test_meteor_interval_stays_within_bounds():
    rows = [r for r in _rows() if r["task"] == "report_findings"]
    m = suite.evaluate_rows(rows, rounds=200, seed=0)["all/report_findings"]["meteor"]
    assert 0.0 <= m["ci_low"] <= m["value"] <= m["ci_high"] <= 1.0


def test_grounding_without_reference_boxes_is_left_out_as_in_the_flat_scores():
    from deepmedix.eval.scoring import score_predictions

    rows = [r for r in _rows() if r["task"] == "grounding"]
    rows.append({**rows[0], "id": "nobox", "ref_boxes_frame": [], "ref_labels": []})
    res = suite.evaluate_rows(rows, rounds=0, meteor=False)
    flat = score_predictions(rows)
    assert res["mimic_cxr/grounding"]["n"] == len(rows) - 1
    assert res["mimic_cxr/grounding"]["miou"]["value"] == pytest.approx(flat["grounding_miou"])


def test_resampled_sums_equal_the_direct_sum():
    counts = np.random.default_rng(0).integers(0, 3, (7, 14, 3))
    idx = np.random.default_rng(1).integers(0, 7, (5, 7))
    np.testing.assert_array_equal(suite._resampled_sums(counts, idx), counts[idx].sum(1))
