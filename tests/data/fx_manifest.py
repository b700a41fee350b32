"""A ``manifest`` source folder (``deepmedix curate --source manifest``): good rows in every image format, with
several views, and hostile rows, each with the line it is on and the reason it must be quarantined for.

:func:`write_manifest_jsonl` returns ``{"good": {line: record id}, "bad": {line: reason fragment}, "engine":
{line: reason fragment}}``; ``engine`` rows pass the adapter and are refused when their image is decoded (a box
outside the image, an undecodable file).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import fx_public
from PIL import Image


def _jpeg(key: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(fx_public.noise(key), "L").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_images(root: Path) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for k in range(1, 9):
        (root / f"img/p{k}.png").write_bytes(fx_public.png_bytes(f"manifest-{k}"))
    (root / "img/j1.jpg").write_bytes(_jpeg("manifest-j1"))
    (root / "img/j2.jpeg").write_bytes(_jpeg("manifest-j2"))
    (root / "img/d1.dcm").write_bytes(fx_public.dicom_bytes("manifest-d1"))
    (root / "img/lat1.png").write_bytes(fx_public.png_bytes("manifest-lat1"))
    (root / "img/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root.parent / "secret.png").write_bytes(fx_public.png_bytes("manifest-secret"))


GOOD = [  # (row, record id or None for the derived one)
    ({"id": "r-findings", "patient_id": "P1", "study_id": "S1", "image": "img/p1.png", "task": "report_findings",
      "answer": "Heart size is normal. Lungs are clear."}, "r-findings"),
    ({"id": "r-impression", "patient_id": "P2", "study_id": "S2", "image": "img/j1.jpg", "view": "ap",
      "task": "report_impression", "answer": "No acute cardiopulmonary process.", "split": "val"}, "r-impression"),
    ({"id": "r-dicom-vqa", "patient_id": "P3", "study_id": "S3", "image": "img/d1.dcm", "task": "vqa",
      "question": "Which side is the effusion on?", "answer": "left", "question_type": "location"}, "r-dicom-vqa"),
    ({"id": "r-yesno", "patient_id": 4, "study_id": 4004, "image": "img/j2.jpeg", "task": "vqa",
      "question": "Is there a pneumothorax?", "answer": "no"}, "r-yesno"),
    ({"id": "r-ground", "patient_id": "P5", "study_id": "S5", "image": "img/p2.png", "task": "grounding",
      "answer": "Nodule", "boxes": [{"label": "Nodule", "box": [4, 5, 20, 22.5]}], "split": "test"}, "r-ground"),
    ({"id": "r-two-views", "patient_id": "P6", "study_id": "S6", "image": ["img/p3.png", "img/lat1.png"],
      "view": "PA", "task": "report_findings", "answer": "Two views of the chest. No effusion."}, "r-two-views"),
    ({"patient_id": "P7", "study_id": "S7", "image": "img/p4.png", "task": "report_findings",
      "answer": "Mild cardiomegaly."}, None),
    ({"id": "r-ground-q", "patient_id": "P8", "study_id": "S8", "image": "img/p5.png", "task": "grounding",
      "question": "Where is the opacity?", "answer": "Opacity",
      "boxes": [{"label": "Opacity", "box": [0, 0, 47, 39]}, {"label": "Opacity", "box": [1, 1, 9, 9]}]}, "r-ground-q"),
]


def _ok(**over) -> dict:
    row = {"patient_id": "PX", "study_id": "SX", "image": "img/p6.png", "task": "report_findings",
           "answer": "Normal chest."}
    row.update(over)
    return {k: v for k, v in row.items() if v is not ...}


# (raw line or row, reason fragment); raw bytes are written as they are
HOSTILE: list[tuple[object, str]] = [
    (b'{"patient_id": "p1", "study_id": ', "not valid JSON"),
    (b"[1, 2, 3]", "a JSON list, not an object"),
    (b'"just text"', "a JSON str, not an object"),
    (b'{"patient_id": "P9", "study_id": "S9", "image": "img/p7.png", "task": "report_findings", '
     b'"answer": "caf\xe9 \xff"}', "not UTF-8 text"),
    (_ok(patient_id=...), "field 'patient_id' is missing or empty"),
    (_ok(study_id=""), "field 'study_id' is missing or empty"),
    (_ok(image=...), "field 'image' must be a path"),
    (_ok(image=[]), "field 'image' must be a path"),
    (_ok(image=["img/p6.png", 3]), "field 'image' must be a path"),
    (_ok(image="img/nowhere.png"), "image 'img/nowhere.png' not found"),
    (_ok(image="../secret.png"), "path escapes the dataset root"),
    (_ok(image="/etc/passwd"), "path escapes the dataset root"),
    (_ok(image="img/p6.png\u0000.png"), "path escapes the dataset root"),
    (_ok(image='["img/p6.png", '), "field 'image' is not a JSON list"),
    (_ok(task="caption"), "task 'caption' is not one of"),
    (_ok(task=True), "field 'task' must be text"),
    (_ok(answer=...), "field 'answer' is missing or empty"),
    (_ok(answer="   "), "field 'answer' is missing or empty"),
    (_ok(task="vqa", answer="yes"), "a vqa row needs it"),
    (_ok(task="vqa", question="Size?", answer="large", question_type="colour"), "question_type 'colour' is not"),
    (_ok(task="vqa", question="Size?", answer="large"), "answer 'large' is not yes/no"),
    (_ok(task="grounding", answer="Nodule"), "a grounding row needs boxes"),
    (_ok(boxes="[[1, 2"), "field 'boxes' is not JSON"),
    (_ok(boxes={"label": "x", "box": [1, 2, 3, 4]}), "field 'boxes' must be a list"),
    (_ok(boxes=[{"box": [1, 2, 3, 4]}]), "box 1: needs a 'label'"),
    (_ok(boxes=[{"label": "a", "box": [1, 2, 3]}]), "'box' must be four finite numbers"),
    (b'{"patient_id": "PX", "study_id": "SX", "image": "img/p6.png", "task": "grounding", "answer": "a", '
     b'"boxes": [{"label": "a", "box": [NaN, 1, 2, 3]}]}', "'box' must be four finite numbers"),
    (_ok(boxes=[{"label": "a", "box": [9, 2, 3, 8]}]), "is negative or has no area"),
    (_ok(boxes=[{"label": "a", "box": [-1, 2, 3, 8]}]), "is negative or has no area"),
    (_ok(split="holdout"), "split 'holdout' is not train, validate or test"),
    (_ok(id="r-findings"), "duplicate of line 1 (id r-findings)"),
    (_ok(id="a/b"), "is not a plain name"),
    (_ok(questoin="typo?"), "unknown field(s) ['questoin']"),
    (_ok(patient_id=["P1"]), "field 'patient_id' must be text, got list"),
]
ENGINE: list[tuple[dict, str]] = [
    (_ok(id="r-outside", task="grounding", answer="a", image="img/p8.png",
         boxes=[{"label": "a", "box": [50, 2, 60, 8]}]), "lies outside the 48x40 image"),
    (_ok(id="r-broken", image="img/broken.png"), "undecodable"),
]


def write_manifest_jsonl(root: str | Path) -> dict:
    root = Path(root)
    write_images(root)
    lines: list[bytes] = []
    good, bad, engine = {}, {}, {}
    for row, rid in GOOD:
        lines.append(json.dumps(row).encode())
        good[len(lines)] = rid
    lines.append(b"")  # a blank line is skipped, and still counted
    for row, why in HOSTILE:
        lines.append(row if isinstance(row, bytes) else json.dumps(row).encode())
        bad[len(lines)] = why
    for row, why in ENGINE:
        lines.append(json.dumps(row).encode())
        engine[len(lines)] = (row["id"], why)
    (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {"good": good, "bad": bad, "engine": engine}


def csv_cell(value) -> str:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "|".join(value)
    return value if isinstance(value, str) else json.dumps(value) if value is not None else ""
