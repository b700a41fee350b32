"""The cold-start filter: which teacher traces become training examples (:func:`keep_trace`), with the reason
for each one dropped."""

from __future__ import annotations

import re
from typing import Any

from deepmedix.config import ColdStartConfig
from deepmedix.data.schema import Record
from deepmedix.grounding import inside, iou, parse, placed_boxes
from deepmedix.rewards.paper import ACC_SCALE, accuracy_score, answer_kind, boxed_answer, normalise

_FULL = ACC_SCALE - 1e-9  # the reward's maximum accuracy, less float noise
_WS_RE = re.compile(r"\s+")


def answer_ok(trace: str, truth: str, long_min: float = 0.9) -> bool:
    """The boxed answer, read and scored as the GRPO reward does (:func:`deepmedix.rewards.paper.accuracy_score`):
    short and list answers need the full score (exact match, case-insensitive; list items as a set); long answers
    need at least ``long_min`` of the maximum (near-verbatim reports)."""
    score = accuracy_score(boxed_answer(normalise(trace)), truth)
    return score >= (long_min * ACC_SCALE - 1e-9 if answer_kind(truth) == "long" else _FULL)


def dedupe_key(trace: str, rec: Record) -> tuple:
    """Same images, same prompt and the same trace (whitespace and case folded) is the same training example."""
    fold = lambda t: _WS_RE.sub(" ", normalise(t)).strip().lower()  # noqa: E731
    return tuple(rec.images), fold(rec.prompt), fold(trace)


def image_boxes(rec: Record) -> list[list[float]]:
    """The record's reference boxes in the pixels of its first image: the frame cold-start traces are written in."""
    return [list(b.box) for b in rec.boxes]


def keep_trace(trace: str, rec: Record, *, iou_min: float = 0.1, answer_min: float = 0.9,
               min_chars: int = 20, max_chars: int = 4000, seen: set | None = None) -> str | None:
    """The filter. Returns None when the trace is kept, else the reason it is dropped, checked in this order:

    ``grammar``            :func:`grounding.parse` finds no ``<think>...</think> ... \\boxed{...}``
    ``answer``             the boxed answer fails the reward's matcher (see :func:`answer_ok`)
    ``box_outside_image``  a cited box is not a box inside the image it is on (its pixels, x1 < x2, y1 < y2): the
                           record's first image, or with several views the one the step names (``Picture N``;
                           a picture the record does not have is outside every image)
    ``box_no_overlap``     the record has reference boxes (on its first image), and the reasoning cites none there,
                           or cites one there whose IoU with every reference box is below ``iou_min``
    ``too_short``          the trace has fewer than ``min_chars`` characters (stripped)
    ``too_long``           the trace has more than ``max_chars`` characters
    ``duplicate``          a kept trace already had the same images, prompt and text (:func:`dedupe_key`);
                           only checked when ``seen`` is given, and a kept trace's key is added to it
    """
    parsed = parse(trace)
    if not parsed.format_ok:
        return "grammar"
    if not answer_ok(trace, rec.answer, answer_min):
        return "answer"
    # each box in the pixels of the view the trace puts it on (several views: named "Picture N"); the references
    # are on the first
    placed = placed_boxes(parsed, len(rec.images))
    if any(v is None or not inside(b, *rec.image_sizes[v]) for b, v in placed):
        return "box_outside_image"
    refs, first = image_boxes(rec), [b for b, v in placed if v == 0]
    if refs and (not first or any(max(iou(b, r) for r in refs) < iou_min for b in first)):
        return "box_no_overlap"
    n = len(trace.strip())
    if n < min_chars:
        return "too_short"
    if n > max_chars:
        return "too_long"
    if seen is not None:
        key = dedupe_key(trace, rec)
        if key in seen:
            return "duplicate"
        seen.add(key)
    return None


def filter_kwargs(cfg: ColdStartConfig) -> dict[str, Any]:
    return {"iou_min": cfg.filter_iou, "answer_min": cfg.filter_answer_min, "min_chars": cfg.min_trace_chars,
            "max_chars": cfg.max_trace_chars}
