"""The cold start's data: a teacher writes a grounded reasoning trace for each selected record (boxes in the model
frame, ending in the reference answer); the kept traces are a dataset that SFT then trains on
(:func:`deepmedix.train.coldstart.train_coldstart`).

Teachers (``TEACHERS``, picked by ``teacher``): the offline ``template`` teacher builds the trace from the record's
findings and reference boxes; the ``openai`` teacher asks an OpenAI-compatible chat API
(:mod:`deepmedix.synth.teacher`). A teacher takes a list of records and returns, in order, one
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
from deepmedix.llm.client import redact_url
from deepmedix.store import write_json
from deepmedix.synth.filter import filter_kwargs, keep_trace
from deepmedix.synth.teacher import OpenAITeacher
from deepmedix.synth.template import Result, template_teacher

# name -> factory(cfg) -> teacher(records) -> [(trace | None, reason | None)]. A factory raises InputError for a
# config it cannot run with (before any data is read).
TEACHERS: dict[str, Callable[[ColdStartConfig], Callable[[list[Record]], list[Result]]]] = {
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


def synthesize(cfg: ColdStartConfig, data_uri: str, out_uri: str) -> dict[str, Any]:
    """Write a dataset of Records whose ``trace`` holds a kept teacher trace (train and validate splits)."""
    if cfg.teacher not in TEACHERS:
        raise InputError(f"cold start: unknown teacher {cfg.teacher!r}; known: {sorted(TEACHERS)}")
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
        write_json({**manifest(kept), "filter": report}, out / "manifest.json")
        write_json(report, out / "filter_report.json")
        # the config holds only the NAME of the key's env var; a base URL loses any user:password
        safe_cfg = dataclasses.replace(cfg, teacher_base_url=redact_url(cfg.teacher_base_url))
        store.write_lineage(out, "coldstart_synth", safe_cfg, inputs={"data": data_uri}, extra={"filter": report})
    return report
