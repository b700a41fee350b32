"""The offline ``template`` cold-start teacher: a grounded trace written from the record alone — its findings and
its reference boxes, which it cites in the pixels of the record's first image (the frame every cold-start trace is
written in; :func:`deepmedix.data.records.trace_in_frame` moves a trace into the model's frame for training). It
has no eyes: a record without reference boxes gets steps that cite its own anatomical landmarks (the phantom draws
them with each image) or no box, never a fixed template region."""

from __future__ import annotations

from typing import Callable

from deepmedix.config import ColdStartConfig
from deepmedix.data.schema import Record
from deepmedix.grounding import Step, format_output

# What a teacher returns for each record: the trace (None on failure) and the failure reason (None on success).
Result = tuple[str | None, str | None]


def template_trace(rec: Record) -> str:
    """A grounded trace written from the record alone: one step per reference box, then the answer. Each step
    names its finding first ("nodule is seen in this region"): a trace that opened with "there is" would make the
    model commit to *some* finding before naming one, and on an abnormality list a finding it then imagines is a
    wrong answer. (With "there is" steps that cited every finding of the study, the learning benchmark's cold start
    fell from 0.46 to 0.29 on abnormality lists; naming first, on the phantom's evidence-only VQA boxes, kept
    0.46.) Without reference boxes it reviews the anatomy, pointing at the record's own landmarks where it has them
    (the phantom's lungs and heart, drawn with the image), else at nothing."""
    marks = {b.label: list(b.box) for b in rec.landmarks}
    steps: list[Step] = []
    if rec.task == "vqa" and rec.question_type == "view":
        steps.append(Step("the projection is judged from the scapulae and the heart size",
                          [] if rec.boxes or "heart" not in marks else [marks["heart"]]))
    for b in rec.boxes:
        steps.append(Step(f"{b.label} is seen in this region", [list(b.box)]))
    if not rec.boxes:
        lungs = [marks[k] for k in ("right lung", "left lung") if k in marks]
        steps.append(Step("the lung fields are reviewed from apex to base", lungs))
        steps.append(Step("the cardiac silhouette and the costophrenic angles are reviewed",
                          [marks["heart"]] if "heart" in marks else []))
    if rec.task.startswith("report_"):
        steps.append(Step("these observations are summarised in the report"))
    return format_output(steps, rec.answer)


def template_teacher(cfg: ColdStartConfig) -> Callable[[list[Record]], list[Result]]:
    return lambda records, root=None: [(template_trace(r), None) for r in records]
