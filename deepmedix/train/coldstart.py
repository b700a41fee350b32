"""Stage 2, the cold start: a teacher writes a grounded reasoning trace for each selected record (boxes in the
model frame, ending in the reference answer), then SFT on those traces teaches the output grammar.

Teachers (``TEACHERS``, picked by ``teacher``): the offline ``template`` teacher builds the trace from the record's
findings and reference boxes; the ``openai`` teacher asks an OpenAI-compatible chat API
(:mod:`deepmedix.train.teacher`). A teacher takes a list of records and returns, in order, one
``(trace or None, failure reason or None)`` per record.

Every trace then goes through :func:`keep_trace`; the kept/dropped counts by reason (with a few record ids per
reason) go to ``manifest.json``'s ``filter``, to ``filter_report.json`` and to the lineage.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import ColdStartConfig
from deepmedix.data.schema import Record, dump_json, load_records, manifest, write_shard
from deepmedix.grounding import DEFAULT_FRAME, Step, format_output, in_frame, iou, parse
from deepmedix.train.common import frame_boxes, select
from deepmedix.train.rewards import ACC_SCALE, accuracy_score, answer_kind, boxed_answer, normalise
from deepmedix.train.teacher import OpenAITeacher, Result, redact_url

# Where to look when a record has no box of its own: coarse anatomical regions of a frontal film, model frame.
REGIONS = {
    "lungs": [64.0, 64.0, 448.0, 448.0],
    "heart": [176.0, 224.0, 368.0, 416.0],
    "right lung": [64.0, 64.0, 240.0, 448.0],
    "left lung": [272.0, 64.0, 448.0, 448.0],
}


def _scaled(box: list[float], frame: int) -> list[float]:
    return [v * frame / DEFAULT_FRAME for v in box]


def template_trace(rec: Record, frame: int = DEFAULT_FRAME) -> str:
    """A grounded trace written from the record alone: one step per reference box, then the answer."""
    boxes = frame_boxes(rec, frame)
    steps: list[Step] = []
    if rec.task == "vqa" and rec.question_type == "view":
        # with reference boxes, cite only those (the filter wants every cited box to overlap a reference box)
        steps.append(Step("the projection is judged from the scapulae and the heart size",
                          [] if boxes else [_scaled(REGIONS["lungs"], frame)]))
    for b, fb in zip(rec.boxes, boxes):
        steps.append(Step(f"there is {b.label} in this region", [fb]))
    if not boxes:
        steps.append(Step("the lung fields are clear", [_scaled(REGIONS["lungs"], frame)]))
        steps.append(Step("the cardiac silhouette is normal", [_scaled(REGIONS["heart"], frame)]))
    if rec.task.startswith("report_"):
        steps.append(Step("these observations are summarised in the report"))
    return format_output(steps, rec.answer)


def template_teacher(cfg: ColdStartConfig) -> Callable[[list[Record]], list[Result]]:
    return lambda records: [(template_trace(r, cfg.frame), None) for r in records]


# name -> factory(cfg) -> teacher(records) -> [(trace | None, reason | None)]. A factory raises ValueError for a
# config it cannot run with (before any data is read).
TEACHERS: dict[str, Callable[[ColdStartConfig], Callable[[list[Record]], list[Result]]]] = {
    "template": template_teacher,
    "openai": OpenAITeacher,
}

_FULL = ACC_SCALE - 1e-9  # the reward's maximum accuracy, less float noise
_WS_RE = re.compile(r"\s+")


def answer_ok(trace: str, truth: str, long_min: float = 0.9) -> bool:
    """The boxed answer, read and scored as the GRPO reward does (:func:`rewards.accuracy_score`): short and list
    answers need the full score (exact match, case-insensitive; list items as a set); long answers need at least
    ``long_min`` of the maximum (near-verbatim reports)."""
    score = accuracy_score(boxed_answer(normalise(trace)), truth)
    return score >= (long_min * ACC_SCALE - 1e-9 if answer_kind(truth) == "long" else _FULL)


def dedupe_key(trace: str, rec: Record) -> tuple:
    """Same images, same prompt and the same trace (whitespace and case folded) is the same training example."""
    fold = lambda t: _WS_RE.sub(" ", normalise(t)).strip().lower()  # noqa: E731
    return tuple(rec.images), fold(rec.prompt), fold(trace)


def keep_trace(trace: str, rec: Record, frame: int, *, iou_min: float = 0.1, answer_min: float = 0.9,
               min_chars: int = 20, max_chars: int = 4000, seen: set | None = None) -> str | None:
    """The filter. Returns None when the trace is kept, else the reason it is dropped, checked in this order:

    ``grammar``            :func:`grounding.parse` finds no ``<think>...</think> ... \\boxed{...}``
    ``answer``             the boxed answer fails the reward's matcher (see :func:`answer_ok`)
    ``box_outside_frame``  a cited box is not a box inside the ``frame x frame`` square (x1 < x2, y1 < y2)
    ``box_no_overlap``     the record has reference boxes, and the reasoning cites none, or cites one whose IoU
                           with every reference box (model frame) is below ``iou_min``
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
    if any(not in_frame(b, frame) for b in parsed.boxes):
        return "box_outside_frame"
    refs = frame_boxes(rec, frame) if rec.boxes else []
    if refs and (not parsed.boxes or any(max(iou(b, r) for r in refs) < iou_min for b in parsed.boxes)):
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


