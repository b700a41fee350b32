"""NIH ChestX-ray14: the 984 hand-drawn boxes of ``BBox_List_2017.csv`` as grounding Items.

Layout read (the NIH Box folder / Kaggle ``nih-chest-xrays/data`` release, paths relative to the root)::

    Data_Entry_2017_v2020.csv or Data_Entry_2017.csv   one row per image (112,120)
    BBox_List_2017.csv                                 one row per box
    train_val_list.txt, test_list.txt                  the official patient-wise split, one file name a line
    images/<name>.png  or  images_001/images/<name>.png ... images_012/images/<name>.png

Header quirks handled (columns are found by name, never by position):

* ``Data_Entry_2017.csv``: ``Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,
  View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],`` — the bracketed names split into
  ``OriginalImage[Width`` / ``Height]`` / ``OriginalImagePixelSpacing[x`` / ``y]`` and the trailing comma adds
  an unnamed 12th column. The 2020 revision is read the same way (it may say ``Patient Sex``; only
  ``Image Index``, ``Finding Labels``, ``Patient ID`` and ``View Position`` are needed).
* ``BBox_List_2017.csv``: ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` — the box columns are ``Bbox [x``,
  ``y``, ``w``, ``h]`` followed by three unnamed empty columns. Plain ``x,y,w,h`` headers are accepted too.

Box frame: the boxes are ``[x, y, w, h]`` in pixels of the *distributed 1024x1024 PNGs* (the original images were
down-scaled to 1024x1024 before release and the boxes were drawn on those). ``OriginalImage[Width,Height]`` is
the size of the original DICOM and is NOT the boxes' frame, so it is not used. Items carry
``box_frame=(1024, 1024)``: the engine rescales correctly even for a re-sized copy of the images. A box that
overshoots the frame by at most 2 px is clipped; further out it is refused.

Items: task ``grounding``, one per (image, finding label) with all that label's boxes; prompt
``grounding_prompt(label)``, answer the label; the bbox list's ``Infiltrate`` is written ``Infiltration`` as in
``Finding Labels``. ``findings``: the image's ``Finding Labels`` split on ``|`` ("No Finding" dropped), plus its
box labels. ``patient_id`` ``nih:<Patient ID>``, ``study_id`` ``nih:<image stem>`` (one image per study), ``view``
from ``View Position`` (PA/AP). Split: ``train_val_list.txt`` -> "train", ``test_list.txt`` -> "test" (the
official lists are patient-wise; no validation set is carved here — the engine keeps official splits). When a
list file is missing, every Item gets split "" (the engine's seeded patient split) and the missing file is
reported. Images are found by file name anywhere under the root (sorted walk); an image not found gets the
path ``images/<name>`` and the engine reports it missing.

Options: ``data_entry`` — the metadata file name (default: ``Data_Entry_2017_v2020.csv`` if present, else
``Data_Entry_2017.csv``).

Column names are matched ignoring case and whitespace; a file without a required column stops the source
(:class:`~deepmedix.data.sources.base.HeaderError`). Quarantined: missing files, rows with too few fields,
empty/unsafe image names, unknown finding labels, non-numeric/non-finite/negative/empty boxes or boxes outside the
frame, duplicate rows, images without a ``Data_Entry`` row, duplicate ``Data_Entry`` rows, bad ``Patient ID``,
images listed in both or neither split list, and a second image file with the same name.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterator

from deepmedix.data.prompts import grounding_prompt
from deepmedix.data.schema import Box
from deepmedix.data.sources.base import (
    BadInput,
    HeaderError,
    ImageRef,
    Item,
    Quarantine,
    Root,
    Source,
    column_key,
    read_csv_rows,
    slug,
)

__all__ = ["ChestXray14", "BOX_LABELS", "FRAME"]

FRAME = (1024, 1024)
_SLACK = 2.0  # px a box may overshoot the frame and still be clipped rather than refused
BOX_LABELS = {"atelectasis": "Atelectasis", "cardiomegaly": "Cardiomegaly", "effusion": "Effusion",
              "infiltrate": "Infiltration", "infiltration": "Infiltration", "mass": "Mass", "nodule": "Nodule",
              "pneumonia": "Pneumonia", "pneumothorax": "Pneumothorax"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.png$", re.IGNORECASE)
BBOX_FILE = "BBox_List_2017.csv"
LISTS = (("train_val_list.txt", "train"), ("test_list.txt", "test"))




def _find(header: list[str], *names: str) -> int | None:
    """The index of the first of ``names`` in ``header``, matched ignoring case and whitespace."""
    keys = [column_key(h) for h in header]
    for name in names:
        if column_key(name) in keys:
            return keys.index(column_key(name))
    return None


def _columns(rel: str, header: list[str], wanted: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Each wanted column's index (its published spellings, ignoring case and whitespace); a missing one stops the
    source (:class:`HeaderError`), never a quarantine per row."""
    cols = {name: _find(header, *spellings) for name, spellings in wanted.items()}
    missing = [name for name, i in cols.items() if i is None]
    if missing:
        raise HeaderError(f"{rel}: missing required column(s) {missing}; found {header} (column names are matched "
                          f"ignoring case and spaces)")
    return cols  # type: ignore[return-value]


