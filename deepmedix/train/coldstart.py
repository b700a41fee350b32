"""Stage 2, the cold start: a teacher writes a grounded reasoning trace for each selected record (boxes in the
model frame, ending in the reference answer), then SFT on those traces teaches the output grammar.

The offline ``template`` teacher builds the trace from the record's findings and reference boxes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from deepmedix import store
from deepmedix.config import ColdStartConfig
from deepmedix.data.schema import Record, dump_json, load_records, manifest, write_shard
from deepmedix.grounding import DEFAULT_FRAME, Step, format_output, in_frame, parse
from deepmedix.train.common import frame_boxes, select

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
        steps.append(Step("the projection is judged from the scapulae and the heart size", [_scaled(REGIONS["lungs"], frame)]))
    for b, fb in zip(rec.boxes, boxes):
        steps.append(Step(f"there is {b.label} in this region", [fb]))
    if not boxes:
        steps.append(Step("the lung fields are clear", [_scaled(REGIONS["lungs"], frame)]))
        steps.append(Step("the cardiac silhouette is normal", [_scaled(REGIONS["heart"], frame)]))
    if rec.task.startswith("report_"):
        steps.append(Step("these observations are summarised in the report"))
    return format_output(steps, rec.answer)


TEACHERS = {"template": template_trace}


def keep_trace(trace: str, rec: Record, frame: int) -> str | None:
    """The filter: grammar valid, the boxed answer is the reference, and every box inside the frame.
    Returns None when kept, else the reason it was dropped."""
    parsed = parse(trace)
    if not parsed.format_ok:
        return "grammar"
    if (parsed.answer or "").strip().lower() != rec.answer.strip().lower():
        return "answer"
    if any(not in_frame(b, frame) for b in parsed.boxes):
        return "box_outside_frame"
    return None


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
    teacher = TEACHERS[cfg.teacher]
    t0 = time.time()
    root = store.fetch(data_uri)
    kept: list[Record] = []
    dropped: dict[str, int] = {}
    for split in ("train", "validate"):
        recs = select(load_records(root, split), cfg.tasks, cfg.task_ratios,
                      cfg.max_records if split == "train" else cfg.eval_records, cfg.seed)
        for rec in recs:
            trace = teacher(rec, cfg.frame)
            reason = keep_trace(trace, rec, cfg.frame)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            rec.trace = trace
            kept.append(rec)
    with store.atomic_dir(out_uri) as out:
        _carry_images(root, kept, out)
        (out / "records").mkdir()
        for split in ("train", "validate"):
            part = [r for r in kept if r.split == split]
            if part:
                write_shard(part, out / "records" / f"{split}-00000.parquet")
        report = {"teacher": cfg.teacher, "kept": len(kept), "dropped": dropped, "wall_s": time.time() - t0}
        dump_json({**manifest(kept), "filter": report}, out / "manifest.json")
        store.write_lineage(out, "coldstart_synth", cfg, inputs={"data": data_uri}, extra={"filter": report})
    return report


def train_coldstart(cfg: ColdStartConfig, traces_uri: str, model_uri: str, out_uri: str) -> dict[str, Any]:
    """SFT on the kept traces, with the reasoning instruction in the prompt. Metric: held-out loss."""
    from deepmedix.train.sft import train_sft

    return train_sft("coldstart", cfg, traces_uri, model_uri, out_uri, targets_for=lambda r: r.trace, reasoning=True)