def _carry_images(root: Path, records: list[Record], out: Path) -> None:
    """The traces artifact holds its own images (hard links where the filesystem allows), so that a pod that
    receives only the traces can train on them. Relative URIs stay relative."""
    for rec in records:
        for uri in rec.images:
            if store.is_s3(uri) or Path(uri).is_absolute():
                continue
            dest = out / uri
            if dest.exists():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(root / uri, dest)
            except OSError:
                shutil.copy2(root / uri, dest)


def synthesize(cfg: ColdStartConfig, data_uri: str, out_uri: str) -> dict[str, Any]:
    """Write a dataset of Records whose ``trace`` holds a kept teacher trace (train and validate splits)."""
    if cfg.teacher not in TEACHERS:
        raise ValueError(f"cold start: unknown teacher {cfg.teacher!r}; known: {sorted(TEACHERS)}")
    teacher = TEACHERS[cfg.teacher](cfg)  # checks the teacher's settings before any data is read
    t0 = time.time()
    root = store.fetch(data_uri)
    selected: list[Record] = []
    for split in ("train", "validate"):
        selected.extend(select(load_records(root, split), cfg.tasks, cfg.task_ratios,
                               cfg.max_records if split == "train" else cfg.eval_records, cfg.seed))
    results = teacher(selected)
    if len(results) != len(selected):
        raise RuntimeError(f"cold start: teacher {cfg.teacher!r} returned {len(results)} results for "
                           f"{len(selected)} records")
    kept: list[Record] = []
    dropped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    seen: set = set()
    fkw = filter_kwargs(cfg)
    for rec, (trace, error) in zip(selected, results):
        reason = error or (keep_trace(trace, rec, cfg.frame, seen=seen, **fkw) if trace is not None
                           else "teacher_error")
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            if len(examples.setdefault(reason, [])) < 5:
                examples[reason].append(rec.record_id)
            continue
        rec.trace = trace
        kept.append(rec)
    report: dict[str, Any] = {"teacher": cfg.teacher, "selected": len(selected), "kept": len(kept),
                              "dropped": dict(sorted(dropped.items())),
                              "dropped_examples": dict(sorted(examples.items())), "wall_s": time.time() - t0}
    if getattr(teacher, "stats", None):
        report["teacher_stats"] = dict(teacher.stats)
    with store.atomic_dir(out_uri) as out:
        _carry_images(root, kept, out)
        (out / "records").mkdir()
        for split in ("train", "validate"):
            part = [r for r in kept if r.split == split]
            if part:
                write_shard(part, out / "records" / f"{split}-00000.parquet")
        dump_json({**manifest(kept), "filter": report}, out / "manifest.json")
        dump_json(report, out / "filter_report.json")
        # the config holds only the NAME of the key's env var; a base URL loses any user:password
        safe_cfg = dataclasses.replace(cfg, teacher_base_url=redact_url(cfg.teacher_base_url))
        store.write_lineage(out, "coldstart_synth", safe_cfg, inputs={"data": data_uri}, extra={"filter": report})
    return report


def train_coldstart(cfg: ColdStartConfig, traces_uri: str, model_uri: str, out_uri: str,
                    resume: bool = False) -> dict[str, Any]:
    """SFT on the kept traces, with the reasoning instruction in the prompt. Metric: held-out loss."""
    from deepmedix.train.sft import train_sft

    return train_sft("coldstart", cfg, traces_uri, model_uri, out_uri, targets_for=lambda r: r.trace, reasoning=True,
                     resume=resume)
