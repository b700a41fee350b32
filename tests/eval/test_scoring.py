import math

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_score import rouge_scorer

from deepmedix.eval import scoring as M


def test_vqa_correct():
    assert M.vqa_correct("b | a", "a|b")
    assert M.vqa_correct("Effusion | ATELECTASIS", "atelectasis | effusion")
    assert not M.vqa_correct("a", "a | b")
    assert not M.vqa_correct("a | b | c", "a | b")
    assert M.vqa_correct("Yes.", "yes")
    assert M.vqa_correct("  Left   Lung ", "left lung")
    assert not M.vqa_correct("no", "yes")
    assert not M.vqa_correct(None, "yes")


# ---------------------------------------------------------------- score_predictions

def _paper_acc_long(answer, truth):
    smooth = SmoothingFunction().method2
    b1 = sentence_bleu([truth], answer, weights=(1, 0, 0, 0), smoothing_function=smooth)
    b4 = sentence_bleu([truth], answer, weights=(0.25,) * 4, smoothing_function=smooth)
    r1 = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True).score(truth, answer)["rouge1"].fmeasure
    return 1.5 * (b1 + b4 + r1) / 3


ROWS = [
    # 1 vqa presence: well formed, correct; paper 0.9*1.5 + 0.1 + 0.05 = 1.5
    dict(task="vqa", question_type="presence", reference="yes", ref_boxes_frame=[],
         raw_output="<think> look [0, 0, 10, 10] </think> The answer is: \\boxed{Yes}"),
    # 2 vqa abnormality: no think block, correct list; paper 1.35
    dict(task="vqa", question_type="abnormality", reference="atelectasis | effusion", ref_boxes_frame=[],
         raw_output="\\boxed{effusion | atelectasis}"),
    # 3 vqa abnormality: well formed, wrong; paper 0.1
    dict(task="vqa", question_type="abnormality", reference="yes", ref_boxes_frame=[],
         raw_output="<think> x </think> \\boxed{no}"),
    # 4 grounding: IoU 0.5; paper 1.5
    dict(task="grounding", question_type="", reference="done", ref_boxes_frame=[[0, 0, 10, 20]],
         raw_output="<think> lesion [0, 0, 10, 10] </think> \\boxed{done}"),
    # 5 grounding: no predicted box, IoU 0; paper 1.45
    dict(task="grounding", question_type="", reference="done", ref_boxes_frame=[[0, 0, 10, 10]],
         raw_output="<think> nothing </think> \\boxed{done}"),
    # 6 grounding without reference boxes: not in mIoU; unformatted; paper 0
    dict(task="grounding", question_type="", reference="done", ref_boxes_frame=[],
         raw_output="no format"),
    # 7 findings: boxed, identical; paper 1.45
    dict(task="report_findings", question_type="", reference="The lungs are clear.", ref_boxes_frame=[],
         raw_output="<think> lungs clear </think> The answer is: \\boxed{The lungs are clear.}"),
    # 8 impression: no boxed answer -> raw text is the report; paper answer is "None"
    dict(task="report_impression", question_type="", reference="No acute cardiopulmonary disease.",
         ref_boxes_frame=[], raw_output="No acute disease."),
]


def test_score_predictions_exact():
    m = M.score_predictions(ROWS)
    acc8 = _paper_acc_long("None", "No acute cardiopulmonary disease.")
    expected = {
        "format_compliance": 5 / 8,
        "paper_reward": (1.5 + 1.35 + 0.1 + 1.5 + 1.45 + 0.0 + 1.45 + 0.9 * acc8) / 8,
        # pycocoevalcap's definitions on tokenised text: hyp [no acute disease] vs ref [no acute cardiopulmonary
        # disease] plus one identical 4-token pair: p1 = 7/7, p2 = 4/5, p3 = 2/3, p4 = 1/1, BP = exp(1 - 8/7)
        "report_bleu4": math.exp(1 - 8 / 7) * (1 * 0.8 * (2 / 3) * 1) ** 0.25,
        # ROUGE-L (beta 1.2): LCS 3, P 1, R 3/4 -> 2.44 * 0.75 / (0.75 + 1.44); mean with an identical pair
        "report_rougeL": (1 + 2.44 * 0.75 / (0.75 + 1.44)) / 2,
        "vqa_accuracy": 2 / 3,
        "vqa_accuracy/abnormality": 0.5,
        "vqa_accuracy/presence": 1.0,
        "grounding_miou": 0.25,
        "grounding_acc@0.5": 0.5,
        "n/grounding": 3,
        "n/report_findings": 1,
        "n/report_impression": 1,
        "n/vqa": 3,
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k] == pytest.approx(v), k
    assert isinstance(m["n/vqa"], int)


def test_score_predictions_omits_empty_subsets():
    m = M.score_predictions(ROWS[:3])
    assert set(m) == {"format_compliance", "paper_reward", "vqa_accuracy", "vqa_accuracy/abnormality",
                      "vqa_accuracy/presence", "n/vqa"}
    m = M.score_predictions([ROWS[5]])  # grounding row without reference boxes
    assert "grounding_miou" not in m and "grounding_acc@0.5" not in m
    assert m["n/grounding"] == 1
    assert M.score_predictions([]) == {}
    assert not any(isinstance(v, float) and math.isnan(v) for v in M.score_predictions(ROWS).values())


def test_report_fallback_strips_think_block():
    row = dict(task="report_findings", question_type="", reference="No acute disease.", ref_boxes_frame=[],
               raw_output="<think> long reasoning here </think> No acute disease.")
    m = M.score_predictions([row])
    assert m["report_rougeL"] == pytest.approx(1.0)


def test_markdown_table():
    md = M.markdown_table({"format_compliance": 0.625, "n/vqa": 3})
    lines = md.strip().splitlines()
    assert lines[0] == "| metric | value |"
    assert lines[1] == "|---|---|"
    assert lines[2] == "| format_compliance | 0.6250 |"
    assert lines[3] == "| n/vqa | 3 |"