class ChestXray14(Source):
    name = "chestxray14"
    option_names = ("data_entry",)

    def __init__(self, root: Root, **options: Any):
        super().__init__(root, **options)
        self.data_entry = options.get("data_entry") or ""

    # ------------------------------------------------------------------ bbox list
    def _boxes(self, bad: list[Quarantine]) -> dict[str, dict[str, list[tuple[int, list[float]]]]]:
        """image name -> label -> [(row, [x1, y1, x2, y2])]."""
        out: dict[str, dict[str, list[tuple[int, list[float]]]]] = {}
        rel = BBOX_FILE
        try:
            header, rows = read_csv_rows(self.root, rel)
            cols = _columns(rel, header, {"Image Index": ("Image Index",), "Finding Label": ("Finding Label",),
                                          "x": ("Bbox [x", "x"), "y": ("y",), "w": ("w",), "h": ("h]", "h")})
            need = max(cols.values()) + 1  # type: ignore[type-var]
            seen: dict[tuple, int] = {}
            for n, cells in rows:
                def reject(reason: str, rec: str = "", *, n: int = n) -> None:
                    bad.append(self.bad(rel, f"row {n}: {reason}", rec))

                if len(cells) < need:
                    reject(f"has {len(cells)} fields, {need} needed")
                    continue
                name = cells[cols["Image Index"]]
                if not name:
                    reject("empty Image Index")
                    continue
                if not _NAME_RE.match(name):
                    reject(f"Image Index {name!r} is not a plain PNG file name", name)
                    continue
                raw_label = cells[cols["Finding Label"]]
                label = BOX_LABELS.get(raw_label.lower())
                if label is None:
                    reject(f"unknown Finding Label {raw_label!r} for {name}", name)
                    continue
                vals, err = [], ""
                for k in ("x", "y", "w", "h"):
                    raw = cells[cols[k]]
                    try:
                        v = float(raw)
                    except ValueError:
                        err = f"box {k} {raw!r} is not a number" if raw else f"box {k} is empty"
                        break
                    if not math.isfinite(v):
                        err = f"box {k} {raw!r} is not finite"
                        break
                    vals.append(v)
                if err:
                    reject(f"{err} ({name}, {label})", name)
                    continue
                x, y, w, h = vals
                if x < 0 or y < 0:
                    reject(f"negative box origin x={x}, y={y} ({name}, {label})", name)
                    continue
                if w <= 0 or h <= 0:
                    reject(f"box width and height must be positive, got w={w}, h={h} ({name}, {label})", name)
                    continue
                if x + w > FRAME[0] + _SLACK or y + h > FRAME[1] + _SLACK:
                    reject(f"box [{x}, {y}, {x + w}, {y + h}] extends beyond the 1024x1024 frame "
                           f"({name}, {label})", name)
                    continue
                box = [x, y, min(x + w, float(FRAME[0])), min(y + h, float(FRAME[1]))]
                key = (name, label, tuple(box))
                if key in seen:
                    reject(f"duplicate of row {seen[key]} ({name}, {label})", name)
                    continue
                seen[key] = n
                out.setdefault(name, {}).setdefault(label, []).append((n, box))
        except BadInput as exc:
            bad.append(self.bad(exc.file, exc.reason, exc.record))
        return out

    # ------------------------------------------------------------------ data entry
    def _entries(self, wanted: set[str], bad: list[Quarantine]) -> dict[str, dict[str, Any]] | None:
        rel = self.data_entry or self.root.first("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv") \
            or "Data_Entry_2017.csv"
        out: dict[str, dict[str, Any]] = {}
        try:
            header, rows = read_csv_rows(self.root, rel)
            cols = _columns(rel, header, {k: (k,) for k in ("Image Index", "Finding Labels", "Patient ID",
                                                            "View Position")})
            need = max(cols.values()) + 1  # type: ignore[type-var]
            for n, cells in rows:
                if len(cells) < need:
                    if any(name in wanted for name in cells[:1]):
                        bad.append(self.bad(rel, f"row {n}: has {len(cells)} fields, {need} needed", cells[0]))
                    continue
                name = cells[cols["Image Index"]]
                if name not in wanted:
                    continue
                if name in out:
                    bad.append(self.bad(rel, f"row {n}: duplicate Data_Entry row for {name} (first at row "
                                             f"{out[name]['row']})", name))
                    continue
                pid = cells[cols["Patient ID"]]
                if not pid.isdigit():
                    bad.append(self.bad(rel, f"row {n}: Patient ID {pid!r} is not a number ({name})", name))
                    out[name] = {"row": n, "bad": True}
                    continue
                view = cells[cols["View Position"]].upper()
                labels = [lab.strip() for lab in cells[cols["Finding Labels"]].split("|")]
                out[name] = {"row": n, "pid": str(int(pid)), "view": view if view in ("PA", "AP") else "",
                             "findings": [lab for lab in labels if lab and lab.lower() != "no finding"]}
        except BadInput as exc:
            bad.append(self.bad(exc.file, exc.reason, exc.record))
            return None if not out else out
        return out

    def _splits(self, wanted: set[str], bad: list[Quarantine]) -> dict[str, str] | None:
        """image -> "train"/"test" for the wanted images; None when the lists are unusable (split "")."""
        listed: dict[str, set[str]] = {}
        for rel, split in LISTS:
            try:
                names = {ln.strip() for ln in self.root.read_text(rel).splitlines()}
            except BadInput as exc:
                bad.append(self.bad(exc.file, f"{exc.reason}; official split not available, every image gets "
                                              f"the seeded split"))
                return None
            listed[split] = names & wanted
        out = {}
        for name in sorted(wanted):
            where = [s for s in ("train", "test") if name in listed[s]]
            if len(where) == 1:
                out[name] = where[0]
            elif where:
                bad.append(self.bad(name, "listed in both train_val_list.txt and test_list.txt", name))
            else:
                bad.append(self.bad(name, "listed in neither train_val_list.txt nor test_list.txt", name))
        return out

    def _image_index(self, wanted: set[str], bad: list[Quarantine]) -> dict[str, str]:
        out: dict[str, str] = {}
        for rel in self.root.walk("", (".png",)):
            name = rel.rsplit("/", 1)[-1]
            if name not in wanted:
                continue
            if name in out:
                bad.append(self.bad(rel, f"duplicate image file name {name} (using {out[name]})", name))
                continue
            out[name] = rel
        return out

    # ------------------------------------------------------------------ items
    def items(self) -> Iterator[Item | Quarantine]:
        bad: list[Quarantine] = []
        boxes = self._boxes(bad)
        yield from bad
        bad.clear()
        if not boxes:
            return
        wanted = set(boxes)
        entries = self._entries(wanted, bad)
        yield from bad
        bad.clear()
        if entries is None:
            return
        usable = {name for name, e in entries.items() if not e.get("bad")}
        splits = self._splits(usable, bad)
        index = self._image_index(usable, bad)
        yield from bad
        bad.clear()
        for name in sorted(boxes):
            entry = entries.get(name)
            if entry is None:
                rows = sorted(r for lab in boxes[name].values() for r, _ in lab)
                yield self.bad(BBOX_FILE, f"image {name} (rows {', '.join(map(str, rows))}) is not in "
                                          f"Data_Entry", name)
                continue
            if entry.get("bad"):
                continue  # already reported
            if splits is not None and name not in splits:
                continue  # listed in both/neither: reported
            split = splits[name] if splits is not None else ""
            stem = name[:-4]
            findings = list(dict.fromkeys(entry["findings"] + sorted(boxes[name])))
            path = index.get(name, f"images/{name}")
            for label in sorted(boxes[name]):
                group = boxes[name][label]
                yield Item(
                    record_id=f"{stem}-grounding-{slug(label)}", patient_id=f"nih:{entry['pid']}",
                    study_id=f"nih:{stem}", task="grounding", prompt=grounding_prompt(label), answer=label,
                    images=[ImageRef(path=path)], split=split, view=entry["view"],
                    boxes=[Box(label, b) for _, b in sorted(group, key=lambda rb: rb[1])], box_frame=FRAME,
                    findings=findings,
                    file=f"{BBOX_FILE} (rows {', '.join(str(r) for r, _ in sorted(group))})",
                )
