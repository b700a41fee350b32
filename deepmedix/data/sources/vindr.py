"""VinDr-CXR (PhysioNet ``vindr-cxr`` 1.0.0): finding boxes drawn by radiologists on 18,000 PA chest radiographs.

Layout read (the PhysioNet release, paths relative to the dataset root)::

    train/<image_id>.dicom                 15,000 images, each read by 3 of 17 radiologists
    test/<image_id>.dicom                  3,000 images, labelled by the consensus of 5 radiologists
    annotations/annotations_train.csv      image_id,rad_id,class_name,x_min,y_min,x_max,y_max
    annotations/annotations_test.csv       image_id,class_name,x_min,y_min,x_max,y_max   (no rad_id)
    annotations/image_labels_train.csv     image_id,rad_id,<one 0/1 column per label>
    annotations/image_labels_test.csv      image_id,<one 0/1 column per label>          ("Other disease")

One box row per (image, reader, finding); "No finding" rows (and the global labels, should they appear there)
carry empty/NaN coordinates. Coordinates are pixels of the DICOM image as stored, so Items leave ``box_frame``
None and the engine uses the decoded image's size. Columns are found by name; ``class_id`` (the Kaggle
competition's column) and other extra columns are ignored. The image-label files are optional: they only add
image-level labels (COPD, Pneumonia, Tuberculosis, ... and the local labels) to ``Item.findings``.

Items: task ``grounding``, one per (image, class[, reader]) with all that class's boxes, prompt
``grounding_prompt(class)``, answer the class name, ``findings`` the labels given to the image (by that reader,
by the consensus, or by the test-set consensus), ``view`` "PA" (the dataset is PA only), official split from the
folder (train -> "train", test -> "test"). VinDr-CXR has no patient ids (images are anonymised one by one), so
``patient_id`` and ``study_id`` are both ``vindr:<image_id>``.

Options:

* ``readers`` — ``each`` (one Item per reader: record id ``<image_id>-grounding-<class>-<rad_id>``),
  ``consensus`` (boxes fused across readers: record id ``<image_id>-grounding-<class>``), or ``both``
  (default). The test set is already a consensus: it always gives ``<image_id>-grounding-<class>`` Items.
* ``fusion_iou`` (default 0.4) and ``min_readers`` (default 2) — the consensus rule, see :func:`fuse_boxes`.

Refused with a Quarantine entry (the reason names the file, the data row — 1 is the first row under the
header — and the value): missing files, rows with too few/many fields, empty or unsafe image ids,
unknown or empty class names, empty ``rad_id``, a finding without a complete box, non-numeric, non-finite,
negative, empty or inverted boxes, "No finding" rows with a box, duplicate rows, label values other than 0/1,
and images that appear in both the train and the test annotations (both copies are dropped). Image files are
never opened here: the engine reports missing or undecodable DICOMs. Column names are matched ignoring case and
whitespace (the label file of one release spells ``rad_ID``); a file without a required column stops the source
(:class:`~deepmedix.data.sources.base.HeaderError`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterator

from deepmedix.data.prompts import grounding_prompt
from deepmedix.data.schema import Box
from deepmedix.data.sources.base import (
    BadInput,
    ImageRef,
    Item,
    Quarantine,
    Root,
    Source,
    column_key,
    match_columns,
    read_csv_rows,
    slug,
)
from deepmedix.errors import InputError
from deepmedix.grounding import iou

__all__ = ["VinDrCXR", "fuse_boxes", "LOCAL_LABELS", "GLOBAL_LABELS"]

# The 22 local labels (boxed findings) and the 6 global labels of the VinDr-CXR paper / image-label columns.
LOCAL_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture",
)
GLOBAL_LABELS = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases")
NO_FINDING = "No finding"
# label and class names as published, looked up ignoring case and whitespace (column_key)
_CANON = {column_key(c): c for c in (*LOCAL_LABELS, *GLOBAL_LABELS, NO_FINDING)}
_CANON[column_key("Other disease")] = "Other diseases"  # the test label file's spelling
_LOCAL = set(LOCAL_LABELS)

_SPLITS = (("train", "train"), ("test", "test"))  # (folder / file suffix, official split)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_COORDS = ("x_min", "y_min", "x_max", "y_max")
_NAN = {"", "nan", "na", "none", "null"}




def fuse_boxes(boxes: list[tuple[str, list[float]]], iou_thr: float = 0.4, min_readers: int = 2) -> list[list[float]]:
    """Consensus boxes of one finding class from several readers (a weighted-box-fusion variant, equal weights).

    ``boxes`` are ``(reader, [x1, y1, x2, y2])``. They are visited in a fixed order (reader, then coordinates);
    each joins the cluster whose current fused box it overlaps most, provided that IoU is at least ``iou_thr``
    and the cluster holds no box of the same reader yet (a reader votes once per cluster); otherwise it starts a
    new cluster. A cluster's fused box is the coordinate-wise mean of its members, updated as they join. Clusters
    supported by at least ``min_readers`` distinct readers are kept; their fused boxes are returned sorted.
    """
    clusters: list[tuple[set[str], list[list[float]], list[float]]] = []
    for reader, box in sorted(boxes, key=lambda rb: (rb[0], list(rb[1]))):
        best, best_v = None, -1.0
        for c in clusters:
            if reader in c[0]:
                continue
            v = iou(box, c[2])
            if v >= iou_thr and v > best_v:
                best, best_v = c, v
        if best is None:
            clusters.append(({reader}, [list(box)], list(box)))
            continue
        best[0].add(reader)
        best[1].append(list(box))
        best[2][:] = [sum(m[i] for m in best[1]) / len(best[1]) for i in range(4)]
    out = [[round(v, 3) for v in c[2]] for c in clusters if len(c[0]) >= min_readers]
    return sorted(out)


@dataclass
class _Ann:
    row: int
    reader: str
    cls: str
    box: list[float] | None


class VinDrCXR(Source):
    name = "vindr_cxr"
    option_names = ("readers", "fusion_iou", "min_readers")

    def __init__(self, root: Root, **options: Any):
        super().__init__(root, **options)
        self.readers = str(options.get("readers", "both"))
        if self.readers not in ("each", "consensus", "both"):
            raise InputError(f"source {self.name}: option readers={self.readers!r}, expected each|consensus|both")
        try:
            self.fusion_iou = float(options.get("fusion_iou", 0.4))
            self.min_readers = int(options.get("min_readers", 2))
        except (TypeError, ValueError) as exc:
            raise InputError(f"source {self.name}: bad fusion_iou/min_readers option ({exc})") from None
        if not 0.0 < self.fusion_iou <= 1.0:
            raise InputError(f"source {self.name}: option fusion_iou={self.fusion_iou} must be in (0, 1]")
        if self.min_readers < 1:
            raise InputError(f"source {self.name}: option min_readers={self.min_readers} must be >= 1")

    # ------------------------------------------------------------------ reading
    def _annotations(self, rel: str, bad: list[Quarantine]) -> tuple[dict[str, list[_Ann]], bool]:
        """Rows of one annotations file grouped by image; the flag says whether the file has reader ids."""
        out: dict[str, list[_Ann]] = {}
        has_rad = False
        try:
            header, rows = read_csv_rows(self.root, rel)
            header = match_columns(rel, header, ("image_id", "class_name", *_COORDS), ("rad_id", "class_id"))
            col = {name: header.index(name) for name in ("image_id", "class_name", *_COORDS, "rad_id")
                   if name in header}
            has_rad = "rad_id" in col
            seen: dict[tuple, int] = {}
            for n, cells in rows:
                ann = self._ann_row(rel, n, cells, header, col, has_rad, seen, bad)
                if ann is not None:
                    out.setdefault(ann[0], []).append(ann[1])
        except BadInput as exc:  # unreadable file, or a CSV error part-way (the rows before it are kept)
            bad.append(self.bad(exc.file, exc.reason, exc.record))
        return out, has_rad

    def _ann_row(self, rel, n, cells, header, col, has_rad, seen, bad) -> tuple[str, _Ann] | None:
        def reject(reason: str, iid: str = "") -> None:
            bad.append(self.bad(rel, f"row {n}: {reason}", iid))

        first = cells[col["image_id"]] if len(cells) > col["image_id"] else ""
        if len(cells) < len(header):
            reject(f"has {len(cells)} fields, the header has {len(header)}", first)
            return None
        if len(cells) > len(header) and any(c for c in cells[len(header):]):
            reject(f"has more fields ({len(cells)}) than the header ({len(header)})", first)
            return None
        iid = cells[col["image_id"]]
        if not iid:
            reject("empty image_id")
            return None
        if not _ID_RE.match(iid):
            reject(f"image_id {iid!r} is not a plain file name", iid)
            return None
        raw_cls = cells[col["class_name"]]
        if not raw_cls:
            reject(f"empty class_name for image {iid}", iid)
            return None
        cls = _CANON.get(column_key(raw_cls))
        if cls is None:
            reject(f"unknown class_name {raw_cls!r} for image {iid}", iid)
            return None
        reader = cells[col["rad_id"]] if has_rad else ""
        if has_rad and not reader:
            reject(f"empty rad_id for image {iid}", iid)
            return None
        vals: list[float | None] = []
        for name in _COORDS:
            raw = cells[col[name]]
            if raw.lower() in _NAN:
                vals.append(None)
                continue
            try:
                v = float(raw)
            except ValueError:
                reject(f"{name} {raw!r} is not a number (image {iid}, {cls})", iid)
                return None
            if not math.isfinite(v):
                reject(f"{name} {raw!r} is not finite (image {iid}, {cls})", iid)
                return None
            vals.append(v)
        box: list[float] | None = None
        if all(v is None for v in vals):
            if cls in _LOCAL:
                reject(f"class {cls!r} without a complete box (all coordinates empty) for image {iid}", iid)
                return None
        elif any(v is None for v in vals):
            reject(f"class {cls!r} without a complete box {[cells[col[c]] for c in _COORDS]} for image {iid}", iid)
            return None
        else:
            if cls == NO_FINDING:
                reject(f"'No finding' row has box coordinates {vals} for image {iid}", iid)
                return None
            x1, y1, x2, y2 = vals  # type: ignore[misc]
            if min(vals) < 0:  # type: ignore[type-var]
                reject(f"negative coordinate in box {vals} (image {iid}, {cls})", iid)
                return None
            if not (x1 < x2 and y1 < y2):
                reject(f"empty or inverted box {vals} (image {iid}, {cls})", iid)
                return None
            box = [x1, y1, x2, y2]  # type: ignore[list-item]
        key = (iid, reader, cls, tuple(box) if box else None)
        if key in seen:
            reject(f"duplicate of row {seen[key]} (image {iid}, {cls})", iid)
            return None
        seen[key] = n
        return iid, _Ann(n, reader, cls, box)

    def _labels(self, rel: str, wanted: set[str], bad: list[Quarantine]) -> dict[str, dict[str, set[str]]]:
        """image_id -> reader ("" when the file has no rad_id) -> positive labels, for the ``wanted`` images."""
        out: dict[str, dict[str, set[str]]] = {}
        if not self.root.exists(rel):
            return out  # optional file
        try:
            header, rows = read_csv_rows(self.root, rel)
            header = match_columns(rel, header, ("image_id",), ("rad_id", *LOCAL_LABELS, *GLOBAL_LABELS))
            i_id = header.index("image_id")
            i_rad = header.index("rad_id") if "rad_id" in header else None
            label_cols = [(i, h) for i, h in enumerate(header) if h and h not in ("image_id", "rad_id")]
            seen: dict[tuple[str, str], int] = {}
            for n, cells in rows:
                if len(cells) != len(header):
                    bad.append(self.bad(rel, f"row {n}: has {len(cells)} fields, the header has {len(header)}"))
                    continue
                iid = cells[i_id]
                if not _ID_RE.match(iid):
                    bad.append(self.bad(rel, f"row {n}: image_id {iid!r} is not a plain file name", iid))
                    continue
                reader = cells[i_rad] if i_rad is not None else ""
                if (iid, reader) in seen:
                    bad.append(self.bad(rel, f"row {n}: duplicate of row {seen[iid, reader]} (image {iid}, "
                                             f"reader {reader or '-'})", iid))
                    continue
                seen[iid, reader] = n
                positives, wrong = set(), None
                for i, h in label_cols:
                    v = cells[i].lower()
                    if v in ("1", "1.0", "true"):
                        positives.add(_CANON.get(column_key(h), h))
                    elif v not in ("0", "0.0", "false", ""):
                        wrong = (h, cells[i])
                        break
                if wrong:
                    bad.append(self.bad(rel, f"row {n}: column {wrong[0]!r} value {wrong[1]!r} is not 0/1 "
                                             f"(image {iid})", iid))
                    continue
                if iid in wanted:
                    out.setdefault(iid, {}).setdefault(reader, set()).update(positives - {NO_FINDING})
        except BadInput as exc:
            bad.append(self.bad(exc.file, exc.reason, exc.record))
        return out

    # ------------------------------------------------------------------ items
    def items(self) -> Iterator[Item | Quarantine]:
        bad: list[Quarantine] = []
        loaded = []
        for folder, split in _SPLITS:
            rel = f"annotations/annotations_{folder}.csv"
            anns, has_rad = self._annotations(rel, bad)
            loaded.append((folder, split, rel, anns, has_rad))
        yield from bad
        bad.clear()

        # An image in both sets would leak between train and test: drop it from both.
        both = set(loaded[0][3]) & set(loaded[1][3])
        for iid in sorted(both):
            yield self.bad(loaded[1][2], f"image {iid} appears in both annotations_train.csv and "
                                         f"annotations_test.csv; dropped from both", iid)

        for folder, split, rel, anns, has_rad in loaded:
            labels = self._labels(f"annotations/image_labels_{folder}.csv", set(anns) - both, bad)
            yield from bad
            bad.clear()
            for iid in sorted(anns):
                if iid in both:
                    continue
                yield from self._image_items(iid, folder, split, rel, anns[iid], has_rad, labels.get(iid, {}))

    def _item(self, record_id: str, iid: str, folder: str, split: str, rel: str, cls: str,
              boxes: list[list[float]], findings: set[str], rows: list[int]) -> Item:
        return Item(
            record_id=record_id, patient_id=f"vindr:{iid}", study_id=f"vindr:{iid}", task="grounding",
            prompt=grounding_prompt(cls), answer=cls, images=[ImageRef(path=f"{folder}/{iid}.dicom")],
            split=split, view="PA", boxes=[Box(cls, list(b)) for b in sorted(boxes)], box_frame=None,
            findings=sorted(findings, key=str.lower), file=f"{rel} (rows {', '.join(map(str, sorted(rows)))})",
        )

    def _image_items(self, iid, folder, split, rel, anns: list[_Ann], has_rad: bool,
                     labels: dict[str, set[str]]) -> Iterator[Item]:
        common = labels.get("", set())  # image-level labels from a label file without reader ids
        if not has_rad:
            findings = {a.cls for a in anns if a.cls != NO_FINDING} | set().union(*labels.values())
            by_cls: dict[str, list[_Ann]] = {}
            for a in anns:
                if a.box is not None:
                    by_cls.setdefault(a.cls, []).append(a)
            for cls in sorted(by_cls):
                group = by_cls[cls]
                yield self._item(f"{iid}-grounding-{slug(cls)}", iid, folder, split, rel, cls,
                                 [a.box for a in group], findings, [a.row for a in group])
            return

        per: dict[str, dict[str, list[_Ann]]] = {}  # class -> reader -> rows with a box
        reader_findings: dict[str, set[str]] = {}
        for a in anns:
            reader_findings.setdefault(a.reader, set())
            if a.cls != NO_FINDING:
                reader_findings[a.reader].add(a.cls)
            if a.box is not None:
                per.setdefault(a.cls, {}).setdefault(a.reader, []).append(a)
        for reader, labs in labels.items():
            if reader:
                reader_findings.setdefault(reader, set()).update(labs)
        votes: dict[str, int] = {}
        for labs in reader_findings.values():
            for c in labs:
                votes[c] = votes.get(c, 0) + 1
        consensus_findings = {c for c, k in votes.items() if k >= self.min_readers} | common

        for cls in sorted(per):
            if self.readers in ("each", "both"):
                for reader in sorted(per[cls]):
                    group = per[cls][reader]
                    yield self._item(f"{iid}-grounding-{slug(cls)}-{re.sub(r'[^A-Za-z0-9]+', '-', reader)}",
                                     iid, folder, split, rel, cls, [a.box for a in group],
                                     reader_findings[reader] | common, [a.row for a in group])
            if self.readers in ("consensus", "both"):
                fused = fuse_boxes([(r, a.box) for r, group in per[cls].items() for a in group],
                                   self.fusion_iou, self.min_readers)
                if fused:
                    rows = [a.row for group in per[cls].values() for a in group]
                    yield self._item(f"{iid}-grounding-{slug(cls)}", iid, folder, split, rel, cls, fused,
                                     consensus_findings | {cls}, rows)
