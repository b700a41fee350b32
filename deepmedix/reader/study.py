"""Creating a reader study: pick the cases every model answered, draw each candidate's boxes, blind and shuffle."""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import tempfile
import time
from pathlib import Path

from PIL import Image

from deepmedix import store
from deepmedix.eval.predictions import read_predictions
from deepmedix.grounding import parse, rescale, step_views
from deepmedix.reader.db import ReaderError, connect, token_hash

MIN_SIDE = 512  # small images are enlarged to this (long side) so that box labels stay readable


def display_image(img: Image.Image, max_side: int) -> Image.Image:
    """The image as readers see it: its long side brought into ``[MIN_SIDE, max_side]``."""
    long_side = max(img.size)
    target = min(max(long_side, MIN_SIDE), max_side)
    if target == long_side:
        return img
    w, h = img.size
    return img.resize((max(1, round(w * target / long_side)), max(1, round(h * target / long_side))),
                      Image.Resampling.LANCZOS)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def frame_of(row: dict, fallback: int) -> tuple[int, int]:
    """The model frame's (width, height) a prediction's boxes are in: the row's ``frame_size`` (written by
    evaluation), else the study's square ``fallback`` (prediction files from before per-image frames)."""
    size = row.get("frame_size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        return size[0], size[1]
    return fallback, fallback


def candidate_view(raw: str, img: Image.Image, disp: Image.Image, frame_size: tuple[int, int],
                   tmp: Path, n_images: int = 1) -> tuple[str | None, list[dict], bytes]:
    """(answer, steps with boxes in original pixels and their colour index, overlay PNG) for one model output
    whose boxes are in the model frame ``frame_size`` of ``img``, the record's first image (the one a reader is
    shown): with ``n_images`` views, a box the reasoning puts on another view is not drawn on this one."""
    from deepmedix.viz import COLORS, draw_overlay

    parsed = parse(raw)
    steps, boxes, labels = [], [], []
    for i, (step, views) in enumerate(zip(parsed.steps, step_views(parsed, n_images)), 1):
        shown = []
        for b in (b for b, v in zip(step.boxes, views) if v == 0):
            shown.append({"box": [round(v) for v in rescale(b, frame_size, img.size)],
                          "color": len(boxes) % len(COLORS)})
            boxes.append(rescale(b, frame_size, disp.size))
            labels.append(f"step {i}")
        steps.append({"text": step.text, "boxes": shown})
    out = draw_overlay(disp, boxes, labels, tmp / "overlay.png")
    return parsed.answer, steps, out.read_bytes()


def create_study(db_path: str | os.PathLike, data_uri: str, predictions: dict[str, str], readers: list[str],
                 n_cases: int, seed: int, *, frame: int = 512, max_side: int = 1024) -> dict[str, str]:
    """Create the study file ``db_path`` (which must not exist yet) and return each reader's personal token.

    ``predictions`` maps a model name to its evaluation ``predictions.jsonl``; the cases are ``n_cases`` records
    (drawn with ``seed``) present in every model's file, shown with the first image of the record in ``data_uri``.
    Each prediction's boxes are read in its own ``frame_size`` (evaluation writes it per record); ``frame`` is the
    square side assumed for prediction files without one (older files: the 512 square); display images are scaled
    so their long side lies in [512, ``max_side``].
    Each reader gets the cases, and the candidates within each case, in an order of their own, drawn from the
    system's secure random source (not from ``seed``, so nobody can recompute the blinding) and stored.
    Tokens are random and stored only as hashes: the returned dict is the only copy.
    """
    from deepmedix.data.records import record_images
    from deepmedix.data.schema import load_records

    db = Path(db_path)
    if db.exists():
        raise ReaderError(f"{db}: already exists; a study is created once, into a new file")
    if len(predictions) < 2:
        raise ReaderError(f"a study compares at least two models, got {len(predictions)}")
    names = [r.strip() for r in readers]
    if not names or any(not n or len(n) > 100 for n in names) or len(set(names)) != len(names):
        raise ReaderError(f"readers must be distinct non-empty names (at most 100 characters), got {readers}")
    if n_cases < 1:
        raise ReaderError(f"n_cases must be at least 1, got {n_cases}")
    try:
        preds = {model: read_predictions(uri) for model, uri in predictions.items()}
    except ValueError as e:
        raise ReaderError(str(e)) from None
    common = sorted(set.intersection(*(set(rows) for rows in preds.values())))
    if len(common) < n_cases:
        raise ReaderError(f"{n_cases} cases asked for, but only {len(common)} records are in every model's "
                          f"predictions")
    root = store.fetch(data_uri)
    records = {r.record_id: r for r in load_records(root)}
    chosen = random.Random(seed).sample(common, n_cases)
    missing = [rid for rid in chosen if rid not in records]
    if missing:
        raise ReaderError(f"{data_uri}: record(s) {missing[:3]} of the predictions are not in this dataset")

    db.parent.mkdir(parents=True, exist_ok=True)
    part = db.with_name(db.name + ".partial")
    for p in (part, part.with_name(part.name + "-wal"), part.with_name(part.name + "-shm")):
        p.unlink(missing_ok=True)
    conn = connect(part, create=True)
    tokens = {name: secrets.token_urlsafe(24) for name in names}
    try:
        with conn, tempfile.TemporaryDirectory() as tmp:
            conn.execute("INSERT INTO study VALUES (1, ?, ?, ?, ?)",
                         (time.strftime("%Y-%m-%dT%H:%M:%S%z"), str(data_uri), seed, frame))
            model_ids = {m: conn.execute("INSERT INTO model (name, predictions) VALUES (?, ?)",
                                         (m, str(predictions[m]))).lastrowid for m in preds}
            case_ids = []
            for rid in chosen:
                rec = records[rid]
                img = record_images(root, rec, None)[0]
                disp = display_image(img, max_side)
                case_ids.append(conn.execute(
                    "INSERT INTO study_case (record_id, question, width, height, image) VALUES (?, ?, ?, ?, ?)",
                    (rid, rec.prompt, *img.size, png_bytes(disp))).lastrowid)
                for m, rows in preds.items():
                    answer, steps, overlay = candidate_view(rows[rid]["raw_output"], img, disp,
                                                            frame_of(rows[rid], frame), Path(tmp), len(rec.images))
                    conn.execute("INSERT INTO candidate VALUES (?, ?, ?, ?, ?)",
                                 (case_ids[-1], model_ids[m], answer, json.dumps(steps), overlay))
            rng = secrets.SystemRandom()  # the blinding: not derivable from the seed, the names or the code
            for name in names:
                reader_id = conn.execute("INSERT INTO reader (name, token_hash) VALUES (?, ?)",
                                         (name, token_hash(tokens[name]))).lastrowid
                for pos, case_id in enumerate(rng.sample(case_ids, len(case_ids)), 1):
                    conn.execute("INSERT INTO assignment VALUES (?, ?, ?)", (reader_id, pos, case_id))
                    order = rng.sample(list(model_ids.values()), len(model_ids))
                    conn.executemany("INSERT INTO slot VALUES (?, ?, ?, ?)",
                                     [(reader_id, case_id, k, mid) for k, mid in enumerate(order, 1)])
    except BaseException:
        conn.close()
        part.unlink(missing_ok=True)
        raise
    conn.close()
    os.replace(part, db)
    return tokens
