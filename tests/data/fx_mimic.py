"""Tiny native-format fixtures of MIMIC-CXR-JPG and the datasets built on it (a helper module, not a test).

Import from a test in ``tests/data`` as ``from fx_mimic import ...``. Every id is synthetic (subject ids 1000xxxx,
study ids 5xxxxxxx, DICOM ids made from a hash) and every text is written here — no real patient data. The file
names, column names and order and the folder layout follow the published datasets (see
the adapters in ``deepmedix/data/sources/`` ``mimic.py``, ``ms_cxr.py`` and ``mimic_vqa.py`` for what was
confirmed and what was assumed):

* :func:`write_mimic_cxr_jpg` — ``files/pNN/pSUBJECT/sSTUDY/DICOM.jpg`` and the four ``mimic-cxr-2.0.0-*.csv(.gz)``
* :func:`write_mimic_reports` — MIMIC-CXR's ``files/pNN/pSUBJECT/sSTUDY.txt`` reports
* :func:`write_ms_cxr` — ``MS_CXR_Local_Alignment_v1.1.0.csv`` (or v1.0.0, without the split column)
* :func:`write_mimic_cxr_vqa` — ``mimiccxrvqa/dataset/{train,valid,test}.json``
* :func:`write_medical_cxr_vqa` — ``medical_cxr_vqa_questions.csv`` and ``mimic_all.csv``
* :func:`write_mimic_hostile` — all four with bad inputs mixed into good ones; :func:`hostile_sources` says how
  to open them.

Images are 40x48 (width x height) grayscale JPEGs of seeded noise, different for every DICOM id.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMG_W, IMG_H = 40, 48
META_COLS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"]
SPLIT_COLS = ["dicom_id", "study_id", "subject_id", "split"]
LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]
LABEL_COLS = ["subject_id", "study_id"] + LABELS
MSCXR_COLS_11 = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                 "image_height", "split"]
MSCXR_COLS_10 = MSCXR_COLS_11[:-1]
MEDVQA_COLS = ["study_id", "subject_id", "question_type", "question", "answer", "split"]
MIMIC_ALL_COLS = ["subject_id", "study_id"] + LABELS + ["dicom_id", "view", "split", "study_date", "study_order"]
VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}


# ------------------------------------------------------------------------------------------------ building blocks

def dicom_id(seed: str) -> str:
    """A synthetic MIMIC-style DICOM id: five groups of eight hex digits."""
    h = hashlib.sha1(seed.encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def write_jpeg(path: Path, seed: str) -> None:
    """A 40x48 grayscale JPEG of noise seeded by ``seed`` (so no two images are alike)."""
    rng = np.random.default_rng(int(hashlib.sha1(seed.encode()).hexdigest()[:12], 16))
    a = rng.integers(0, 256, size=(IMG_H, IMG_W), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode="L").save(path, format="JPEG", quality=90)


def jpg_rel(subject: str, study: str, dicom: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


def report_rel(subject: str, study: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}.txt"


def write_csv(path: Path, columns: list[str], rows: list[list[Any]] | list[dict[str, Any]], gz: bool = False) -> Path:
    """A CSV with the given header; rows are lists (written as they are, so a row may be malformed) or dicts."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r.get(c, "") for c in columns] if isinstance(r, dict) else r)
    data = buf.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data, mtime=0))
    else:
        path.write_bytes(data)
    return path


def report_text(findings: str | None, impression: str | None, indication: str = "___F with cough") -> str:
    """A report in MIMIC-CXR's layout (centred FINAL REPORT title, upper-case headers, wrapped lines)."""
    parts = ["                                 FINAL REPORT",
             " EXAMINATION:  CHEST (PA AND LAT)", "",
             f" INDICATION:  {indication}", "",
             " TECHNIQUE:  Chest PA and lateral", "",
             " COMPARISON:  ___", ""]
    if findings is not None:
        parts += [" FINDINGS:", " ", " " + findings.replace(". ", ".\n "), ""]
    if impression is not None:
        parts += [" IMPRESSION:", " ", " " + impression, ""]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------ MIMIC-CXR-JPG

