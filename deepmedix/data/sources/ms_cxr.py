"""The ``ms_cxr`` adapter: MS-CXR phrase grounding (boxes for report phrases on MIMIC-CXR-JPG images).

Ids, quarantine rules and ``official_split`` follow the MIMIC-CXR family conventions described in
:mod:`deepmedix.data.sources.mimic_common`.
"""

from __future__ import annotations

from typing import Any, Iterator

from deepmedix.data import prompts
from deepmedix.data.schema import Box
from deepmedix.data.sources.base import Item, Quarantine, Root, Source
from deepmedix.data.sources.mimic_common import (
    bad_id,
    bool_option,
    csv_names,
    digest,
    image_path,
    image_ref,
    images_root,
    norm_split,
    open_table,
    parse_mimic_path,
    rec,
)
from deepmedix.errors import InputError

__all__ = ["MsCxrSource"]


class MsCxrSource(Source):
    """MS-CXR phrase grounding (PhysioNet ``ms-cxr`` 0.1 / 1.1.0; root: that folder).

    The CSV ``MS_CXR_Local_Alignment_v1.1.0.csv`` (or ``_v1.0.0``, or any ``MS_CXR_Local_Alignment_v*.csv`` at the
    root, the highest version first; ``.csv.gz`` too): one row per box with dicom_id, category_name, label_text,
    path, x, y, w, h, image_width, image_height, and from 1.1.0 a ``split`` column. ``path`` is the MIMIC-CXR file
    (``files/pNN/pSUBJECT/sSTUDY/DICOM.jpg`` or ``.dcm``); subject and study come from it, the image is the .jpg
    under ``images_root`` (the MIMIC-CXR-JPG root; default the MS-CXR root).

    One ``grounding`` Item per (dicom_id, label_text) with all its boxes, converted from x, y, w, h to
    [x1, y1, x2, y2] in the ``image_width x image_height`` frame (``box_frame``; the engine rescales to the decoded
    image). Prompt: ``phrase_grounding_prompt(label_text)``; answer and box labels: ``category_name`` (the finding
    class, as the other grounding sources answer with their label — the phrase is already in the prompt).
    A box overshooting the image by at most 1 px is clipped; beyond that it is quarantined.

    A phrase with any bad row (non-numeric or non-positive numbers, a box outside the image, rows disagreeing on
    path / size / category, an invalid path) is quarantined whole — a partial set of boxes would be a wrong target.
    Exact duplicate rows are quarantined and dropped, the phrase kept. Options: ``images_root``, ``official_split``.
    """

    name = "ms_cxr"
    option_names = ("images_root", "official_split")
    REQUIRED = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
                "image_height")

    def __init__(self, root: Root, **options: Any):
        super().__init__(root, **options)
        self.official_split = bool_option(options, "official_split", True)

    def _csv(self) -> str | None:
        rel = self.root.first(*csv_names("MS_CXR_Local_Alignment_v1.1.0", "MS_CXR_Local_Alignment_v1.0.0"))
        if rel:
            return rel
        found = [p for p in self.root.walk("", (".csv", ".csv.gz"))
                 if "/" not in p and p.startswith("MS_CXR_Local_Alignment")]
        return sorted(found, reverse=True)[0] if found else None

    def items(self) -> Iterator[Item | Quarantine]:
        rel = self._csv()
        if rel is None:
            raise InputError(f"source {self.name}: {self.root.uri} holds no MS_CXR_Local_Alignment_v*.csv — give the "
                             f"ms-cxr/<version> folder as the root")
        iroot = images_root(self)
        table, q = open_table(self, self.root, rel, self.REQUIRED, ("split",))
        if q:
            yield q
            return
        has_split = "split" in table.columns
        groups: dict[tuple[str, str], list[tuple[int, dict[str, str]]]] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            groups.setdefault((row["dicom_id"], row["label_text"]), []).append((line, row))

        done: list[tuple[tuple[int, int, str, str], Item]] = []
        for (dicom, phrase), rows in groups.items():
            lines = ", ".join(str(ln) for ln, _ in rows)
            where = f"dicom {dicom!r}, phrase {phrase[:60]!r}"
            errors: list[Quarantine] = []

            def fail(line: int, row: dict[str, str], reason: str, *, errors=errors, where=where) -> None:
                errors.append(self.bad(rel, f"line {line}: {reason} ({where}; phrase dropped)", rec(row)))

            why = bad_id("dicom_id", dicom)
            if why:
                for line, row in rows:
                    fail(line, row, why)
            if not phrase.strip():
                for line, row in rows:
                    fail(line, row, "label_text is empty")
            boxes: list[list[float]] = []
            seen_box: dict[tuple[float, ...], int] = {}
            dupes: list[Quarantine] = []
            ref = rows[0][1]
            for line, row in rows:
                for col in ("path", "image_width", "image_height", "category_name") + (("split",) if has_split else ()):
                    if row[col] != ref[col]:
                        fail(line, row, f"{col} {row[col]!r} differs from {ref[col]!r} on line {rows[0][0]}")
                nums = {}
                for col in ("x", "y", "w", "h", "image_width", "image_height"):
                    try:
                        nums[col] = float(row[col])
                    except ValueError:
                        nums[col] = float("nan")
                    if nums[col] != nums[col] or nums[col] in (float("inf"), float("-inf")):
                        fail(line, row, f"column {col!r} is {row[col]!r}, not a number")
                        nums = {}
                        break
                if not nums:
                    continue
                W, H = nums["image_width"], nums["image_height"]
                x, y, w, h = nums["x"], nums["y"], nums["w"], nums["h"]
                if W <= 0 or H <= 0:
                    fail(line, row, f"image size {row['image_width']}x{row['image_height']} is not positive")
                    continue
                if w <= 0 or h <= 0:
                    fail(line, row, f"box w={row['w']} h={row['h']} is empty (w and h must be > 0)")
                    continue
                box = [max(0.0, x), max(0.0, y), min(W, x + w), min(H, y + h)]  # clip a <= 1 px overshoot
                if x < -1 or y < -1 or x + w > W + 1 or y + h > H + 1 or box[0] >= box[2] or box[1] >= box[3]:
                    fail(line, row, f"box x={row['x']} y={row['y']} w={row['w']} h={row['h']} lies outside the "
                                    f"{row['image_width']}x{row['image_height']} image")
                    continue
                key = tuple(box)
                if key in seen_box:
                    dupes.append(self.bad(rel, f"line {line}: duplicate of the box on line {seen_box[key]} ({where}); "
                                               f"dropped", rec(row)))
                    continue
                seen_box[key] = line
                boxes.append(box)
            parsed, why = parse_mimic_path(iroot, ref["path"])
            if parsed is None:
                fail(rows[0][0], ref, why)
            elif parsed[2] != dicom:
                fail(rows[0][0], ref, f"path {ref['path']!r} names image {parsed[2]!r}, not dicom_id {dicom!r} "
                                      f"(does not match)")
            split = ""
            if has_split and not errors:
                sp = norm_split(ref["split"])
                if sp is None:
                    fail(rows[0][0], ref, f"split value {ref['split']!r} is not train/val/test")
                elif self.official_split:
                    split = sp
            if errors:
                yield from errors
                continue
            yield from dupes
            subject, study, _ = parsed
            W, H = int(round(float(ref["image_width"]))), int(round(float(ref["image_height"])))
            category = ref["category_name"].strip()
            rid = f"{dicom}-{digest(phrase)}"
            item = Item(record_id=rid, patient_id=f"mimic:{subject}", study_id=f"mimic:s{study}", task="grounding",
                        prompt=prompts.phrase_grounding_prompt(phrase), answer=category or phrase.strip(),
                        images=[image_ref(iroot, self.root, image_path(subject, study, dicom))], split=split,
                        boxes=[Box(label=category or phrase.strip(), box=b) for b in boxes], box_frame=(W, H),
                        findings=[category] if category else [], file=f"{rel}:{lines}")
            done.append(((int(subject), int(study), dicom, phrase), item))
        for _, item in sorted(done, key=lambda t: t[0]):
            yield item
