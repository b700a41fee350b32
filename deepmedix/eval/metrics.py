"""Evaluation metrics: report generation (BLEU-4, ROUGE-L), VQA accuracy, grounding IoU, format compliance.

All functions are pure; :func:`score_predictions` turns a list of prediction rows into one flat metrics dict.
"""

from __future__ import annotations

import numbers
import re
from functools import lru_cache
from typing import Any

from deepmedix import grounding
from deepmedix.train.rewards import paper_components

REPORT_TASKS = ("report_findings", "report_impression")
_WORD_RE = re.compile(r"\w+")
_TRAILING_PUNCT = ".,;:!?"


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; whitespace and punctuation both split (punctuation is dropped)."""
    return _WORD_RE.findall((text or "").lower())


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (nltk ``corpus_bleu``, smoothing method1) over :func:`tokenize` tokens; 0.0 for no input."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    hyps = [tokenize(p) for p in predictions]
    refs = [[tokenize(r)] for r in references]
    if not any(hyps):
        return 0.0
    return float(corpus_bleu(refs, hyps, smoothing_function=SmoothingFunction().method1))


@lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F over pairs (rouge_score, stemmed); 0.0 for no input."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    scorer = _rouge_l_scorer()
    return sum(scorer.score(r or "", p or "")["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(
        predictions)


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
            rep_pred.append(report_text(parsed))
            rep_ref.append(ref)
        elif task == "vqa":
            ok = vqa_correct(parsed.answer, ref)
            vqa.append(ok)
            qt = row.get("question_type") or ""
            if qt:
                vqa_by.setdefault(qt, []).append(ok)
        elif task == "grounding":
            boxes = _ref_boxes(row.get("ref_boxes_frame"))
            if boxes:
                ious.append(grounding.mean_matched_iou(parsed.boxes, boxes))

    out["format_compliance"] = _mean(fmt)
    out["paper_reward"] = _mean(reward)
    if rep_pred:
        out["report_bleu4"] = bleu4(rep_pred, rep_ref)
        out["report_rougeL"] = rouge_l(rep_pred, rep_ref)
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
