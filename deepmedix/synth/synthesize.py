"""The cold start's data: a teacher writes a grounded reasoning trace for each selected record (boxes in the pixels
of the record's first image, ending in the reference answer; cold-start SFT moves them to the model's frame); the
kept traces are a dataset that SFT then trains on (:func:`deepmedix.train.coldstart.train_coldstart`).

Teachers (``TEACHERS``, picked by ``teacher``): the offline ``template`` teacher builds the trace from the record's
findings and reference boxes; the ``openai`` teacher asks an OpenAI-compatible chat API
(:mod:`deepmedix.synth.teacher`), which is shown the image. A teacher takes a list of records and the dataset's
root (where their images are) and returns, in order, one
``(trace or None, failure reason or None)`` per record.

Every trace then goes through :func:`deepmedix.synth.filter.keep_trace`; the kept/dropped counts by reason (with a
few record ids per reason) go to ``manifest.json``'s ``filter``, to ``filter_report.json`` and to the lineage.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import ColdStartConfig
from deepmedix.data.records import select
from deepmedix.data.schema import Record, load_records, manifest, write_shard
from deepmedix.errors import InputError
from deepmedix.grounding import iou, parse
from deepmedix.llm.client import redact_url
from deepmedix.store import write_json
from deepmedix.synth.filter import filter_kwargs, image_boxes, keep_trace
from deepmedix.synth.teacher import OpenAITeacher
from deepmedix.synth.template import Result, template_teacher

# name -> factory(cfg) -> teacher(records, root) -> [(trace | None, reason | None)]. A factory raises InputError for a
# config it cannot run with (before any data is read).
TEACHERS: dict[str, Callable[[ColdStartConfig], Callable[[list[Record], Path], list[Result]]]] = {
    "template": template_teacher,
    "openai": OpenAITeacher,
}

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


class _Traces:
    """The filter's running state over the teacher's answers: kept records, dropped counts by reason (with a few
    record ids each), the duplicate keys seen, how many records the teacher was asked about."""

    def __init__(self, cfg: ColdStartConfig, root: Path):
        self.cfg, self.fkw, self.root = cfg, filter_kwargs(cfg), root
        self.kept: list[Record] = []
        self.dropped: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self.seen: set = set()
        self.asked = self.kept_train = 0
        self.citing = self.with_refs = 0  # kept traces that cite a box; kept traces on records with reference boxes
        self.overlaps: list[float] = []   # of the latter, those citing boxes: their boxes' mean best IoU

    def ask(self, teacher: Callable[[list[Record], Path], list[Result]], records: list[Record], train_target: int = 0
            ) -> bool:
        """Ask the teacher about ``records`` and filter its traces; with ``train_target``, stop keeping once that
        many train traces are kept and say so (True)."""
        if not records:
            return False
        results = teacher(records, self.root)
        self.asked += len(records)
        if len(results) != len(records):
            raise RuntimeError(f"cold start: teacher {self.cfg.teacher!r} returned {len(results)} results for "
                               f"{len(records)} records")
        for rec, (trace, error) in zip(records, results):
            if train_target and self.kept_train >= train_target:
                return True
            reason = error or (keep_trace(trace, rec, seen=self.seen, **self.fkw)
                               if trace is not None else "teacher_error")
            if reason:
                self.dropped[reason] = self.dropped.get(reason, 0) + 1
                if len(self.examples.setdefault(reason, [])) < 5:
                    self.examples[reason].append(rec.record_id)
                continue
            rec.trace = trace
            self.kept.append(rec)
            self.kept_train += rec.split == "train"
            self._grounding(trace, rec)
        return bool(train_target) and self.kept_train >= train_target


    def _grounding(self, trace: str, rec: Record) -> None:
        boxes = parse(trace).boxes
        self.citing += bool(boxes)
        refs = image_boxes(rec)
        self.with_refs += bool(refs)
        if boxes and refs:
            self.overlaps.append(sum(max(iou(b, r) for r in refs) for b in boxes) / len(boxes))

    def grounding_report(self) -> dict[str, Any]:
        """How the kept traces are grounded: how many cite boxes, and how well those on records with reference
        boxes overlap them (each cited box's best IoU with a reference box, averaged per trace, then over traces)."""
        return {"kept_citing_boxes": self.citing, "kept_on_records_with_boxes": self.with_refs,
                "cited_box_iou_mean": round(sum(self.overlaps) / len(self.overlaps), 4) if self.overlaps else None}


def synthesize(cfg: ColdStartConfig, data_uri: str, out_uri: str) -> dict[str, Any]:
    """Write a dataset of Records whose ``trace`` holds a kept teacher trace (train and validate splits)."""
    if cfg.teacher not in TEACHERS:
        raise InputError(f"cold start: unknown teacher {cfg.teacher!r}; known: {sorted(TEACHERS)}")
    teacher = TEACHERS[cfg.teacher](cfg)  # checks the teacher's settings before any data is read
    if cfg.max_kept < 0 or cfg.synth_chunk < 1:
        raise InputError(f"cold start: max_kept must be >= 0 and synth_chunk >= 1, got {cfg.max_kept} and "
                         f"{cfg.synth_chunk}")
    t0 = time.time()
    root = store.fetch(data_uri)
    train, val = (select(load_records(root, split), cfg.tasks, cfg.task_ratios,
                         cfg.max_records if split == "train" else cfg.eval_records, cfg.seed)
                  for split in ("train", "validate"))
    traces = _Traces(cfg, root)
    if not cfg.max_kept:  # every selected record, in one call
        traces.ask(teacher, train + val)
    else:  # a chunk at a time, until max_kept train traces passed the filter; then the validate records
        for i in range(0, len(train), cfg.synth_chunk):
            if traces.ask(teacher, train[i:i + cfg.synth_chunk], cfg.max_kept):
                break
        traces.ask(teacher, val)
    kept = traces.kept
    report: dict[str, Any] = {"teacher": cfg.teacher, "selected": len(train) + len(val), "asked": traces.asked,
                              "kept": len(kept), "target_train": cfg.max_kept or None, **traces.grounding_report(),
                              "dropped": dict(sorted(traces.dropped.items())),
                              "dropped_examples": dict(sorted(traces.examples.items())), "wall_s": time.time() - t0}
    if getattr(teacher, "stats", None):
        report["teacher_stats"] = dict(teacher.stats)
    with store.atomic_dir(out_uri) as out:
        _carry_images(root, kept, out)
        (out / "records").mkdir()
        for split in ("train", "validate"):
            part = [r for r in kept if r.split == split]
            if part:
                write_shard(part, out / "records" / f"{split}-00000.parquet")
        write_json({**manifest(kept), "filter": report}, out / "manifest.json")
        write_json(report, out / "filter_report.json")
        # the config holds only the NAME of the key's env var; a base URL loses any user:password
        safe_cfg = dataclasses.replace(cfg, teacher_base_url=redact_url(cfg.teacher_base_url))
        store.write_lineage(out, "coldstart_synth", safe_cfg, inputs={"data": data_uri}, extra={"filter": report})
    return report
