"""Which box frame a checkpoint writes in: ``deepmedix eval frame-calibrate``.

The released DeepMedix-R1 checkpoint does not say whether its boxes are pixels of each image's processor grid
(``native``, Qwen2.5-VL's own convention) or of a 512 x 512 square the image was squashed to (``square512``). On
records with labelled boxes, the model answers once per convention (the image prepared as that convention
prepares it), its boxes are read in that convention and matched to the references (Hungarian, IoU); the
convention whose boxes fit is the one to serve and evaluate with (``frame:`` in the eval config, ``--frame`` on
the server). On a GPU with the 7B checkpoint this is a user's run; the test teaches a tiny model one convention.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from deepmedix.data.records import frame_boxes, load_split, record_images
from deepmedix.data.schema import REPORT_TASKS
from deepmedix.errors import InputError
from deepmedix.grounding import Frame, match_boxes, mean_matched_iou, parse, reference_view_boxes
from deepmedix.model.generate import batched
from deepmedix.store import write_json

TASKS = ["grounding", "vqa", *REPORT_TASKS]


def _score(outs: list[str], records: list, frame: Frame) -> dict[str, Any]:
    """Mean matched IoU (unmatched references and extra boxes count 0), Acc@0.5, and how many boxes fit the frame."""
    ious, hits, refs, n_boxes, inside, fmt = [], 0, 0, 0, 0, 0
    for out, rec in zip(outs, records):
        parsed = parse(out)
        fmt += parsed.format_ok
        # the boxes on the first image, where the references are (several views: grounding.step_views)
        (pred, unplaced), ref = reference_view_boxes(out, len(rec.images)), frame_boxes(rec, frame)
        w, h = rec.image_sizes[0]
        n_boxes += len(pred) + unplaced
        inside += sum(frame.contains(b, w, h) for b in pred)
        ious.append(mean_matched_iou(pred, ref, unplaced))
        hits += sum(v >= 0.5 for _, _, v in match_boxes(pred, ref))
        refs += len(ref)
    return {"miou": round(sum(ious) / len(ious), 4), "acc50": round(hits / refs, 4) if refs else math.nan,
            "format_ok": round(fmt / len(records), 4), "boxes": n_boxes,
            "boxes_inside_frame": round(inside / n_boxes, 4) if n_boxes else None}


def frame_calibrate(model_uri: str, data_uri: str, out_uri: str = "", split: str = "test", max_records: int = 64,
                    batch_size: int = 8, max_new_tokens: int = 1024, specs: tuple[str, ...] = ("native", "square512"),
                    min_pixels: int = 0, max_pixels: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score the model's boxes under each frame ``specs`` on up to ``max_records`` records of ``split`` that have
    reference boxes; the report names the best and its lead in mIoU (and is written to ``out_uri`` when given)."""
    from deepmedix.model.generate import generate
    from deepmedix.model.load import load

    try:
        frames = [Frame.parse(s) for s in specs]  # a bad spec fails before the model loads
    except ValueError as exc:
        raise InputError(f"frame-calibrate --frames: {exc}") from None
    if len(frames) < 2:
        raise InputError(f"frame-calibrate compares two or more frames, got {list(specs)}")
    root, records = load_split(data_uri, split, TASKS)
    records = [r for r in records if r.boxes][:max_records or None]
    if not records:
        raise InputError(f"{data_uri}: no '{split}' records with reference boxes to calibrate on")
    t0 = time.time()
    loaded = load(model_uri, min_pixels=min_pixels, max_pixels=max_pixels)
    results: dict[str, Any] = {}
    total, done = len(records) * len(frames), 0
    for spec in frames:
        frame = loaded.frame(spec)
        outs: list[str] = []
        for chunk in batched(records, batch_size):
            outs.extend(generate(loaded, [record_images(root, r) for r in chunk], [r.prompt for r in chunk],
                                 max_new_tokens=max_new_tokens, frame=frame))
            done += len(chunk)
            if progress:
                progress(done, total)
        results[frame.spec] = _score(outs, records, frame)
    ranked = sorted(results, key=lambda s: results[s]["miou"], reverse=True)
    report = {"model": str(model_uri), "data": str(data_uri), "split": split, "records": len(records),
              "results": results, "best": ranked[0],
              "lead_miou": round(results[ranked[0]]["miou"] - results[ranked[1]]["miou"], 4),
              "wall_s": round(time.time() - t0, 1)}
    if out_uri:
        write_json(report, Path(out_uri))
    return report
