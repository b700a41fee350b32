"""Tiny native-format copies of the public CXR datasets for tests (a helper module, not a test).

Everything here is synthetic: made-up ids, made-up report sentences, seeded-noise images (48x40, no two alike).
Only the *format* follows the published datasets — file names, folder layout, column names and order, header
quirks, XML element names. Import from a test in ``tests/data`` as ``import fx_public``.

* :func:`write_vindr` — VinDr-CXR (PhysioNet 1.0.0): ``annotations/*.csv`` + ``train|test/<id>.dicom``.
* :func:`write_chestxray14` — NIH ChestX-ray14: ``Data_Entry_2017.csv`` (or ``_v2020``), ``BBox_List_2017.csv``,
  the split lists, PNGs under ``images_00N/images/`` (Kaggle layout) or ``images/``.
* :func:`write_iu_xray` — IU X-ray / Open-i: ``ecgen-radiology/<n>.xml`` + ``NLMCXR_png/<image id>.png``.
* :func:`write_public_hostile` — the three formats again, one root per source, with 51 bad inputs among good ones.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 48, 40  # fixture image size (width, height)

VINDR_LABELS_TRAIN = [
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
]
VINDR_LABELS_TEST = [c if c != "Other diseases" else "Other disease" for c in VINDR_LABELS_TRAIN]

NIH_HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
NIH_HEADER_2020 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,"
                   "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
NIH_BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


# ---------------------------------------------------------------------------------------------------- helpers
def _seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def noise(key: str) -> np.ndarray:
    return np.random.default_rng(_seed(key)).integers(0, 256, size=(H, W), dtype=np.uint8)


def png_bytes(key: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise(key), "L").save(buf, format="PNG")
    return buf.getvalue()


def dicom_bytes(key: str, **kw) -> bytes:
    from fx_dicom import make_dicom

    px = np.random.default_rng(_seed(key)).integers(0, 4096, size=(H, W), dtype=np.uint16)
    return make_dicom(px, bits_stored=12, **kw)


def vindr_id(key: str) -> str:
    """A synthetic 32-hex image id shaped like VinDr's."""
    return hashlib.md5(f"fx-vindr-{key}".encode()).hexdigest()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _csv(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "" if v is None else (str(int(v)) if float(v).is_integer() else str(v))


# ---------------------------------------------------------------------------------------------------- VinDr-CXR
def _vindr_box_row(iid: str, rad: str | None, cls: str, box) -> str:
    coords = ",".join(_fmt(v) for v in (box or (None,) * 4))
    return f"{iid},{rad}," + f"{cls},{coords}" if rad is not None else f"{iid},{cls},{coords}"


def _vindr_label_row(iid: str, rad: str | None, positives: set[str], columns: list[str]) -> str:
    vals = ",".join("1" if (c in positives or (c == "Other disease" and "Other diseases" in positives)) else "0"
                    for c in columns)
    return f"{iid},{rad},{vals}" if rad is not None else f"{iid},{vals}"


def write_vindr(root: str | Path) -> dict:
    """A VinDr-CXR root: 5 training images (3 readers each), 2 test images, label files and DICOMs.

    Training cases (boxes on the 48x40 images):

    * ``merge``: Cardiomegaly boxed by R1, R2, R3 close together -> consensus one box [11, 20, 30, 34] (the mean);
      R1 alone also boxes Nodule/Mass -> no consensus for it. Labels add COPD (R1, R2 -> consensus finding).
    * ``two``: Pleural effusion, R1 boxes both sides, R2 the left, R3 the right -> two consensus boxes
      [2.5, 10.5, 14.5, 30.5] and [30.5, 9.5, 44.5, 29.5].
    * ``apart``: Atelectasis by R1 and R2 far apart (IoU 0) -> no consensus (two clusters, one reader each);
      Calcification by R1, R2 with IoU 0.4286 -> merged at fusion_iou 0.4 to [12, 10, 22, 20], not at 0.5.
    * ``normal``: "No finding" from all three readers -> no Item.
    * ``self``: R1 alone draws two overlapping Rib fracture boxes -> never a consensus (one vote per reader).

    Test cases (no rad_id): ``t_boxes`` with Aortic enlargement (1 box) and Nodule/Mass (2 boxes); ``t_normal``.
    """
    root = Path(root)
    ids = {k: vindr_id(k) for k in ("merge", "two", "apart", "normal", "self", "t_boxes", "t_normal")}
    m, t, a, n, s = (ids[k] for k in ("merge", "two", "apart", "normal", "self"))
    train = [  # (image, reader, class, box)
        (m, "R1", "Cardiomegaly", (10, 20, 30, 34)), (m, "R2", "Cardiomegaly", (11, 21, 31, 35)),
        (m, "R3", "Cardiomegaly", (12, 19, 29, 33)), (m, "R1", "Nodule/Mass", (2, 2, 6, 6)),
        (t, "R1", "Pleural effusion", (2, 10, 14, 30)), (t, "R1", "Pleural effusion", (30, 10, 44, 30)),
        (t, "R2", "Pleural effusion", (3, 11, 15, 31)), (t, "R3", "Pleural effusion", (31, 9, 45, 29)),
        (a, "R1", "Atelectasis", (2, 2, 12, 12)), (a, "R2", "Atelectasis", (30, 25, 44, 38)),
        (a, "R1", "Calcification", (10, 10, 20, 20)), (a, "R2", "Calcification", (14, 10, 24, 20)),
        (a, "R3", "No finding", None),
        (n, "R1", "No finding", None), (n, "R2", "No finding", None), (n, "R3", "No finding", None),
        (s, "R1", "Rib fracture", (5, 5, 15, 15)), (s, "R1", "Rib fracture", (6, 6, 16, 16)),
        (s, "R2", "No finding", None), (s, "R3", "No finding", None),
    ]
    # physionet files are not sorted by image: shuffle deterministically
    order = np.random.default_rng(7).permutation(len(train))
    lines = ["image_id,rad_id,class_name,x_min,y_min,x_max,y_max"]
    lines += [_vindr_box_row(*train[i]) for i in order]
    _write(root / "annotations/annotations_train.csv", _csv(lines))

    tb, tn = ids["t_boxes"], ids["t_normal"]
    test = [(tb, "Aortic enlargement", (20, 5, 30, 15)), (tb, "Nodule/Mass", (40, 30, 46, 38)),
            (tb, "Nodule/Mass", (2, 2, 6, 6)), (tn, "No finding", None)]
    lines = ["image_id,class_name,x_min,y_min,x_max,y_max"] + [_vindr_box_row(i, None, c, b) for i, c, b in test]
    _write(root / "annotations/annotations_test.csv", _csv(lines))

    pos: dict[tuple[str, str], set[str]] = {}
    for iid, rad, cls, _ in train:
        pos.setdefault((iid, rad), set()).add(cls)
    pos[m, "R1"].add("COPD")
    pos[m, "R2"].add("COPD")
    lines = ["image_id,rad_id," + ",".join(VINDR_LABELS_TRAIN)]
    lines += [_vindr_label_row(i, r, p, VINDR_LABELS_TRAIN) for (i, r), p in sorted(pos.items())]
    _write(root / "annotations/image_labels_train.csv", _csv(lines))
    lines = ["image_id," + ",".join(VINDR_LABELS_TEST),
             _vindr_label_row(tb, None, {"Aortic enlargement", "Nodule/Mass", "Other diseases"}, VINDR_LABELS_TEST),
             _vindr_label_row(tn, None, {"No finding"}, VINDR_LABELS_TEST)]
    _write(root / "annotations/image_labels_test.csv", _csv(lines))

    for k in ("merge", "two", "apart", "normal", "self"):
        _write(root / f"train/{ids[k]}.dicom", dicom_bytes(k))
    for k in ("t_boxes", "t_normal"):
        _write(root / f"test/{ids[k]}.dicom", dicom_bytes(k))
    return {
        "ids": ids,
        "counts": {"each": 14, "consensus": 5, "both": 17},  # train each 12 / consensus 3, test 2
        "merged_box": [11.0, 20.0, 30.0, 34.0],
        "two_boxes": [[2.5, 10.5, 14.5, 30.5], [30.5, 9.5, 44.5, 29.5]],
        "calcification_box": [12.0, 10.0, 22.0, 20.0],
    }


# ---------------------------------------------------------------------------------------------------- ChestX-ray14
def _nih_entry(name: str, labels: str, pid, view: str, trailing: bool, follow: int = 0) -> str:
    row = f"{name},{labels},{follow},{pid},{40 + int(_seed(name) % 40)},M,{view},2500,2048,0.168,0.168"
    return row + ("," if trailing else "")


def _nih_box(name: str, label: str, x, y, w, h) -> str:
    return f"{name},{label},{_fmt(x)},{_fmt(y)},{_fmt(w)},{_fmt(h)},,,"


def write_chestxray14(root: str | Path, *, v2020: bool = False, layout: str = "kaggle") -> dict:
    """A ChestX-ray14 root with 5 images, 4 of them boxed (6 grounding Items).

    ``v2020``: write ``Data_Entry_2017_v2020.csv`` (no trailing comma, "Patient Sex") instead of the 2017 file.
    ``layout``: ``kaggle`` (``images_001/images/``, ``images_002/images/``) or ``flat`` (``images/``).
    """
    root = Path(root)
    imgs = {  # name: (patient, follow-up, view, Finding Labels, split)
        "00000001_000.png": (1, 0, "PA", "Cardiomegaly|Effusion", "test"),
        "00000002_001.png": (2, 1, "AP", "Infiltration|Mass|Nodule", "train"),
        "00000003_000.png": (3, 0, "PA", "No Finding", "test"),
        "00000004_000.png": (4, 0, "PA", "No Finding", "train"),
        "00000005_002.png": (5, 2, "PA", "Atelectasis", "train"),
    }
    boxes = [
        ("00000001_000.png", "Cardiomegaly", 100.5, 200.25, 300, 150),
        ("00000001_000.png", "Effusion", 600, 500, 200, 250),
        ("00000001_000.png", "Effusion", 50, 520, 180, 240),
        ("00000002_001.png", "Infiltrate", 400, 300, 250, 200),
        ("00000002_001.png", "Mass", 700, 100, 120, 110),
        ("00000003_000.png", "Pneumothorax", 10, 20, 300, 400),
        ("00000005_002.png", "Atelectasis", 1000, 10, 25.5, 20),  # overshoots 1024 by 1.5 px: clipped
    ]
    entry = "Data_Entry_2017_v2020.csv" if v2020 else "Data_Entry_2017.csv"
    lines = [NIH_HEADER_2020 if v2020 else NIH_HEADER_2017]
    lines += [_nih_entry(nm, lab, p, v, not v2020, f) for nm, (p, f, v, lab, _) in imgs.items()]
    _write(root / entry, _csv(lines))
    _write(root / "BBox_List_2017.csv", _csv([NIH_BBOX_HEADER] + [_nih_box(*b) for b in boxes]))
    _write(root / "train_val_list.txt", _csv([nm for nm, v in imgs.items() if v[4] == "train"]))
    _write(root / "test_list.txt", _csv([nm for nm, v in imgs.items() if v[4] == "test"]))
    paths = {}
    for k, nm in enumerate(imgs):
        rel = f"images_00{1 + k // 2}/images/{nm}" if layout == "kaggle" else f"images/{nm}"
        _write(root / rel, png_bytes(nm))
        paths[nm] = rel
    return {
        "entry_file": entry,
        "paths": paths,
        "count": 6,
        "record_ids": sorted(["00000001_000-grounding-cardiomegaly", "00000001_000-grounding-effusion",
                              "00000002_001-grounding-infiltration", "00000002_001-grounding-mass",
                              "00000003_000-grounding-pneumothorax", "00000005_002-grounding-atelectasis"]),
    }


# ---------------------------------------------------------------------------------------------------- IU X-ray
_IU_TEMPLATE = """<?xml version="1.0" encoding="{encoding}"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{uid}"/>
   <pmcId id="{num}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{num}"/>
   <licenseType>open-access</licenseType>
   <publisher>Synthetic fixture</publisher>
   <title>Synthetic Chest X-ray Collection</title>
   <MedlineCitation Owner="Fixture" Status="synthetic">
      <Article PubModel="Electronic">
         <Journal><JournalIssue><PubDate><Year>2000</Year></PubDate></JournalIssue></Journal>
         <ArticleTitle>Synthetic Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Synthetic indication XXXX.</AbstractText>
{sections}
         </Abstract>
         <Language>eng</Language>
      </Article>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>
{images}
</eCitation>
"""


def iu_xml(uid: str, num: int, findings: str | None, impression: str | None, image_ids: list[str],
           mesh: list[str] = ("normal",), encoding: str = "utf-8", raw_images: str | None = None) -> str:
    secs = []
    if findings is not None:
        secs.append(f'            <AbstractText Label="FINDINGS">{findings}</AbstractText>')
    if impression is not None:
        secs.append(f'            <AbstractText Label="IMPRESSION">{impression}</AbstractText>')
    images = raw_images if raw_images is not None else "\n".join(
        f'   <parentImage id="{i}">\n      <figureId>F{k}</figureId>\n'
        f'      <caption>Xray Chest PA and Lateral</caption>\n'
        f'      <panel type="single"><url>/synthetic/extract/{i}.jpg</url></panel>\n   </parentImage>'
        for k, i in enumerate(image_ids, 1))
    return _IU_TEMPLATE.format(encoding=encoding, uid=uid, num=num, sections="\n".join(secs),
                               mesh="\n".join(f"      <major>{t}</major>" for t in mesh), images=images)


def write_iu_xray(root: str | Path, *, images_dir: str = "NLMCXR_png") -> dict:
    """An IU X-ray root: reports 1.xml, 2.xml, 10.xml (CXR1, CXR2, CXR10) with 2, 2 and 3 images -> 6 Items."""
    root = Path(root)
    reports = {
        1: ("CXR1", "The heart is normal in size. The lungs are clear.", "No acute disease.",
            ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"], ["normal"]),
        2: ("CXR2", "Borderline heart size. XXXX opacity in the left base.", "Borderline cardiomegaly. XXXX.",
            ["CXR2_IM-0652-1001", "CXR2_IM-0652-2001"], ["Cardiomegaly/borderline", "Opacity/lung/base/left"]),
        10: ("CXR10", "Lungs are\n   hyperexpanded.\n\tNo effusion.", "Hyperexpanded   lungs.",
             ["CXR10_IM-0002-2001", "CXR10_IM-0002-1001", "CXR10_IM-0002-3001"],
             ["Pulmonary Emphysema", "Cardiomegaly", "Pulmonary Emphysema/mild"]),
    }
    for num, (uid, f, i, images, mesh) in reports.items():
        _write(root / f"ecgen-radiology/{num}.xml", iu_xml(uid, num, f, i, images, mesh))
        for img in images:
            _write(root / f"{images_dir}/{img}.png", png_bytes(img))
    return {
        "count": 6,
        "images": {r[0]: [f"{images_dir}/{x}.png" for x in r[3]] for r in reports.values()},
        "findings": {"CXR1": "The heart is normal in size. The lungs are clear.",
                     "CXR10": "Lungs are hyperexpanded. No effusion."},
        "mesh": {"CXR1": [], "CXR2": ["Cardiomegaly", "Opacity"], "CXR10": ["Pulmonary Emphysema", "Cardiomegaly"]},
    }


# ---------------------------------------------------------------------------------------------------- hostile
def write_public_hostile(root: str | Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Bad inputs mixed with good ones, in ``root/vindr_cxr``, ``root/chestxray14`` and ``root/iu_xray`` (each
    the dataset root of the source of that name, default options).

    Returns ``(adapter_expected, engine_expected)``: ``(substring of "<file> <record>", substring of the
    reason)`` pairs. ``adapter_expected`` — 51 inputs the adapters must quarantine (one Quarantine each, and no
    other). ``engine_expected`` — images the adapters pass on (they never open images) that only the engine can
    find bad: absent files (reason substring "file not found", the wording of ``Root.read_bytes``) and
    undecodable ones (reason substring "" — any reason). The good inputs give 6 VinDr, 5 ChestX-ray14 and 15
    IU X-ray Items.
    """
    root = Path(root)
    adapter: list[tuple[str, str]] = []
    engine: list[tuple[str, str]] = []

    # ---------------------------------------------------------------- VinDr-CXR: 22 bad inputs
    v = root / "vindr_cxr"
    g1, g2, g3, g4, dup, s1 = (vindr_id(f"hostile-{k}") for k in ("g1", "g2", "g3", "g4", "dup", "s1"))
    tr = "annotations_train.csv"
    rows = [
        (f"{g1},R1,Cardiomegaly,10,20,30,34", None),
        (f"{g1},R2,Cardiomegaly,11,21,31,35", None),
        (f"{g1},R3,Cardiomegaly,,,,", "row 3: class 'Cardiomegaly' without a complete box"),
        (f"{g1},R3,Aortic enlargement,-5,2,10,12", "row 4: negative coordinate"),
        (f"{g1},R3,Atelectasis,30,10,20,20", "row 5: empty or inverted box"),
        (f"{g1},R3,Edema,10,10,10,20", "row 6: empty or inverted box"),
        (f"{g1},R3,Emphysema,abc,1,2,3", "row 7: x_min 'abc' is not a number"),
        (f"{g1},R3,ILD,1,1,inf,5", "row 8: x_max 'inf' is not finite"),
        (f"{g1},R3,Dragon scales,1,1,5,5", "row 9: unknown class_name"),
        (f"{g1},R3,,1,1,5,5", "row 10: empty class_name"),
        (",R3,Cardiomegaly,1,1,5,5", "row 11: empty image_id"),
        ("../../etc/passwd,R1,Cardiomegaly,1,1,5,5", "row 12: image_id '../../etc/passwd' is not a plain file"),
        (f"{g1},,Cardiomegaly,1,1,5,5", "row 13: empty rad_id"),
        (f"{g1},R1,Cardiomegaly,10,20,30,34", "row 14: duplicate of row 1"),
        (f"{g2},R1,No finding,1,2,3,4", "row 15: 'No finding' row has box coordinates"),
        (f"{g2},R2,No finding", "row 16: has 3 fields"),
        (f"{g2},R3,Cardiomegaly,1,1,5,5,extra,more", "row 17: has more fields"),
        (f"{g1},R1,Infiltration,10,10,20,nan", "row 18: class 'Infiltration' without a complete box"),
        (f"{dup},R1,Cardiomegaly,1,1,5,5", None),  # also in the test file: reported once, below
        (f"{g3},R1,Pleural effusion,2,2,20,20", None),  # its DICOM is missing: engine
        (f"{g4},R1,Pleural effusion,2,2,20,20", None),  # its DICOM has no pixel data: engine
    ]
    _write(v / f"annotations/{tr}", _csv(["image_id,rad_id,class_name,x_min,y_min,x_max,y_max"]
                                         + [r for r, _ in rows]))
    adapter += [(tr, reason) for _, reason in rows if reason]
    te = "annotations_test.csv"
    _write(v / f"annotations/{te}", _csv([
        "image_id,class_name,x_min,y_min,x_max,y_max",
        f"{s1},Nodule/Mass,2,2,6,6",
        f"{s1},Pneumothorax,NaN,NaN,NaN,NaN",
        f"{dup},Cardiomegaly,1,1,5,5",
        f"{s1},Nodule/Mass,2,2,6,6",
    ]))
    adapter += [(te, "row 2: class 'Pneumothorax' without a complete box"), (dup, "appears in both"),
                (te, "row 4: duplicate of row 1")]
    lab = ",".join(VINDR_LABELS_TRAIN)
    zeros = ["0"] * len(VINDR_LABELS_TRAIN)
    maybe = list(zeros)
    maybe[3] = "maybe"
    _write(v / "annotations/image_labels_train.csv", _csv([
        f"image_id,rad_id,{lab}",
        f"{g1},R1," + ",".join(zeros[:3] + ["1"] + zeros[4:]),
        f"{g1},R2," + ",".join(maybe),
        f"{g1},R1," + ",".join(zeros),
    ]))
    adapter += [("image_labels_train.csv", "row 2: column 'Cardiomegaly' value 'maybe' is not 0/1"),
                ("image_labels_train.csv", "row 3: duplicate of row 1")]
    # a header variant (case, spaces) is no bad input: read as published, nothing quarantined (a missing column
    # stops the source instead: tests/data/test_headers.py)
    _write(v / "annotations/image_labels_test.csv", _csv([
        f" Image_ID ,{','.join(c.upper() for c in VINDR_LABELS_TEST)}", f"{s1}," + ",".join(zeros)]))
    for iid in (g1, g2, dup):
        _write(v / f"train/{iid}.dicom", dicom_bytes(iid))
    _write(v / f"test/{s1}.dicom", dicom_bytes(s1))
    _write(v / f"test/{dup}.dicom", dicom_bytes(dup + "t"))
    _write(v / f"train/{g4}.dicom", dicom_bytes(g4, pixel_data=False))
    engine += [(f"train/{g3}.dicom", "file not found"), (f"train/{g4}.dicom", "")]

    # ---------------------------------------------------------------- ChestX-ray14: 16 bad inputs
    c = root / "chestxray14"
    n = {k: f"{100 + k:08d}_000.png" for k in range(1, 10)}
    bb = "BBox_List_2017.csv"
    brows = [
        (_nih_box(n[1], "Cardiomegaly", 100, 100, 200, 200), None),
        (_nih_box(n[1], "Fracture", 10, 10, 20, 20), "row 2: unknown Finding Label 'Fracture'"),
        (_nih_box(n[1], "Mass", 10, 10, 0, 20), "row 3: box width and height must be positive"),
        (_nih_box(n[1], "Nodule", -3, 10, 20, 20), "row 4: negative box origin"),
        (_nih_box(n[1], "Nodule", None, 10, 20, 20), "row 5: box x is empty"),
        (_nih_box(n[1], "Effusion", 1000, 10, 100, 20), "row 6: box [1000.0, 10.0, 1100.0, 30.0] extends beyond"),
        (f"{n[1]},Effusion,10,10,20,twelve,,,", "row 7: box h 'twelve' is not a number"),
        (_nih_box(n[1], "Cardiomegaly", 100, 100, 200, 200), "row 8: duplicate of row 1"),
        (_nih_box(n[9], "Mass", 10, 10, 20, 20), "is not in Data_Entry"),
        (_nih_box("../escape.png", "Mass", 10, 10, 20, 20), "row 10: Image Index '../escape.png' is not a plain"),
        (_nih_box(n[2], "Mass", 10, 10, 20, 20), "listed in both"),
        (_nih_box(n[3], "Mass", 10, 10, 20, 20), "listed in neither"),
        (_nih_box(n[4], "Mass", 10, 10, 20, 20), None),  # duplicate Data_Entry rows: reported there
        (_nih_box(n[5], "Mass", 10, 10, 20, 20), None),  # bad Patient ID: reported in Data_Entry
        (_nih_box(n[6], "Mass", 10, 10, 20, 20), None),  # two image files with this name
        (_nih_box("", "Mass", 1, 1, 2, 2), "row 16: empty Image Index"),
        (_nih_box(n[7], "Mass", 10, 10, 20, 20), None),  # image absent: engine
        (_nih_box(n[8], "Mass", 10, 10, 20, 20), None),  # zero-byte PNG: engine
        (f"{n[1]},Effusion,1,1,nan,5,,,", "row 19: box w 'nan' is not finite"),
    ]
    _write(c / bb, _csv([NIH_BBOX_HEADER] + [r for r, _ in brows]))
    where = {"is not in Data_Entry": n[9], "listed in both": n[2], "listed in neither": n[3]}
    adapter += [(where.get(reason, bb), reason) for _, reason in brows if reason]
    entries = [_nih_entry(n[k], "Mass", 100 + k, "PA", True) for k in (1, 2, 3, 4, 6, 7, 8)]
    entries.append(_nih_entry(n[4], "Mass|Nodule", 104, "PA", True))
    entries.append(_nih_entry(n[5], "Mass", "abc", "PA", True))
    _write(c / "Data_Entry_2017.csv", _csv([NIH_HEADER_2017] + entries))
    adapter += [("Data_Entry_2017.csv", "row 8: duplicate Data_Entry row for " + n[4]),
                ("Data_Entry_2017.csv", "row 9: Patient ID 'abc' is not a number")]
    _write(c / "train_val_list.txt", _csv([n[1], n[2], n[4], n[5], n[6], n[7], n[8]]))
    _write(c / "test_list.txt", _csv([n[2]]))
    for k in (1, 2, 3, 4, 5, 6):
        _write(c / f"images_001/images/{n[k]}", png_bytes(n[k]))
    _write(c / f"images_002/images/{n[6]}", png_bytes(n[6] + "copy"))
    adapter.append((f"images_002/images/{n[6]}", "duplicate image file name"))
    _write(c / f"images_002/images/{n[8]}", b"")
    engine += [(f"images/{n[7]}", "file not found"), (f"images_002/images/{n[8]}", "")]

    # ---------------------------------------------------------------- IU X-ray: 13 bad inputs
    u = root / "iu_xray"
    rep = u / "ecgen-radiology"
    good_f, good_i = "The lungs are clear.", "No acute disease."

    def img(k: int, j: int = 1) -> str:
        return f"CXR{k}_IM-{k:04d}-{j}001"

    def put(k: int, text: str | bytes, images: list[str] = ()) -> None:
        _write(rep / f"{k}.xml", text)
        for i in images:
            _write(u / f"NLMCXR_png/{i}.png", png_bytes(i))

    put(1, iu_xml("CXR1", 1, good_f, good_i, [img(1), img(1, 2)]), [img(1), img(1, 2)])
    put(2, iu_xml("CXR2", 2, good_f, good_i, [img(2)]).replace("</Abstract>", "</Abstrct>"), [img(2)])
    put(3, iu_xml("CXR3", 3, good_f, good_i, []))
    put(4, iu_xml("CXR4", 4, "  ", "", [img(4)]), [img(4)])
    put(5, iu_xml("CXR5", 5, "Caf\u00e9 lungs.", good_i, [img(5)]).encode("latin-1"), [img(5)])
    put(6, iu_xml("CXR6", 6, good_f, good_i, ["../../../etc/passwd", img(6)]), [img(6)])
    put(7, iu_xml("CXR1", 7, good_f, good_i, [img(7)]), [img(7)])
    laughs = ('<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>\n'
              '<eCitation><uId id="CXR8"/><AbstractText Label="FINDINGS">&lol2;</AbstractText></eCitation>\n')
    put(8, laughs)
    put(9, b"")
    put(10, iu_xml("CXR10", 10, good_f, good_i, [], raw_images=f'   <parentImage/>\n   <parentImage id="{img(10)}"/>'),
        [img(10)])
    put(11, iu_xml("CXR11", 11, good_f, good_i, [img(11), img(11)]), [img(11)])
    put(12, "<?xml version='1.0' encoding='utf-8'?>\n<html><body>not a report</body></html>\n")
    put(13, iu_xml("CXR13", 13, good_f, None, [img(13)]), [img(13)])
    put(14, iu_xml("CXR14", 14, good_f, good_i, [img(14)]))  # image absent: engine
    put(15, iu_xml("CXR15", 15, good_f, good_i, [img(15)]))
    _write(u / f"NLMCXR_png/{img(15)}.png", b"\x89PNG\r\n\x1a\nthis is not a png")
    put(16, iu_xml("CXR16", 16, "Caf\u00e9-au-lait lesion of XXXX.", good_i, [img(16)],
                   encoding="ISO-8859-1").encode("latin-1"), [img(16)])  # valid: declared latin-1
    adapter += [
        ("2.xml", "malformed XML"),
        ("3.xml", "no parentImage"),
        ("4.xml", "no FINDINGS text"),
        ("4.xml", "no IMPRESSION text"),
        ("5.xml", "not valid utf-8"),
        ("6.xml", "parentImage id '../../../etc/passwd' is not a plain file name"),
        ("7.xml", "duplicate uId CXR1"),
        ("8.xml", "entity declarations are not allowed"),
        ("9.xml", "empty file"),
        ("10.xml", "parentImage #1 without an id"),
        ("11.xml", "duplicate parentImage id"),
        ("12.xml", "root element is <html>"),
        ("13.xml", "no IMPRESSION text"),
    ]
    engine += [(f"NLMCXR_png/{img(14)}.png", "file not found"), (f"NLMCXR_png/{img(15)}.png", "")]
    return adapter, engine
