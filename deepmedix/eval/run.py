"""Evaluation: generate on a split (batched, resumable, with progress), write the prediction file, then score it.

Prediction file (JSONL, one line per record): record_id, task, question_type, source, prompt, raw_output,
answer (parsed), boxes (parsed, model frame), format_ok, reference, ref_boxes_frame, ref_labels, and the frame:
frame (``native`` | ``squareN``), frame_size (the model frame's [width, height] of the record's first image) and
image_size (that image's stored [width, height]); boxes map back to the image per axis by their ratio;
n_images and prompt_mode (``reasoning``, or ``plain`` for a stage-1 model asked without the instruction, whose
whole output is its answer: config ``prompt``).

Outputs: ``predictions.jsonl``; ``metrics.json`` with the flat headline scores and, under ``subsets``, every metric
per subset (task x source, VQA by question type, grounding by label) with bootstrap 95 % intervals
(:mod:`deepmedix.eval.suite`); ``metrics.md`` (the same as tables) and ``metrics_ci.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import EvalConfig
from deepmedix.data.records import frame_boxes, frame_size, load_split, record_images
from deepmedix.errors import InputError
from deepmedix.eval.scoring import PLAIN
from deepmedix.grounding import parse
from deepmedix.model.generate import batched
from deepmedix.store import write_json

PROMPT_MODES = ("auto", "reasoning", PLAIN)


def prompt_mode(spec: str, model_uri: str) -> str:
    """``reasoning`` or ``plain`` for an eval config's ``prompt``: ``auto`` is plain for a model folder whose
    lineage names stage-1 SFT (trained on the task alone, answering in plain text: ``plain_target``) or is a
    checkpoint an SFT run published (``source_stage``), else the paper's reasoning prompt (a cold-start or GRPO
    model, a released checkpoint)."""
    if spec not in PROMPT_MODES:
        raise InputError(f"eval config: key 'prompt' must be one of {list(PROMPT_MODES)}, got {spec!r}")
    if spec != "auto":
        return spec
    try:
        lineage = store.read_lineage(model_uri)
        stage = lineage.get("source_stage") if lineage.get("stage") == "checkpoint" else lineage.get("stage")
    except (store.StoreError, ValueError, AttributeError):  # no lineage (a released checkpoint), or not an object
        stage = None
    return PLAIN if stage == "sft" else "reasoning"


def resume_key(cfg: EvalConfig, data_uri: str, model_uri: str, mode: str = "reasoning") -> dict[str, Any]:
    """A partial prediction file is reused only for the same model, data and generation settings."""
    return {"model": store.artifact_hash(model_uri), "data": store.artifact_hash(data_uri), "frame": cfg.frame,
            "max_new_tokens": cfg.max_new_tokens, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels,
            "prompt": mode}


def predict(cfg: EvalConfig, data_uri: str, model_uri: str, pred_path: Path,
            progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Append predictions to ``pred_path`` for records not already in it (so an interrupted run resumes)."""
    from deepmedix.model.generate import generate
    from deepmedix.model.load import load

    root, records = load_split(data_uri, cfg.split, cfg.tasks, None, cfg.max_records, cfg.seed)
    if not records:
        raise InputError(f"{data_uri}: no '{cfg.split}' records for tasks {cfg.tasks}")
    mode = prompt_mode(cfg.prompt, model_uri)
    key = resume_key(cfg, data_uri, model_uri, mode)
    meta = pred_path.with_name(pred_path.name + ".meta.json")
    if pred_path.exists() and (not meta.exists() or json.loads(meta.read_text()) != key):
        pred_path.unlink()
    meta.write_text(json.dumps(key))
    done: dict[str, dict] = {}
    if pred_path.exists():
        lines = pred_path.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a line cut short by an interrupted run: generate it again
                    break
                raise InputError(f"{pred_path}: line {i + 1} is not JSON") from None
            done[row["record_id"]] = row
        pred_path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    todo = [r for r in records if r.record_id not in done]
    if todo:
        loaded = load(model_uri, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        frame = loaded.frame(cfg.frame)
        with pred_path.open("a") as f:
            for chunk in batched(todo, cfg.batch_size):
                outs = generate(loaded, [record_images(root, r, None) for r in chunk], [r.prompt for r in chunk],
                                max_new_tokens=cfg.max_new_tokens, frame=frame, reasoning=mode != PLAIN)
                for rec, raw in zip(chunk, outs):
                    p = parse(raw)
                    row = {"record_id": rec.record_id, "task": rec.task, "question_type": rec.question_type,
                           "source": rec.source, "prompt": rec.prompt, "raw_output": raw, "answer": p.answer,
                           "boxes": p.boxes, "format_ok": p.format_ok, "reference": rec.answer,
                           "ref_boxes_frame": frame_boxes(rec, frame), "ref_labels": [b.label for b in rec.boxes],
                           "frame": frame.spec, "frame_size": list(frame_size(rec, frame)),
                           "image_size": list(rec.image_sizes[0]), "n_images": len(rec.images),
                           "prompt_mode": mode}
                    f.write(json.dumps(row) + "\n")
                    done[rec.record_id] = row
                f.flush()
                if progress:
                    progress(len(done), len(records))
    return [done[r.record_id] for r in records]


def partial_path(out_uri: str) -> Path:
    """Where predictions accumulate until the artifact is published: beside a local output, in the cache for
    ``s3://`` (keyed by the URI), so that an interrupted run resumes."""
    if store.is_s3(out_uri):
        import hashlib

        folder = store.cache_root() / "partial"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / (hashlib.sha256(out_uri.encode()).hexdigest()[:16] + ".partial.jsonl")
    out = store.local_path(out_uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.with_name(out.name + ".partial.jsonl")


def evaluate(cfg: EvalConfig, data_uri: str, model_uri: str, out_uri: str,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    from deepmedix.eval import model_based, suite
    from deepmedix.eval.scoring import markdown_table, score_predictions

    t0 = time.time()
    model_based.check(cfg)  # a bad model path fails now, not after the generation
    meteor_skipped = model_based.meteor_missing() if cfg.meteor else None
    with store.atomic_dir(out_uri) as out:
        partial = partial_path(out_uri)
        rows = predict(cfg, data_uri, model_uri, partial, progress)
        scores = score_predictions(rows)
        subsets = suite.evaluate_rows(rows, cfg.bootstrap_rounds, cfg.seed, cfg.meteor and not meteor_skipped,
                                      cfg.chexpert_uncertain, models=cfg)
        notes = model_based.notes(cfg, meteor_skipped)
        with (out / "predictions.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        metrics = {"stage": "evaluate", "metric": "format_compliance", "before": None,
                   "after": scores.get("format_compliance"), "scores": scores, "subsets": subsets, "notes": notes,
                   "n": len(rows), "wall_s": time.time() - t0}
        write_json(metrics, out / "metrics.json")
        (out / "metrics.md").write_text(markdown_table(scores) + "\n## By subset (95 % bootstrap intervals)\n\n"
                                        + suite.markdown(subsets) + "\n## Not computed\n\n"
                                        + "".join(f"- {n}\n" for n in notes))
        suite.write_png(subsets, out / "metrics_ci.png")
        store.write_lineage(out, "evaluate", cfg, inputs={"data": data_uri, "model": model_uri},
                            extra={"metrics": metrics})
    partial.unlink(missing_ok=True)
    partial.with_name(partial.name + ".meta.json").unlink(missing_ok=True)
    return metrics