# (subject, study, [(view, seed)], split, positive labels, findings text, impression text)
STUDIES = [
    ("10000011", "50000101", [("LATERAL", "a"), ("PA", "b")], "train", ["Cardiomegaly", "Edema"],
     "The heart is mildly enlarged. There is mild interstitial edema. No pleural effusion.",
     "Cardiomegaly with mild edema."),
    ("10000011", "50000102", [("AP", "c")], "train", ["No Finding"],
     None, "No acute cardiopulmonary process."),
    ("10000022", "50000203", [("LL", "d"), ("AP", "e"), ("PA", "f")], "validate", ["Pleural Effusion"],
     "Small left pleural effusion. Lungs otherwise clear. Dr. ___ was notified on ___ at ___.", None),
    ("10000033", "50000304", [("PA", "g"), ("LATERAL", "h")], "test", ["Pneumothorax", "Support Devices"],
     "Small right apical pneumothorax. Right chest tube in place.",
     "Small right pneumothorax, decreased since ___."),
]


def _dicoms(study: str, views: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(v, dicom_id(f"{study}-{seed}")) for v, seed in views]


def write_mimic_cxr_jpg(root: str | Path, *, gz: bool = False, studies=STUDIES, images: bool = True,
                        skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """MIMIC-CXR-JPG 2.x at ``root``: images plus the metadata, split, chexpert and negbio files (``.csv.gz``
    when ``gz``). ``skip`` leaves out files by kind ("metadata", "split", "chexpert", "negbio").

    Returns ``{"studies": {study: {...}}, "n_images": int}``; each study entry has ``subject``, ``split``,
    ``dicoms`` in the expected image order (PA, AP, then others), ``views`` in that order, ``labels`` (the
    positive CheXpert names, "No Finding" excluded) and the negbio positives (``negbio``: chexpert minus Edema,
    so the two files differ).
    """
    root = Path(root)
    meta, split, chex, negbio = [], [], [], []
    info: dict[str, Any] = {"studies": {}, "n_images": 0}
    rank = {"PA": 0, "AP": 1}
    for subject, study, views, sp, pos, fnd, imp in studies:
        dicoms = _dicoms(study, views)
        for i, (view, d) in enumerate(dicoms):
            meta.append([d, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, f"21360{i}.718",
                         "CHEST (PA AND LAT)", VIEW_CODE.get(view, "lateral"), "Erect"])
            split.append([d, study, subject, sp])
            if images:
                write_jpeg(root / jpg_rel(subject, study, d), d)
            info["n_images"] += 1
        chex.append([subject, study] + ["1.0" if n in pos else ("0.0" if n == "Pneumonia" else "") for n in LABELS])
        negbio.append([subject, study] + ["1.0" if (n in pos and n != "Edema") else "" for n in LABELS])
        order = sorted(dicoms, key=lambda t: (rank.get(t[0], 2), t[1]))
        info["studies"][study] = {
            "subject": subject, "split": sp, "dicoms": [d for _, d in order], "views": [v for v, _ in order],
            "labels": [n for n in pos if n != "No Finding"],
            "negbio": [n for n in pos if n not in ("No Finding", "Edema")],
            "findings": fnd, "impression": imp}
    meta.reverse()  # the adapter must not rely on the file's row order
    if "metadata" not in skip:
        write_csv(root / "mimic-cxr-2.0.0-metadata.csv", META_COLS, meta, gz)
    if "split" not in skip:
        write_csv(root / "mimic-cxr-2.0.0-split.csv", SPLIT_COLS, split, gz)
    if "chexpert" not in skip:
        write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", LABEL_COLS, chex, gz)
    if "negbio" not in skip:
        write_csv(root / "mimic-cxr-2.0.0-negbio.csv", LABEL_COLS, negbio, gz)
    return info


def write_mimic_reports(root: str | Path, *, studies=STUDIES, prefix: str = "") -> dict[str, dict[str, str | None]]:
    """MIMIC-CXR reports ``<prefix>files/pNN/pSUBJECT/sSTUDY.txt`` (prefix e.g. ``"mimic-cxr-reports/"``).
    Returns study -> {"findings", "impression"}: the section texts the adapter should extract (whitespace
    collapsed), None for an absent section."""
    root = Path(root)
    out = {}
    for subject, study, _views, _sp, _pos, fnd, imp in studies:
        p = root / (prefix + report_rel(subject, study))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(report_text(fnd, imp), encoding="utf-8")
        out[study] = {"findings": fnd, "impression": imp}
    return out


# ------------------------------------------------------------------------------------------------ MS-CXR

# (study index in STUDIES, view index, category, phrase, [(x, y, w, h)], split) on a 400x480 image
MSCXR_ROWS = [
    (0, 1, "Cardiomegaly", "Mildly enlarged cardiac silhouette", [(120, 200, 180, 150)], "train"),
    (0, 1, "Edema", "Mild interstitial edema in both lungs", [(30, 60, 150, 300), (220, 60, 150, 300)], "train"),
    (2, 2, "Pleural Effusion", "small left pleural effusion", [(250, 380, 140, 90)], "val"),
    (3, 0, "Pneumothorax", "Small right apical pneumothorax", [(0, 10, 120, 80)], "test"),
]
MSCXR_SIZE = (400, 480)  # image_width, image_height: 10x the fixture JPEGs, so the engine must rescale


def write_ms_cxr(root: str | Path, *, version: str = "1.1.0", images_root: str | Path | None = None,
                 gz: bool = False, path_ext: str = ".jpg") -> dict[str, Any]:
    """MS-CXR at ``root`` (``MS_CXR_Local_Alignment_v<version>.csv``; 1.0.0 has no split column) and the images
    it names in MIMIC-CXR-JPG layout under ``images_root`` (default ``root``). ``path_ext`` ".dcm" writes the
    path column as DICOM paths (the adapter maps them to the .jpg).

    Returns ``{"items": [...], "csv": name}``; each item has ``dicom``, ``subject``, ``study``, ``phrase``,
    ``category``, ``boxes`` ([x1, y1, x2, y2]), ``frame`` (w, h), ``split`` ("" for 1.0.0, else normalised).
    """
    root, iroot = Path(root), Path(images_root or root)
    cols = MSCXR_COLS_11 if version >= "1.1" else MSCXR_COLS_10
    rows, items = [], []
    W, H = MSCXR_SIZE
    for si, vi, cat, phrase, boxes, sp in MSCXR_ROWS:
        subject, study, views = STUDIES[si][0], STUDIES[si][1], STUDIES[si][2]
        d = _dicoms(study, views)[vi][1]
        write_jpeg(iroot / jpg_rel(subject, study, d), d)
        path = jpg_rel(subject, study, d)[:-4] + path_ext
        for (x, y, w, h) in boxes:
            rows.append(dict(dicom_id=d, category_name=cat, label_text=phrase, path=path, x=x, y=y, w=w, h=h,
                             image_width=W, image_height=H, split=sp))
        items.append(dict(dicom=d, subject=subject, study=study, phrase=phrase, category=cat,
                          boxes=[[float(x), float(y), float(x + w), float(y + h)] for x, y, w, h in boxes],
                          frame=(W, H), split=("" if "split" not in cols else {"val": "validate"}.get(sp, sp))))
    name = f"MS_CXR_Local_Alignment_v{version}.csv"
    write_csv(root / name, cols, rows, gz)
    return {"items": items, "csv": name + (".gz" if gz else "")}


# ------------------------------------------------------------------------------------------------ MIMIC-CXR-VQA

def _vqa_entry(split: str, idx: int, subject: str, study: str, dicom: str, question: str, answer: Any,
               content: str, semantic: str, image_path: str | None = None) -> dict[str, Any]:
    return {
        "split": split, "idx": idx, "image_id": dicom, "question": question, "content_type": content,
        "semantic_type": semantic, "template": question, "template_program": "program_1",
        "template_arguments": {"object": {}, "attribute": {}, "category": {}, "viewpos": {}, "gender": {}},
        "answer": answer, "subject_id": subject, "study_id": study,
        "image_path": image_path if image_path is not None else f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg",
    }


def write_mimic_cxr_vqa(root: str | Path, *, images_root: str | Path | None = None,
                        folder: str = "mimiccxrvqa/dataset") -> dict[str, Any]:
    """MIMIC-CXR-VQA JSON files under ``root/<folder>`` and their images under ``images_root`` (default root).
    Returns ``{"items": {record_id: {...}}}`` with the expected answer, question_type, split and image path."""
    root, iroot = Path(root), Path(images_root or root)
    d = root / folder if folder else root
    d.mkdir(parents=True, exist_ok=True)
    plan = {
        "train": [
            (0, 0, 1, "Is there cardiomegaly in the cardiac silhouette?", ["yes"], "presence", "verify"),
            (7, 0, 1, "List all abnormalities in the left lung.", ["lung opacity", "pulmonary edema/hazy opacity"],
             "abnormality", "query"),
            (3, 1, 0, "What is the gender of this patient?", ["f"], "gender", "query"),
        ],
        "valid": [
            (2, 2, 2, "List all anatomical findings in the right lung.", [], "anatomy", "query"),
        ],
        "test": [
            (0, 3, 0, "Which view is in this image, AP or PA?", ["pa"], "plane", "choose"),
            (1, 3, 0, "Is the width of the cardiac silhouette wider than 1/2 of the thorax width?", ["no"],
             "size", "verify"),
        ],
    }
    expect = {}
    for fname, rows in plan.items():
        entries = []
        for idx, si, vi, q, ans, ctype, sem in rows:
            subject, study, views = STUDIES[si][0], STUDIES[si][1], STUDIES[si][2]
            dcm = _dicoms(study, views)[vi][1]
            write_jpeg(iroot / jpg_rel(subject, study, dcm), dcm)
            entries.append(_vqa_entry(fname, idx, subject, study, dcm, q, ans, ctype, sem))
            split = {"valid": "validate"}.get(fname, fname)
            a = [{"f": "female", "m": "male"}.get(x, x) for x in ans] if ctype == "gender" else ans
            expect[f"{split}-{idx}"] = dict(answer=" | ".join(a) if a else "none", question_type=ctype,
                                            split=split, image=jpg_rel(subject, study, dcm), subject=subject,
                                            study=study, question=q)
        (d / f"{fname}.json").write_text(json.dumps(entries, indent=4), encoding="utf-8")
    return {"items": expect, "folder": folder}


# ------------------------------------------------------------------------------------------------ Medical-CXR-VQA

def write_medical_cxr_vqa(root: str | Path, *, images_root: str | Path | None = None, with_split: bool = True,
                          with_mimic_all: bool = True, name: str = "medical_cxr_vqa_questions.csv") -> dict[str, Any]:
    """Medical-CXR-VQA at ``root``: the questions CSV (study_id, subject_id, question_type, question, answer[,
    split]) and ``mimic_all.csv`` naming each study's image (written under ``images_root``, default root).
    Returns ``{"rows": [...]}`` in file order with the expected answer, question_type, split, image."""
    root, iroot = Path(root), Path(images_root or root)
    plan = [  # (study index, question_type, question, answer, split)
        (0, "abnormality", "what abnormalities are seen in this image?", "cardiomegaly, edema", "train"),
        (0, "presence", "is there edema?", "yes", "train"),
        (0, "view", "which view is this image taken?", "PA view", "train"),
        (2, "location", "where is the pleural effusion?", "left side", "val"),
        (2, "level", "what level is the pleural effusion?", "small", "val"),
        (3, "type", "what type is the pneumothorax?", "apical", "test"),
    ]
    all_rows, main = [], {}
    rank = {"PA": 0, "AP": 1}
    for si in sorted({p[0] for p in plan}):
        subject, study, views, sp = STUDIES[si][0], STUDIES[si][1], STUDIES[si][2], STUDIES[si][3]
        view, dcm = sorted(_dicoms(study, views), key=lambda t: (rank.get(t[0], 2), t[1]))[0]
        write_jpeg(iroot / jpg_rel(subject, study, dcm), dcm)
        main[study] = (subject, dcm, view)
        all_rows.append(dict(subject_id=subject, study_id=study, dicom_id=dcm, view=VIEW_CODE[view],
                             split={"validate": "val"}.get(sp, sp), study_date=21800506, study_order=1,
                             **{n: "" for n in LABELS}))
    rows, expect = [], []
    for si, qt, q, a, sp in plan:
        subject, study = STUDIES[si][0], STUDIES[si][1]
        rows.append(dict(study_id=study, subject_id=subject, question_type=qt, question=q, answer=a, split=sp))
        expect.append(dict(study=study, subject=subject, question_type=qt, question=q,
                           answer=" | ".join(x.strip() for x in a.split(",")) if qt == "abnormality" else a,
                           split=({"val": "validate"}.get(sp, sp) if with_split else ""),
                           image=jpg_rel(subject, study, main[study][1]), view=main[study][2]))
    write_csv(root / name, MEDVQA_COLS if with_split else MEDVQA_COLS[:-1], rows)
    if with_mimic_all:
        write_csv(root / "mimic_all.csv", MIMIC_ALL_COLS, all_rows)
    return {"rows": expect}


# ------------------------------------------------------------------------------------------------ hostile inputs

def hostile_sources(root: str | Path) -> list[tuple[str, str, dict[str, Any]]]:
    """How to open what :func:`write_mimic_hostile` wrote: (source name, root, options) for each of the four."""
    root = Path(root)
    jpg = str(root / "mimic-cxr-jpg")
    return [("mimic_cxr", jpg, {}),
            ("ms_cxr", str(root / "ms-cxr"), {"images_root": jpg}),
            ("mimic_cxr_vqa", str(root / "mimic-cxr-vqa"), {"images_root": jpg}),
            ("medical_cxr_vqa", str(root / "medical-cxr-vqa"), {"images_root": jpg})]


def write_mimic_hostile(root: str | Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The four datasets under ``root`` (``mimic-cxr-jpg``, ``ms-cxr``, ``mimic-cxr-vqa``, ``medical-cxr-vqa``;
    see :func:`hostile_sources`) with good inputs mixed with bad ones.

    Returns ``(adapter, engine)``: ``adapter`` lists (key, reason) for every bad input the adapters must
    quarantine — ``key`` is a substring of the Quarantine's ``file`` or ``record``, ``reason`` a case-insensitive
    substring of its ``reason`` — one pair per expected Quarantine; ``engine`` lists the bad inputs only the
    engine can see (an image path substring, and "not found" for an absent JPEG or "" — any reason — for a JPEG
    that does not decode).
    """
    root = Path(root)
    jr = root / "mimic-cxr-jpg"
    adapter: list[tuple[str, str]] = []
    engine: list[tuple[str, str]] = []

    # ---------------------------------------------------------------- MIMIC-CXR-JPG + reports (source mimic_cxr)
    write_mimic_cxr_jpg(jr, studies=STUDIES, skip=("metadata", "split", "chexpert", "negbio"))
    write_mimic_reports(jr, studies=STUDIES)
    meta, split, chex = [], [], []
    for subject, study, views, sp, pos, _f, _i in STUDIES:
        for view, d in _dicoms(study, views):
            meta.append([d, subject, study, "CHEST", view, 3056, 2544, 21800506, "1.0", "CHEST", "x", "Erect"])
            split.append([d, study, subject, sp])
        chex.append([subject, study] + ["1.0" if n in pos else "" for n in LABELS])

    def study_files(subject: str, study: str, views: list[str], report: str | bytes | None, sp: str | None = "train",
                    images: bool = True) -> list[str]:
        ds = [dicom_id(f"h{study}-{i}") for i in range(len(views))]
        for v, d in zip(views, ds):
            meta.append([d, subject, study, "CHEST", v, 3056, 2544, 21800506, "1.0", "CHEST", "x", "Erect"])
            if sp is not None:
                split.append([d, study, subject, sp])
            if images:
                write_jpeg(jr / jpg_rel(subject, study, d), d)
        p = jr / report_rel(subject, study)
        if report is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(report if isinstance(report, bytes) else report.encode("utf-8"))
        return ds

    ok_report = report_text("Lungs are clear.", "Normal chest.")
    # metadata rows with bad ids
    meta.append(["../../etc/passwd", "10000044", "50000401", "CHEST", "PA", 1, 1, 1, 1, "C", "x", "E"])
    adapter.append(("../../etc/passwd", "dicom_id"))
    bad_subj = dicom_id("bad-subject")
    meta.append([bad_subj, "abc", "50000402", "CHEST", "PA", 1, 1, 1, 1, "C", "x", "E"])
    adapter.append((bad_subj, "subject_id"))
    bad_study = dicom_id("bad-study")
    meta.append([bad_study, "10000044", "", "CHEST", "PA", 1, 1, 1, 1, "C", "x", "E"])
    adapter.append((bad_study, "study_id"))
    # a row of the wrong shape
    short = dicom_id("short-row")
    meta.append([short, "10000044", "50000403", "CHEST"])
    adapter.append((short, "fields"))
    # duplicate dicom_id (second occurrence, under another study)
    dup_ds = study_files("10000055", "50000501", ["PA"], ok_report)
    meta.append([dup_ds[0], "10000055", "50000502", "CHEST", "AP", 1, 1, 1, 1, "C", "x", "E"])
    adapter.append((dup_ds[0], "duplicate dicom_id"))
    # a study split between two subjects: the second subject's row is dropped
    study_files("10000066", "50000601", ["PA"], ok_report)
    other = dicom_id("other-subject")
    meta.append([other, "10000077", "50000601", "CHEST", "LATERAL", 1, 1, 1, 1, "C", "x", "E"])
    split.append([other, "50000601", "10000077", "train"])
    adapter.append((other, "under subject"))
    # a study with no split row
    study_files("10000088", "50000801", ["PA"], ok_report, sp=None)
    adapter.append(("50000801", "no row in the split CSV"))
    # split rows: an invalid value (the study keeps its other, valid row) and a conflicting value
    ds = study_files("10000099", "50000901", ["PA", "LATERAL"], ok_report)
    split[-1][3] = "training"
    adapter.append((ds[1], "split value 'training'"))
    ds = study_files("10000111", "50001101", ["PA", "LATERAL"], ok_report)
    split[-1][3] = "test"
    adapter.append((ds[1], "kept 'train'"))
    # reports: absent, empty, not UTF-8, neither section; and a directory where the report should be
    study_files("10000122", "50001201", ["PA"], None)
    adapter.append(("s50001201.txt", "not found"))
    study_files("10000133", "50001301", ["PA"], "   \n\n  ")
    adapter.append(("s50001301.txt", "empty"))
    study_files("10000144", "50001401", ["PA"], "FINDINGS: caf\xe9 \xff\xfe lungs".encode("latin-1"))
    adapter.append(("s50001401.txt", "UTF-8"))
    study_files("10000155", "50001501", ["PA"], " EXAMINATION: CHEST\n INDICATION: cough\n COMPARISON: none\n")
    adapter.append(("s50001501.txt", "no FINDINGS or IMPRESSION"))
    study_files("10000166", "50001601", ["PA"], None)
    (jr / report_rel("10000166", "50001601")).mkdir(parents=True)
    adapter.append(("s50001601.txt", "folder"))
    # label rows: a non-numeric value, a duplicate study
    study_files("10000177", "50001701", ["PA"], ok_report)
    chex.append(["10000177", "50001701"] + ["maybe" if n == "Cardiomegaly" else "" for n in LABELS])
    adapter.append(("50001701", "Cardiomegaly='maybe'"))
    chex.append(["10000011", "50000101"] + ["1.0" if n == "Fracture" else "" for n in LABELS])
    adapter.append(("50000101", "duplicate label row"))
    # engine-only: a metadata row whose JPEG is absent, and a JPEG that is not a JPEG
    gone = study_files("10000188", "50001801", ["PA"], ok_report, images=False)
    engine.append((f"{gone[0]}.jpg", "not found"))
    broken = study_files("10000199", "50001901", ["PA"], ok_report, images=False)
    p = jr / jpg_rel("10000199", "50001901", broken[0])
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    engine.append((f"{broken[0]}.jpg", ""))
    write_csv(jr / "mimic-cxr-2.0.0-metadata.csv", META_COLS, meta)
    write_csv(jr / "mimic-cxr-2.0.0-split.csv", SPLIT_COLS, split, gz=True)
    write_csv(jr / "mimic-cxr-2.0.0-chexpert.csv", LABEL_COLS, chex, gz=True)
    # (no negbio file: the default labels=chexpert never asks for it)

    # ---------------------------------------------------------------- MS-CXR (source ms_cxr)
    mr = root / "ms-cxr"
    ms = write_ms_cxr(mr, images_root=jr)
    rows: list[list[Any]] = []
    with open(mr / ms["csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    W, H = MSCXR_SIZE

    def ms_row(tag: str, **over: Any) -> list[Any]:
        subject, study = "10000211", "50002101"
        d = over.pop("dicom_id", dicom_id(f"ms-{tag}"))
        write_jpeg(jr / jpg_rel(subject, study, d), d)
        r = dict(dicom_id=d, category_name="Pneumonia", label_text=f"opacity {tag}",
                 path=jpg_rel(subject, study, d), x=10, y=20, w=100, h=50, image_width=W, image_height=H,
                 split="train")
        r.update(over)
        rows.append([r[c] for c in MSCXR_COLS_11])
        return [r[c] for c in MSCXR_COLS_11]

    ms_row("nonnumeric", x="abc")
    adapter.append(("opacity nonnumeric", "'x'"))
    ms_row("zero-w", w=0)
    adapter.append(("opacity zero-w", "empty"))
    ms_row("neg-h", h=-5)
    adapter.append(("opacity neg-h", "empty"))
    ms_row("outside", x=350, w=100)
    adapter.append(("opacity outside", "outside"))
    ms_row("bad-size", image_width=0)
    adapter.append(("opacity bad-size", "not positive"))
    ms_row("escape", path="../../etc/passwd")
    adapter.append(("opacity escape", "escapes"))
    ms_row("notmimic", path="images/chest.jpg")
    adapter.append(("opacity notmimic", "not a MIMIC-CXR"))
    ms_row("mismatch", path=jpg_rel("10000211", "50002101", dicom_id("somebody-else")))
    adapter.append(("opacity mismatch", "does not match"))
    dup = ms_row("dupbox")
    rows.append(list(dup))
    adapter.append(("opacity dupbox", "duplicate of the box"))
    ms_row("badsplit", split="dev")
    adapter.append(("opacity badsplit", "split value 'dev'"))
    d2 = dicom_id("ms-two-sizes")
    ms_row("two-sizes", dicom_id=d2)
    ms_row("two-sizes", dicom_id=d2, x=200, image_width=W + 8)
    adapter.append(("opacity two-sizes", "differs"))
    ms_row("blank", label_text="   ")
    adapter.append((dicom_id("ms-blank"), "label_text is empty"))
    rows.append([dicom_id("ms-shortrow"), "Edema", "opacity shortrow", "files/p10/p1/s5/x.jpg"])
    adapter.append(("opacity shortrow", "fields"))
    # engine-only: a good phrase whose JPEG is absent
    gone_ms = dicom_id("ms-gone")
    rows.append([gone_ms, "Edema", "opacity gone", jpg_rel("10000211", "50002101", gone_ms), 10, 20, 30, 40, W, H,
                 "train"])
    engine.append((f"{gone_ms}.jpg", "not found"))
    write_csv(mr / ms["csv"], MSCXR_COLS_11, rows)

    # ---------------------------------------------------------------- MIMIC-CXR-VQA (source mimic_cxr_vqa)
    vr = root / "mimic-cxr-vqa"
    write_mimic_cxr_vqa(vr, images_root=jr, folder="")
    train = json.loads((vr / "train.json").read_text())
    s0, st0 = STUDIES[0][0], STUDIES[0][1]
    d0 = _dicoms(st0, STUDIES[0][2])[1][1]

    def vqa(idx: int, **over: Any) -> dict[str, Any]:
        e = _vqa_entry("train", idx, s0, st0, d0, f"Is there edema? (q{idx})", ["no"], "presence", "verify")
        e.update(over)
        train.append(e)
        return e

    vqa(100)
    vqa(100, question="Is there edema in the left lung? (duplicate idx)")
    adapter.append(("duplicate idx", "duplicate idx 100"))
    vqa(101, content_type="color")
    adapter.append(("(q101)", "content_type 'color'"))
    vqa(102, image_path="../../etc/passwd")
    adapter.append(("(q102)", "escapes"))
    vqa(103, image_path=f"p10/p{s0}/s{st0}/{dicom_id('someone-else')}.jpg")
    adapter.append(("(q103)", "does not match image_id"))
    vqa(104, answer=3)
    adapter.append(("(q104)", "'answer' is 3"))
    vqa(105, question="   ")
    adapter.append(('"idx": 105', "'question' is missing"))
    train.append("not an object")
    adapter.append(("not an object", "not a JSON object"))
    e = vqa(106)
    del e["image_id"]
    adapter.append(("(q106)", "image_id"))
    vqa(107, subject_id="abc", image_path="")
    adapter.append(("(q107)", "subject_id 'abc'"))
    vqa(108)["idx"] = "seven"
    adapter.append(("(q108)", "'idx' is 'seven'"))
    # engine-only: a question whose JPEG is absent
    gone_v = dicom_id("vqa-gone")
    vqa(109, image_id=gone_v, image_path=f"p10/p{s0}/s{st0}/{gone_v}.jpg")
    engine.append((f"{gone_v}.jpg", "not found"))
    (vr / "train.json").write_text(json.dumps(train, indent=2), encoding="utf-8")
    (vr / "valid.json").write_text('[{"split": "valid", "idx": 0, "question": "Is there', encoding="utf-8")
    adapter.append(("valid.json", "malformed JSON"))
    (vr / "test.json").unlink()
    adapter.append(("test.json", "missing"))

    # ---------------------------------------------------------------- Medical-CXR-VQA (source medical_cxr_vqa)
    qr = root / "medical-cxr-vqa"
    write_medical_cxr_vqa(qr, images_root=jr)
    with open(qr / "medical_cxr_vqa_questions.csv", newline="", encoding="utf-8") as f:
        qrows = list(csv.reader(f))[1:]
    s2, st2 = STUDIES[2][0], STUDIES[2][1]
    qrows.append([st2, s2, "difference", "what has changed compared to the reference image?", "nothing", "train"])
    adapter.append(("what has changed", "question_type 'difference'"))
    qrows.append([st2, s2, "presence", "is there edema?", "no", "val"])
    qrows.append([st2, s2, "presence", "is there edema?", "yes", "val"])
    adapter.append(("is there edema?", "duplicate question"))
    qrows.append(["59999999", "10009999", "presence", "is there atelectasis?", "no", "train"])
    adapter.append(("59999999", "no image known"))
    qrows.append([st2, "x1", "presence", "is there pneumonia?", "no", "train"])
    adapter.append(("is there pneumonia?", "subject_id 'x1'"))
    qrows.append([st2, s2, "level", "what level is the atelectasis?", "", "train"])
    adapter.append(("what level is the atelectasis?", "answer is empty"))
    qrows.append([st2, s2, "view", "is this a PA view?", "no", "dev"])
    adapter.append(("is this a PA view?", "split value 'dev'"))
    qrows.append([st2, s2, "presence", "is there a fracture?", "no", "train", "surplus"])
    adapter.append(("is there a fracture?", "fields"))
    write_csv(qr / "medical_cxr_vqa_questions.csv", MEDVQA_COLS, qrows)
    with open(qr / "mimic_all.csv", newline="", encoding="utf-8") as f:
        arows = list(csv.reader(f))[1:]
    bad_all = ["10009998", "59999998"] + [""] * len(LABELS) + ["../x", "postero-anterior", "train", 1, 1]
    arows.append(bad_all)
    adapter.append(("59999998", "dicom_id '../x'"))
    # engine-only: a study whose (mimic_all) image is absent
    gone_q = dicom_id("medvqa-gone")
    arows.append(["10000011", "50000199"] + [""] * len(LABELS) + [gone_q, "postero-anterior", "train", 1, 1])
    qrows_extra = [["50000199", "10000011", "presence", "is there edema?", "no", "train"]]
    engine.append((f"{gone_q}.jpg", "not found"))
    write_csv(qr / "mimic_all.csv", MIMIC_ALL_COLS, arows)
    write_csv(qr / "medical_cxr_vqa_questions.csv", MEDVQA_COLS, qrows + qrows_extra)
    return adapter, engine
