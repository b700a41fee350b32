"""The offline ``template`` cold-start teacher: a grounded trace written from the record alone (its findings and
reference boxes), and the coarse anatomical regions any teacher may cite when a record has no box of its own."""

from __future__ import annotations

from typing import Callable

from deepmedix.config import ColdStartConfig
from deepmedix.data.records import frame_boxes
from deepmedix.data.schema import Record
from deepmedix.grounding import DEFAULT_FRAME, Step, format_output

# What a teacher returns for each record: the trace (None on failure) and the failure reason (None on success).
Result = tuple[str | None, str | None]

# Where to look when a record has no box of its own: coarse anatomical regions of a frontal film, model frame.
REGIONS = {
    "lungs": [64.0, 64.0, 448.0, 448.0],
    "heart": [176.0, 224.0, 368.0, 416.0],
    "right lung": [64.0, 64.0, 240.0, 448.0],
    "left lung": [272.0, 64.0, 448.0, 448.0],
}


def scaled(box: list[float], frame: int) -> list[float]:
    return [v * frame / DEFAULT_FRAME for v in box]


def template_trace(rec: Record, frame: int = DEFAULT_FRAME) -> str:
    """A grounded trace written from the record alone: one step per reference box, then the answer."""
    boxes = frame_boxes(rec, frame)
    steps: list[Step] = []
    if rec.task == "vqa" and rec.question_type == "view":
        # with reference boxes, cite only those (the filter wants every cited box to overlap a reference box)
        steps.append(Step("the projection is judged from the scapulae and the heart size",
                          [] if boxes else [scaled(REGIONS["lungs"], frame)]))
    for b, fb in zip(rec.boxes, boxes):
        steps.append(Step(f"there is {b.label} in this region", [fb]))
    if not boxes:
        steps.append(Step("the lung fields are clear", [scaled(REGIONS["lungs"], frame)]))
        steps.append(Step("the cardiac silhouette is normal", [scaled(REGIONS["heart"], frame)]))
    if rec.task.startswith("report_"):
        steps.append(Step("these observations are summarised in the report"))
    return format_output(steps, rec.answer)


def template_teacher(cfg: ColdStartConfig) -> Callable[[list[Record]], list[Result]]:
    return lambda records: [(template_trace(r, cfg.frame), None) for r in records]
