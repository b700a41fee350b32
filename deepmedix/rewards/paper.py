"""The paper's rule-based reward (DeepMedix-R1's release, bit-exact, quirks included) and its word-level variant.

The answer is compared with BLEU over *characters* (``sentence_bleu`` on raw strings), list answers' F1 divides by
the item counts (duplicates included), and boxes are only checked against the 512-pixel frame (``[a,b,c,d]`` with no
space after ``[``, as the release's pattern reads them), never against a reference. ``overall = 0.9·accuracy +
0.1·format + coordinate``. ``words=True`` is ``paper-words``: BLEU over word tokens (``\\w+`` runs and single
punctuation marks). Torch-free.
"""

from __future__ import annotations

import re
from functools import lru_cache

from deepmedix import grounding

_NORM_RE = re.compile(r"\s*(<|>|/)\s*")
_FORMAT_RE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.S)
# The release's box pattern: four numbers, commas with optional spaces *after* them, nothing else inside.
_PAPER_BOX_RE = re.compile(r"\[([-+]?\d*\.?\d+(?:,\s*[-+]?\d*\.?\d+){3})\]")
_WORD_RE = re.compile(r"\w+|[^\w\s]")

ACC_SCALE = 1.5
FORMAT_WEIGHT = 0.1
COORD_GOOD = 0.05
COORD_BAD = -0.2
COORD_CAP = 0.15
COORD_LIMIT = 512  # a box with any value above this is outside the model frame


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
    """+0.05 per box of the first reasoning block inside the frame, -0.2 per box outside; at most 0.15."""
    m = grounding.THINK_RE.search(normalised)
    if not m:
        return 0.0
    value = 0.0
    for item in _PAPER_BOX_RE.findall(m.group(1)):
        value += COORD_BAD if max(float(v.strip()) for v in item.split(",")) > COORD_LIMIT else COORD_GOOD
    return COORD_CAP if value > COORD_CAP else value


def answer_kind(truth: str) -> str:
    """How the release scores an answer against ``truth``: ``list`` (item F1), ``short`` (exact match) or
    ``long`` (text similarity)."""
    n_words = len(truth.strip().split())
    if "|" in truth and n_words <= 20:
        return "list"
    return "short" if n_words <= 2 else "long"


def item_f1(answer: str, truth: str) -> float:
    """The release's list F1: the sets' overlap over the item *counts* (a repeated item counts twice)."""
    ref = [x.strip().lower() for x in truth.strip().split("|")]
    pred = [x.strip().lower() for x in answer.strip().split("|")]
    hit = len(set(ref) & set(pred))
    precision = hit / len(pred) if len(pred) > 0 else 0
    recall = hit / len(ref) if len(ref) > 0 else 0
    return 2 * (precision * recall) / (precision + recall) if (precision + recall) > 0 else 0


@lru_cache(maxsize=1)
def _rouge1():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def text_similarity(answer: str, truth: str, words: bool = False) -> float:
    """Mean of BLEU-1, BLEU-4 (over characters, or over word tokens with ``words``) and ROUGE-1 F."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method2
    ref, hyp = (_WORD_RE.findall(truth), _WORD_RE.findall(answer)) if words else (truth, answer)
    bleu1 = sentence_bleu([ref], hyp, weights=(1, 0, 0, 0), smoothing_function=smooth)
    bleu4 = sentence_bleu([ref], hyp, weights=(0.25, 0.25, 0.25, 0.25), smoothing_function=smooth)
    rouge1 = _rouge1().score(answer, truth)["rouge1"].fmeasure  # the release's argument order (F is symmetric)
    return (bleu1 + bleu4 + rouge1) / 3


def accuracy_score(answer: str, truth: str, words: bool = False) -> float:
    kind = answer_kind(truth)
    if kind == "list":
        return item_f1(answer, truth) * ACC_SCALE
    if kind == "short":
        return ACC_SCALE if answer.lower() == truth.lower() else 0.0
    return text_similarity(answer, truth, words) * ACC_SCALE


def paper_components(output: str, truth: str, words: bool = False) -> dict[str, float]:
    """The paper's rule-based reward and its parts: accuracy (0..1.5), format (0/1), coordinate (<= 0.15)."""
    acc, fmt, coord, overall = _paper(output or "", truth or "", words)
    return {"accuracy": acc, "format": fmt, "coordinate": coord, "overall": overall}


@lru_cache(maxsize=4096)  # a batch's components are asked for by several reward functions
def _paper(output: str, truth: str, words: bool) -> tuple[float, float, float, float]:
    p = normalise(output)
    acc = accuracy_score(boxed_answer(p), truth, words)
    fmt = format_score(p)
    coord = coordinate_score(p)
    return acc, fmt, coord, (1 - FORMAT_WEIGHT) * acc + FORMAT_WEIGHT * fmt + coord

