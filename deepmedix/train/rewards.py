"""Reward functions for GRPO, in TRL's shape: ``fn(completions, **columns) -> list[float]``.

Each completion is a string or a conversational list (``[{"role": "assistant", "content": "..."}]``); dataset
columns arrive as lists aligned with the completions.

:func:`paper_components` is the paper's rule-based reward (first release), kept with its quirks: the answer is
compared with BLEU over *characters* (``sentence_bleu`` on raw strings) and boxes are only checked against the
512-pixel frame, never against any reference.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable

from deepmedix import grounding

_NORM_RE = re.compile(r"\s*(<|>|/)\s*")
_FORMAT_RE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.S)

ACC_SCALE = 1.5
COORD_GOOD = 0.05
COORD_BAD = -0.2
COORD_CAP = 0.15
COORD_LIMIT = 512  # a box with any value above this is outside the model frame


# ---------------------------------------------------------------- helpers

def completion_text(c: Any) -> str:
    """The text of one completion: a plain string, or the last assistant turn of a conversation."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return _content_text(c.get("content"))
    msgs = list(c)
    if not msgs:
        return ""
    if all(isinstance(m, str) for m in msgs):
        return "".join(msgs)
    assistant = [m for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
    msg = assistant[-1] if assistant else msgs[-1]
    return _content_text(msg.get("content") if isinstance(msg, dict) else msg)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # multimodal content parts: [{"type": "text", "text": "..."}, ...]
    parts = []
    for p in content:
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, dict) and p.get("type", "text") == "text":
            parts.append(str(p.get("text", "")))
    return "".join(parts)


@lru_cache(maxsize=1)
def _rouge1():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def _item_f1(answer: str, truth: str) -> float:
    # Literal split (empty items kept), as the release does; grounding.split_list would drop empties.
    a = {x.strip().lower() for x in answer.split("|")}
    g = {x.strip().lower() for x in truth.split("|")}
    hit = len(a & g)
    if hit == 0:
        return 0.0
    p, r = hit / len(a), hit / len(g)
    return 2 * p * r / (p + r)


def _text_similarity(answer: str, truth: str) -> float:
    """Mean of character BLEU-1, character BLEU-4 and word ROUGE-1 F (the release's long-answer score)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method2
    bleu1 = sentence_bleu([truth], answer, weights=(1, 0, 0, 0), smoothing_function=smooth)
    bleu4 = sentence_bleu([truth], answer, weights=(0.25, 0.25, 0.25, 0.25), smoothing_function=smooth)
    rouge1 = _rouge1().score(truth, answer)["rouge1"].fmeasure
    return (bleu1 + bleu4 + rouge1) / 3


# ---------------------------------------------------------------- the paper's reward

def normalise(output: str) -> str:
    """Drop whitespace around ``<``, ``>`` and ``/`` so that ``< think >`` reads as ``<think>``."""
    return _NORM_RE.sub(r"\1", output)


def boxed_answer(normalised: str) -> str:
    """The boxed answer as the release reads it: ``"None"`` if absent or unclosed, ``" "`` if empty."""
    a = grounding.last_boxed(normalised)
    if a is None:
        return "None"
    return a if a else " "


def format_score(normalised: str) -> float:
    return 1.0 if _FORMAT_RE.fullmatch(normalised) else 0.0


def coordinate_score(normalised: str) -> float:
    m = grounding.THINK_RE.search(normalised)
    if not m:
        return 0.0
    total = 0.0
    for box in grounding.find_boxes(m.group(1)):
        total += COORD_BAD if max(box) > COORD_LIMIT else COORD_GOOD
    return min(total, COORD_CAP)


def answer_kind(truth: str) -> str:
    """How the release scores an answer against ``truth``: ``list`` (item F1), ``short`` (exact match) or
    ``long`` (text similarity)."""
    n_words = len(truth.split())
    if "|" in truth and n_words <= 20:
        return "list"
    return "short" if n_words <= 2 else "long"


def accuracy_score(answer: str, truth: str) -> float:
    kind = answer_kind(truth)
    if kind == "list":
        return ACC_SCALE * _item_f1(answer, truth)
    if kind == "short":
        return ACC_SCALE if answer.lower() == truth.lower() else 0.0
    return ACC_SCALE * _text_similarity(answer, truth)


def paper_components(output: str, truth: str) -> dict[str, float]:
    """The paper's rule-based reward and its parts: accuracy (0..1.5), format (0/1), coordinate (<= 0.15)."""
    p = normalise(output or "")
    truth = truth or ""
    acc = accuracy_score(boxed_answer(p), truth)
    fmt = format_score(p)
    coord = coordinate_score(p)
    return {"accuracy": acc, "format": fmt, "coordinate": coord, "overall": 0.9 * acc + 0.1 * fmt + coord}


def _paper_key(key: str, completions: list, answer: list[str]) -> list[float]:
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [float(paper_components(completion_text(c), a)[key]) for c, a in zip(completions, answer)]


def paper_reward(completions: list, answer: list[str], **kw) -> list[float]:
    """The paper's overall reward: 0.9 * accuracy + 0.1 * format + coordinate."""
    return _paper_key("overall", completions, answer)


def paper_accuracy(completions: list, answer: list[str], **kw) -> list[float]:
    return _paper_key("accuracy", completions, answer)


def paper_format(completions: list, answer: list[str] | None = None, **kw) -> list[float]:
    return [format_score(normalise(completion_text(c))) for c in completions]


def paper_coordinate(completions: list, answer: list[str] | None = None, **kw) -> list[float]:
    return [coordinate_score(normalise(completion_text(c))) for c in completions]


# ---------------------------------------------------------------- grounded IoU

def _as_boxes(ref: Any) -> list[list[float]]:
    if ref is None:
        return []
    return [[float(v) for v in b] for b in ref]


def grounded_iou_reward(completions: list, ref_boxes_frame: list, **kw) -> list[float]:
    """Mean matched IoU of the reasoning's boxes against the reference boxes (model frame); 0.0 without refs."""
    if len(completions) != len(ref_boxes_frame):
        raise ValueError(f"{len(completions)} completions but {len(ref_boxes_frame)} rows of reference boxes")
    out = []
    for c, ref in zip(completions, ref_boxes_frame):
        ref = _as_boxes(ref)
        if not ref:
            out.append(0.0)
            continue
        out.append(float(grounding.mean_matched_iou(grounding.parse(completion_text(c)).boxes, ref)))
    return out


# ---------------------------------------------------------------- registry

REWARDS: dict[str, Callable[..., list[float]]] = {
    "paper": paper_reward,
    "paper_accuracy": paper_accuracy,
    "paper_format": paper_format,
    "paper_coordinate": paper_coordinate,
    "grounded_iou": grounded_iou_reward,
}


def get_reward(name: str) -> Callable[..., list[float]]:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}") from None
