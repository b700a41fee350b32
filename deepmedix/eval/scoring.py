"""Evaluation metrics: report generation (BLEU-4, ROUGE-L as pycocoevalcap defines them), VQA accuracy, grounding
IoU, format compliance.

All functions are pure; :func:`score_predictions` turns a list of prediction rows into one flat metrics dict.
"""

from __future__ import annotations

import numbers
from typing import Any

from deepmedix import grounding
from deepmedix.data.schema import REPORT_TASKS
from deepmedix.rewards.paper import paper_components

_TRAILING_PUNCT = ".,;:!?"


def _normalise_answer(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(_TRAILING_PUNCT).strip()


def vqa_correct(prediction_answer: str | None, reference: str) -> bool:
    """List answers (reference contains ``|``): same set of items, any order. Otherwise a normalised exact match."""
    if prediction_answer is None:
        return False
    reference = reference or ""
    if "|" in reference:
        return set(grounding.split_list(prediction_answer)) == set(grounding.split_list(reference))
    return _normalise_answer(prediction_answer) == _normalise_answer(reference)


def report_text(parsed: grounding.Parsed) -> str:
    """The report a model wrote: its boxed answer, else the raw output with the reasoning block removed."""
    if parsed.answer is not None:
        return parsed.answer
    return grounding.THINK_RE.sub("", parsed.raw).strip()


PLAIN = "plain"  # a prediction row's ``prompt_mode`` when the model was asked without the reasoning instruction


def row_answer(row: dict) -> str | None:
    """The answer of a prediction row: the boxed answer; for a row asked without the reasoning instruction
    (``prompt_mode: plain``, a stage-1 model, which was trained to answer in plain text) the whole output with any
    reasoning block removed, as :func:`report_text` reads reports."""
    parsed = grounding.parse(row.get("raw_output") or "")
    return report_text(parsed) if row.get("prompt_mode") == PLAIN else parsed.answer


def row_boxes(row: dict) -> tuple[list[list[float]], int]:
    """The boxes of a prediction row on its first image (model frame) and how many name a picture the query
    lacks (:func:`deepmedix.grounding.reference_view_boxes`). A plain row (a stage-1 model's ``label [x1, y1, x2,
    y2]`` answer, no reasoning block) has its boxes wherever the output writes them, all on the first image."""
    raw = row.get("raw_output") or ""
    if row.get("prompt_mode") == PLAIN:
        return [[float(v) for v in m.groups()] for m in grounding.BOX_RE.finditer(raw)], 0
    return grounding.reference_view_boxes(raw, row.get("n_images") or 1)


def row_iou(row: dict) -> float:
    """A grounding row's mIoU: its first-view boxes (:func:`row_boxes`) against its reference boxes, boxes on no
    image of the query counted as unmatched."""
    pred, unplaced = row_boxes(row)
    return grounding.mean_matched_iou(pred, _ref_boxes(row.get("ref_boxes_frame")), unplaced)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _ref_boxes(ref: Any) -> list[list[float]]:
    if ref is None:
        return []
    return [[float(v) for v in b] for b in ref]


def score_predictions(rows: list[dict]) -> dict[str, float | int]:
    """One flat metrics dict for prediction rows (``task``, ``question_type``, ``raw_output``, ``reference``,
    ``ref_boxes_frame``). Metrics whose subset is empty are left out."""
    if not rows:
        return {}
    out: dict[str, float | int] = {}
    fmt: list[float] = []
    reward: list[float] = []
    rep_pred: list[str] = []
    rep_ref: list[str] = []
    vqa: list[bool] = []
    vqa_by: dict[str, list[bool]] = {}
    ious: list[float] = []
    counts: dict[str, int] = {}

    for row in rows:
        task = row.get("task") or ""
        raw = row.get("raw_output") or ""
        ref = row.get("reference") or ""
        parsed = grounding.parse(raw)
        counts[task] = counts.get(task, 0) + 1
        fmt.append(1.0 if parsed.format_ok else 0.0)
        reward.append(paper_components(raw, ref)["overall"])
        if task in REPORT_TASKS:
            rep_pred.append(report_text(parsed))  # (a plain row's output is its report either way)
            rep_ref.append(ref)
        elif task == "vqa":
            ok = vqa_correct(row_answer(row), ref)
            vqa.append(ok)
            qt = row.get("question_type") or ""
            if qt:
                vqa_by.setdefault(qt, []).append(ok)
        elif task == "grounding":
            if _ref_boxes(row.get("ref_boxes_frame")):
                ious.append(row_iou(row))

    out["format_compliance"] = _mean(fmt)
    out["paper_reward"] = _mean(reward)
    if rep_pred:  # the headline two; every report metric, per subset and with intervals, is in suite.py
        from deepmedix.eval.nlg import corpus_scores, tokenize

        coco = corpus_scores([tokenize(p) for p in rep_pred], [tokenize(r) for r in rep_ref], meteor=False)
        out["report_bleu4"] = coco["bleu4"]
        out["report_rougeL"] = coco["rouge_l"]
    if vqa:
        out["vqa_accuracy"] = _mean([float(v) for v in vqa])
        for qt in sorted(vqa_by):
            out[f"vqa_accuracy/{qt}"] = _mean([float(v) for v in vqa_by[qt]])
    if ious:
        out["grounding_miou"] = _mean(ious)
        out["grounding_acc@0.5"] = _mean([1.0 if v >= 0.5 else 0.0 for v in ious])
    for task in sorted(counts):
        out[f"n/{task or 'unknown'}"] = counts[task]
    return out


def markdown_table(metrics: dict) -> str:
    """A two-column Markdown table; floats to four decimals, in the dict's order."""
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        if isinstance(v, numbers.Real) and not isinstance(v, (bool, numbers.Integral)):
            val = f"{float(v):.4f}"
        else:
            val = str(v)
        lines.append(f"| {k} | {val} |")
    return "\n".join(lines) + "\n"
