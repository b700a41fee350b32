"""Adapters for MIMIC-CXR and the datasets built on it, each read in its own published layout.

All four share the MIMIC-CXR-JPG image tree (``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg``) and its patients, so their
ids share one namespace: ``patient_id = "mimic:<subject_id>"``, ``study_id = "mimic:s<study_id>"``. The adapters
never open an image (the engine decodes them and quarantines a missing or broken one); they only build the paths
from ids they have checked (digits for subject/study, hex-and-dash for DICOM ids), so a path can never leave the
image root.

Bad data never raises: a bad row, a duplicate id, a missing or unreadable report, an escaping path becomes a
:class:`Quarantine` (file, reason naming the row/column/id and the fault, and the offending record) and the stream
goes on. A missing *secondary* file (split, labels, one VQA split file, ``mimic_all.csv``) is one Quarantine naming
the file. Only a wrong configuration raises ``ValueError``: an unknown option value, or a root that holds none of
the dataset's main index (nothing could be curated, so the caller must hear about it).

Sources (options in brackets):

* ``mimic_cxr`` — MIMIC-CXR-JPG 2.x reports [reports_root, labels, tasks, official_split]
* ``ms_cxr`` — MS-CXR phrase grounding [images_root, official_split]
* ``mimic_cxr_vqa`` — MIMIC-CXR-VQA (EHRXQA authors) [images_root, official_split]
* ``medical_cxr_vqa`` — Medical-CXR-VQA (Hu et al. 2024) [images_root, official_split]

``official_split`` (default true) keeps each dataset's own split; false leaves ``split=""`` so the engine's seeded
patient split (keyed by the shared ``mimic:`` patient ids) decides — use it when mixing these sources, because the
derived datasets' splits are not MIMIC-CXR-JPG's and a patient could otherwise land in two splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from typing import Any, Callable, Generator, Iterable, Iterator

from deepmedix import grounding
from deepmedix.data import prompts, text
from deepmedix.data.schema import QUESTION_TYPES, Box
from deepmedix.data.sources.base import BadInput, ImageRef, Item, Quarantine, Root, Source, open_root

__all__ = ["MimicCxrSource", "MsCxrSource", "MimicCxrVqaSource", "MedicalCxrVqaSource", "CHEXPERT_LABELS"]

CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                   "Pneumonia", "Pneumothorax", "Support Devices")
REPORT_TASKS = ("report_findings", "report_impression")
FRONTAL = ("PA", "AP")

_DIGITS = re.compile(r"^\d{2,}$")
_DICOM = re.compile(r"^[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*$")
# .../pNN/pSUBJECT/sSTUDY/DICOM[.jpg|.dcm|...] — MIMIC-CXR's file layout, with or without a leading files/
_MIMIC_PATH = re.compile(r"^(?:.*/)?p(\d\d)/p(\d+)/s(\d+)/([^/]+?)(?:\.(?:jpg|jpeg|dcm|png))?$", re.IGNORECASE)
_SPLITS = {"train": "train", "validate": "validate", "valid": "validate", "val": "validate",
           "validation": "validate", "test": "test"}
_REPORT_PREFIXES = ("files/", "mimic-cxr-reports/files/", "", "mimic-cxr-reports/")


# ------------------------------------------------------------------------------------------------ helpers

def _digest(s: str, n: int = 4) -> str:
    return hashlib.blake2b(s.encode("utf-8"), digest_size=n).hexdigest()


def _rec(obj: Any, limit: int = 500) -> str:
    """The offending record as compact JSON (truncated), for quarantine reports."""
    try:
        s = json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        s = repr(obj)
    return s if len(s) <= limit else s[:limit] + "..."


def _split(value: Any) -> str | None:
    """An official split value (``train``/``validate``/``test`` or the datasets' ``val``/``valid``) normalised, or
    None when it is not one."""
    if not isinstance(value, str):
        return None
    return _SPLITS.get(value.strip().lower())


def _id(value: Any) -> str:
    """A MIMIC numeric id from a CSV cell or JSON value ("10000032", 10000032, "10000032.0"), as a string."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    s = str(value).strip()
    if s.endswith(".0") and s[:-2].isdigit():
        s = s[:-2]
    return s


def _bad_id(name: str, value: str) -> str | None:
    """Why ``value`` is not a valid MIMIC ``name`` (subject_id/study_id/dicom_id), or None when it is."""
    if name == "dicom_id":
        if not _DICOM.match(value or ""):
            return f"dicom_id {value!r} is not a DICOM id (hex groups joined by '-')"
        return None
    if not _DIGITS.match(value or ""):
        return f"{name} {value!r} is not a number"
    return None


def image_path(subject: str, study: str, dicom: str) -> str:
    """The MIMIC-CXR-JPG path of an image, relative to the mimic-cxr-jpg/2.x.y root."""
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


def report_path(subject: str, study: str, prefix: str = "files/") -> str:
    """The MIMIC-CXR report of a study (``files/pNN/pSUBJECT/sSTUDY.txt``)."""
    return f"{prefix}p{subject[:2]}/p{subject}/s{study}.txt"


def _parse_mimic_path(root: Root, raw: str) -> tuple[tuple[str, str, str] | None, str]:
    """(subject, study, dicom) from a MIMIC-CXR file path, or (None, reason)."""
    try:
        norm = root.safe(raw)
    except BadInput as exc:
        return None, f"path {raw!r}: {exc.reason}"
    m = _MIMIC_PATH.match(norm)
    if not m:
        return None, f"path {raw!r} is not a MIMIC-CXR files/pNN/pSUBJECT/sSTUDY/DICOM path"
    nn, subject, study, dicom = m.groups()
    if subject[:2] != nn:
        return None, f"path {raw!r}: folder p{nn} does not match subject p{subject}"
    for name, value in (("subject_id", subject), ("study_id", study), ("dicom_id", dicom)):
        why = _bad_id(name, value)
        if why:
            return None, f"path {raw!r}: {why}"
    return (subject, study, dicom), ""


class _Table:
    """A CSV read whole (``.csv`` or ``.csv.gz``): header, then rows as (line number, dict) with the row-shape
    faults reported instead of raised."""

    def __init__(self, root: Root, rel: str):
        self.rel = rel
        self.text = root.read_text(rel)  # BadInput: missing, unreadable, not UTF-8, broken gzip
        self._reader = csv.reader(io.StringIO(self.text, newline=""))
        try:
            header = next(self._reader)
        except StopIteration:
            header = []
        except csv.Error as exc:
            raise BadInput(rel, f"not a readable CSV header ({exc})") from None
        self.columns = [h.strip() for h in header]

    def missing(self, required: Iterable[str]) -> list[str]:
        return [c for c in required if c not in self.columns]

    def rows(self, bad: Callable[[str, str, str], Quarantine]) -> Iterator[tuple[int, dict[str, str] | None,
                                                                                  Quarantine | None]]:
        """(line, row, None) for a good row; (line, None, Quarantine) for a row of the wrong shape. A CSV syntax
        error (e.g. a NUL byte) ends the file with one Quarantine."""
        n = len(self.columns)
        while True:
            try:
                cells = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield self._reader.line_num, None, bad(self.rel, f"CSV unreadable from line {self._reader.line_num}"
                                                                 f" ({exc}); rest of file skipped", "")
                return
            line = self._reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != n:
                yield line, None, bad(self.rel, f"line {line}: {len(cells)} fields, the header has {n}",
                                      _rec(cells))
                continue
            yield line, {k: v.strip() for k, v in zip(self.columns, cells)}, None


def _open_table(src: Source, root: Root, rel: str, required: Iterable[str]) -> tuple[_Table | None, Quarantine | None]:
    try:
        table = _Table(root, rel)
    except BadInput as exc:
        return None, src.bad(rel, exc.reason)
    miss = table.missing(required)
    if miss:
        return None, src.bad(rel, f"missing required column(s) {miss}; header is {table.columns}")
    return table, None


def _csv_names(*stems: str) -> list[str]:
    return [f"{s}{ext}" for s in stems for ext in (".csv", ".csv.gz")]


def _bool_option(options: dict[str, Any], name: str, default: bool) -> bool:
    v = options.get(name, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"option {name!r} must be true or false, got {v!r}")


def _images_root(src: Source) -> Root:
    uri = src.options.get("images_root")
    return open_root(str(uri)) if uri else src.root


def _img(root: Root, own: Root, path: str) -> ImageRef:
    return ImageRef(path=path, root=None if root is own else root)


# ------------------------------------------------------------------------------------------------ MIMIC-CXR

class MimicCxrSource(Source):
    """MIMIC-CXR-JPG 2.x (root: the ``mimic-cxr-jpg/2.x.y`` folder) with the MIMIC-CXR free-text reports.

    Files (``.csv`` or ``.csv.gz``): ``mimic-cxr-2.0.0-metadata`` (the main index: dicom_id, subject_id, study_id,
    ViewPosition, ...), ``mimic-cxr-2.0.0-split`` (dicom_id, study_id, subject_id, split = train/validate/test),
    ``mimic-cxr-2.0.0-chexpert`` / ``-negbio`` (subject_id, study_id, then the 14 labels as 1.0 / 0.0 / -1.0 /
    blank). Reports are the MIMIC-CXR (DICOM database) ``files/pNN/pSUBJECT/sSTUDY.txt``, looked up under
    ``reports_root`` at ``files/``, ``mimic-cxr-reports/files/``, the root itself (a ``files`` folder given as the
    root) or ``mimic-cxr-reports/`` — the unzipped ``mimic-cxr-reports.zip`` in any of these places.

    One Item per study and report task present (``report_findings`` from the FINDINGS section, ``report_impression``
    from IMPRESSION, else CONCLUSION): all the study's images, PA then AP then the other views (ties by DICOM id);
    ``view`` is the first image's ViewPosition; ``findings`` are the label names marked 1.0 in the chosen label
    file ("No Finding" left out: an empty list says it). Report text keeps MIMIC's ``___`` de-identified spans
    (the engine scrubs PHI).

    Options: ``reports_root`` (path/URI, default the root), ``labels`` (``chexpert``|``negbio``, default
    chexpert), ``tasks`` (subset of report_findings/report_impression), ``official_split`` (default true).

    Quarantined: bad or duplicate metadata rows (later duplicates of a dicom_id, rows whose study belongs to another
    subject), studies with no split row, bad split/label rows, missing/empty/non-UTF-8 reports, reports with neither
    section. A missing split file leaves every study to the seeded split; a missing label file leaves
    ``findings`` empty (one Quarantine each). No metadata file at all raises ``ValueError``.
    """

    name = "mimic_cxr"
    option_names = ("reports_root", "labels", "tasks", "official_split")

    def __init__(self, root: Root, **options: Any):
        super().__init__(root, **options)
        labels = str(options.get("labels", "chexpert")).strip().lower()
        if labels not in ("chexpert", "negbio"):
            raise ValueError(f"source {self.name}: option 'labels' must be 'chexpert' or 'negbio', got {labels!r}")
        self.labels = labels
        tasks = options.get("tasks", REPORT_TASKS)
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks or ())
        unknown = [t for t in tasks if t not in REPORT_TASKS]
        if unknown or not tasks:
            raise ValueError(f"source {self.name}: option 'tasks' must be a non-empty subset of {REPORT_TASKS}, "
                             f"got {list(tasks)}")
        self.tasks = tuple(t for t in REPORT_TASKS if t in tasks)
        self.official_split = _bool_option(options, "official_split", True)

    # -- the tables
    def _metadata_file(self) -> str:
        rel = self.root.first(*_csv_names("mimic-cxr-2.0.0-metadata"))
        if rel is None:
            raise ValueError(f"source {self.name}: {self.root.uri} holds no mimic-cxr-2.0.0-metadata.csv(.gz) — "
                             f"give the mimic-cxr-jpg/2.x.y folder as the root")
        return rel

    def _splits(self, out: dict[str, str]) -> Generator[Quarantine, None, bool]:
        """Fill ``out`` (study_id -> split) from the split CSV, yielding its faults; returns whether there was a
        usable split file."""
        rel = self.root.first(*_csv_names("mimic-cxr-2.0.0-split"))
        if rel is None:
            yield self.bad("mimic-cxr-2.0.0-split.csv(.gz)", "split file missing; every study gets the seeded "
                                                              "patient split")
            return False
        table, q = _open_table(self, self.root, rel, ("study_id", "split"))
        if q:
            yield self.bad(q.file, q.reason + "; every study gets the seeded patient split")
            return False
        first_line: dict[str, int] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            study = _id(row["study_id"])
            why = _bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", _rec(row))
                continue
            sp = _split(row["split"])
            if sp is None:
                yield self.bad(rel, f"line {line}: split value {row['split']!r} for study {study} is not "
                                    f"train/validate/test", _rec(row))
                continue
            if study in out and out[study] != sp:
                yield self.bad(rel, f"line {line}: study {study} is {sp!r} here but {out[study]!r} at line "
                                    f"{first_line[study]}; kept {out[study]!r}", _rec(row))
                continue
            out.setdefault(study, sp)
            first_line.setdefault(study, line)
        return True

    def _labels(self, out: dict[str, list[str]]) -> Iterator[Quarantine]:
        """Fill ``out`` (study_id -> positive label names), yielding the label file's faults."""
        stem = f"mimic-cxr-2.0.0-{self.labels}"
        rel = self.root.first(*_csv_names(stem))
        if rel is None:
            yield self.bad(f"{stem}.csv(.gz)", f"{self.labels} label file missing; findings left empty")
            return
        table, q = _open_table(self, self.root, rel, ("study_id",))
        if q:
            yield self.bad(q.file, q.reason + "; findings left empty")
            return
        names = [c for c in table.columns if c not in ("subject_id", "study_id") and c]
        first_line: dict[str, int] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            study = _id(row["study_id"])
            why = _bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", _rec(row))
                continue
            if study in out:
                yield self.bad(rel, f"line {line}: duplicate label row for study {study} (first at line "
                                    f"{first_line[study]}); kept the first", _rec(row))
                continue
            pos, bad_cells = [], []
            for n in names:
                v = row.get(n, "")
                if v == "":
                    continue
                try:
                    f = float(v)
                except ValueError:
                    bad_cells.append(f"{n}={v!r}")
                    continue
                if f not in (1.0, 0.0, -1.0):
                    bad_cells.append(f"{n}={v!r}")
                elif f == 1.0 and n != "No Finding":
                    pos.append(n)
            if bad_cells:
                yield self.bad(rel, f"line {line}: study {study} has label value(s) {', '.join(bad_cells)} (expected "
                                    f"1.0, 0.0, -1.0 or blank); its findings left empty", _rec(row))
                pos = []
            out[study] = pos
            first_line[study] = line

    def _metadata(self, studies: dict[str, dict[str, Any]]) -> Generator[Quarantine, None, str]:
        """Fill ``studies`` (study_id -> subject, first line, [(view, dicom)]), yielding the metadata's faults;
        returns the metadata file's path."""
        rel = self._metadata_file()
        table, q = _open_table(self, self.root, rel, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        if q:
            yield q
            return rel
        seen: dict[str, tuple[int, str]] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            dicom, subject, study = row["dicom_id"], _id(row["subject_id"]), _id(row["study_id"])
            why = _bad_id("dicom_id", dicom) or _bad_id("subject_id", subject) or _bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", _rec(row))
                continue
            if dicom in seen:
                yield self.bad(rel, f"line {line}: duplicate dicom_id {dicom} (first at line {seen[dicom][0]}, study "
                                    f"{seen[dicom][1]}); kept the first", _rec(row))
                continue
            s = studies.get(study)
            if s is not None and s["subject"] != subject:
                yield self.bad(rel, f"line {line}: dicom {dicom} puts study {study} under subject {subject}, but "
                                    f"line {s['line']} has it under subject {s['subject']}; row dropped", _rec(row))
                continue
            seen[dicom] = (line, study)
            if s is None:
                s = studies[study] = {"subject": subject, "line": line, "images": []}
            s["images"].append((row["ViewPosition"].strip().upper(), dicom))
        return rel

    # -- reports
    def _report(self, rroot: Root, subject: str, study: str, order: list[str]) -> tuple[str | None, str, str]:
        """(text, path, reason): the report text or None with the reason."""
        first_path = report_path(subject, study, order[0])
        for i, prefix in enumerate(order):
            rel = report_path(subject, study, prefix)
            try:
                txt = rroot.read_text(rel)
            except BadInput as exc:
                if exc.reason == "file not found":
                    continue
                return None, rel, exc.reason
            if i:
                order.insert(0, order.pop(i))  # remember the layout that worked
            return txt, rel, ""
        return None, first_path, "report file not found (looked under " + ", ".join(
            repr(p or "<root>") for p in order) + ")"

    def items(self) -> Iterator[Item | Quarantine]:
        self._metadata_file()  # a root without the main index is a configuration error: raise before anything
        rroot = open_root(str(self.options["reports_root"])) if self.options.get("reports_root") else self.root
        splits: dict[str, str] = {}
        have_splits = yield from self._splits(splits)
        labels: dict[str, list[str]] = {}
        yield from self._labels(labels)
        studies: dict[str, dict[str, Any]] = {}
        meta_rel = yield from self._metadata(studies)
        order = list(_REPORT_PREFIXES)
        rank = {"PA": 0, "AP": 1}
        for study in sorted(studies, key=lambda s: (int(studies[s]["subject"]), int(s))):
            s = studies[study]
            subject = s["subject"]
            sid = f"s{study}"
            split = ""
            if have_splits:
                if study not in splits:
                    yield self.bad(meta_rel, f"study {study} (subject {subject}, line {s['line']}) has no row in the "
                                             f"split CSV", _rec({"subject_id": subject, "study_id": study}))
                    continue
                split = splits[study] if self.official_split else ""
            images = sorted(s["images"], key=lambda v: (rank.get(v[0], 2), v[1]))
            txt, rpath, why = self._report(rroot, subject, study, order)
            if txt is None:
                yield self.bad(rpath, why, _rec({"subject_id": subject, "study_id": study}))
                continue
            if not txt.strip():
                yield self.bad(rpath, f"report of study {study} is empty", _rec({"study_id": study}))
                continue
            secs = text.sections(txt)
            found = {"report_findings": secs.get("FINDINGS", ""),
                     "report_impression": secs.get("IMPRESSION") or secs.get("CONCLUSION", "")}
            if not found["report_findings"] and not found["report_impression"]:
                yield self.bad(rpath, f"report of study {study} has no FINDINGS or IMPRESSION section "
                                      f"(sections: {sorted(secs) or 'none'})", _rec({"study_id": study}))
                continue
            refs = [ImageRef(path=image_path(subject, study, d)) for _, d in images]
            for task in self.tasks:
                answer = found[task]
                if not answer:
                    continue
                rid = f"{sid}-{'findings' if task == 'report_findings' else 'impression'}"
                prompt = prompts.findings_prompt(rid) if task == "report_findings" else prompts.impression_prompt(rid)
                yield Item(record_id=rid, patient_id=f"mimic:{subject}", study_id=f"mimic:{sid}", task=task,
                           prompt=prompt, answer=answer, images=list(refs), split=split, view=images[0][0],
                           findings=list(labels.get(study, [])), file=rpath)


# ------------------------------------------------------------------------------------------------ MS-CXR

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
        self.official_split = _bool_option(options, "official_split", True)

    def _csv(self) -> str | None:
        rel = self.root.first(*_csv_names("MS_CXR_Local_Alignment_v1.1.0", "MS_CXR_Local_Alignment_v1.0.0"))
        if rel:
            return rel
        found = [p for p in self.root.walk("", (".csv", ".csv.gz"))
                 if "/" not in p and p.startswith("MS_CXR_Local_Alignment")]
        return sorted(found, reverse=True)[0] if found else None

    def items(self) -> Iterator[Item | Quarantine]:
        rel = self._csv()
        if rel is None:
            raise ValueError(f"source {self.name}: {self.root.uri} holds no MS_CXR_Local_Alignment_v*.csv — give the "
                             f"ms-cxr/<version> folder as the root")
        iroot = _images_root(self)
        table, q = _open_table(self, self.root, rel, self.REQUIRED)
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
                errors.append(self.bad(rel, f"line {line}: {reason} ({where}; phrase dropped)", _rec(row)))

            why = _bad_id("dicom_id", dicom)
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
                                               f"dropped", _rec(row)))
                    continue
                seen_box[key] = line
                boxes.append(box)
            parsed, why = _parse_mimic_path(iroot, ref["path"])
            if parsed is None:
                fail(rows[0][0], ref, why)
            elif parsed[2] != dicom:
                fail(rows[0][0], ref, f"path {ref['path']!r} names image {parsed[2]!r}, not dicom_id {dicom!r} "
                                      f"(does not match)")
            split = ""
            if has_split and not errors:
                sp = _split(ref["split"])
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
            rid = f"{dicom}-{_digest(phrase)}"
            item = Item(record_id=rid, patient_id=f"mimic:{subject}", study_id=f"mimic:s{study}", task="grounding",
                        prompt=prompts.phrase_grounding_prompt(phrase), answer=category or phrase.strip(),
                        images=[_img(iroot, self.root, image_path(subject, study, dicom))], split=split,
                        boxes=[Box(label=category or phrase.strip(), box=b) for b in boxes], box_frame=(W, H),
                        findings=[category] if category else [], file=f"{rel}:{lines}")
            done.append(((int(subject), int(study), dicom, phrase), item))
        for _, item in sorted(done, key=lambda t: t[0]):
            yield item


# ------------------------------------------------------------------------------------------------ MIMIC-CXR-VQA

class MimicCxrVqaSource(Source):
    """MIMIC-CXR-VQA (Bae et al., EHRXQA, NeurIPS 2023; PhysioNet ``mimic-ext-mimic-cxr-vqa``).

    Files: ``train.json``, ``valid.json``, ``test.json`` (``train_part*.json`` when train is split in parts) at the
    root, in ``dataset/`` or in ``mimiccxrvqa/dataset/`` (the authors' repository layout). Each is a JSON list of
    objects with ``split``, ``idx``, ``image_id`` (the DICOM id), ``question``, ``answer`` (a list of strings; yes/no
    questions hold ``["yes"]``/``["no"]``), ``content_type`` (anatomy, attribute, presence, abnormality, plane,
    gender, size), ``semantic_type`` (verify, choose, query), ``template``..., ``subject_id``, ``study_id`` and
    ``image_path`` (``pNN/pSUBJECT/sSTUDY/DICOM.jpg`` relative to MIMIC-CXR-JPG's ``files/``).

    One ``vqa`` Item per question: record id ``<split>-<idx>``; prompt = the question; question_type =
    content_type; answer = the list joined with :data:`deepmedix.grounding.LIST_SEP` (``" | "``, which the VQA
    metric compares as an unordered set), an empty list -> ``"none"``, the gender answers ``m``/``f`` -> ``male``/
    ``female``; split from the file (valid -> validate). Image: ``files/<image_path>`` under ``images_root``.
    Options: ``images_root``, ``official_split``.
    """

    name = "mimic_cxr_vqa"
    option_names = ("images_root", "official_split")
    FILES = (("train", "train"), ("valid", "validate"), ("test", "test"))
    DIRS = ("", "dataset/", "mimiccxrvqa/dataset/")

    def __init__(self, root: Root, **options: Any):
        super().__init__(root, **options)
        self.official_split = _bool_option(options, "official_split", True)

    def _dir(self) -> str | None:
        for d in self.DIRS:
            if self.root.first(*(f"{d}{stem}.json" for stem, _ in self.FILES), f"{d}train_part1.json"):
                return d
        return None

    def _files(self, d: str, stem: str) -> list[str]:
        if self.root.exists(f"{d}{stem}.json"):
            return [f"{d}{stem}.json"]
        return sorted(p for p in self.root.walk(d.rstrip("/"), (".json",))
                      if re.fullmatch(re.escape(d) + re.escape(stem) + r"_part\d+\.json", p))

    def items(self) -> Iterator[Item | Quarantine]:
        d = self._dir()
        if d is None:
            raise ValueError(f"source {self.name}: {self.root.uri} holds no train/valid/test.json (looked in "
                             f"{[x or '<root>' for x in self.DIRS]})")
        iroot = _images_root(self)
        for stem, split in self.FILES:
            files = self._files(d, stem)
            if not files:
                yield self.bad(f"{d}{stem}.json", f"{stem} split file missing; no {split} questions from this source")
                continue
            entries: list[tuple[int, Item]] = []
            seen: dict[int, str] = {}
            for rel in files:
                try:
                    data = json.loads(self.root.read_text(rel))
                except BadInput as exc:
                    yield self.bad(rel, exc.reason)
                    continue
                except json.JSONDecodeError as exc:
                    yield self.bad(rel, f"malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})")
                    continue
                if not isinstance(data, list):
                    yield self.bad(rel, f"top level is a JSON {type(data).__name__}, expected a list of questions")
                    continue
                for pos, e in enumerate(data):
                    got = self._entry(rel, pos, e, split, iroot)
                    if isinstance(got, Quarantine):
                        yield got
                        continue
                    idx, item = got
                    if idx in seen:
                        yield self.bad(rel, f"entry {pos}: duplicate idx {idx} (question id {split}-{idx}, first in "
                                            f"{seen[idx]}); kept the first", _rec(e))
                        continue
                    seen[idx] = f"{rel} entry {pos}"
                    entries.append((idx, item))
            entries.sort(key=lambda t: t[0])
            for _, item in entries:
                yield item

    def _entry(self, rel: str, pos: int, e: Any, split: str, iroot: Root) -> tuple[int, Item] | Quarantine:
        if not isinstance(e, dict):
            return self.bad(rel, f"entry {pos} is a JSON {type(e).__name__}, not a JSON object", _rec(e))
        where = f"entry {pos}"
        idx = e.get("idx")
        if isinstance(idx, str) and idx.strip().isdigit():
            idx = int(idx)
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            return self.bad(rel, f"{where}: 'idx' is {idx!r}, not a non-negative integer", _rec(e))
        where = f"entry {pos} (idx {idx})"
        q = e.get("question")
        if not isinstance(q, str) or not q.strip():
            return self.bad(rel, f"{where}: 'question' is missing or empty", _rec(e))
        ctype = e.get("content_type")
        ctype = ctype.strip().lower() if isinstance(ctype, str) else ctype
        if ctype not in QUESTION_TYPES:
            return self.bad(rel, f"{where}: content_type {ctype!r} is not one of {QUESTION_TYPES}", _rec(e))
        ans = e.get("answer")
        if isinstance(ans, str):
            ans = [ans] if ans.strip() else []
        if not isinstance(ans, list) or not all(isinstance(a, str) for a in ans):
            return self.bad(rel, f"{where}: 'answer' is {ans!r}, expected a list of strings", _rec(e))
        ans = [a.strip() for a in ans if a.strip()]
        if ctype == "gender":
            ans = [{"m": "male", "f": "female"}.get(a.lower(), a) for a in ans]
        answer = grounding.join_list(ans) if ans else "none"
        dicom = e.get("image_id")
        dicom = dicom.strip() if isinstance(dicom, str) else ""
        why = _bad_id("dicom_id", dicom)
        if why:
            return self.bad(rel, f"{where}: image_id: {why}", _rec(e))
        subject, study = _id(e.get("subject_id")), _id(e.get("study_id"))
        raw = e.get("image_path")
        if isinstance(raw, str) and raw.strip():
            parsed, why = _parse_mimic_path(iroot, raw.strip())
            if parsed is None:
                return self.bad(rel, f"{where}: image_path: {why}", _rec(e))
            for name, mine, theirs in (("subject_id", subject, parsed[0]), ("study_id", study, parsed[1]),
                                       ("image_id", dicom, parsed[2])):
                if mine and mine != theirs:
                    return self.bad(rel, f"{where}: image_path {raw!r} does not match {name} {mine!r}", _rec(e))
            subject, study = parsed[0], parsed[1]
        for name, value in (("subject_id", subject), ("study_id", study)):
            why = _bad_id(name, value)
            if why:
                return self.bad(rel, f"{where}: no image_path and {why}" if not raw else f"{where}: {why}", _rec(e))
        rid = f"{split}-{idx}"
        return idx, Item(record_id=rid, patient_id=f"mimic:{subject}", study_id=f"mimic:s{study}", task="vqa",
                         prompt=q.strip(), answer=answer, images=[_img(iroot, self.root, image_path(subject, study,
                                                                                                     dicom))],
                         split=split if self.official_split else "", question_type=ctype, file=f"{rel}#{pos}")


# ------------------------------------------------------------------------------------------------ Medical-CXR-VQA

class MedicalCxrVqaSource(Source):
    """Medical-CXR-VQA (Hu et al., Medical Image Analysis 2024; PhysioNet ``medical-cxr-vqa-dataset`` 1.0.0).

    Files: the questions CSV ``medical_cxr_vqa_questions.csv`` (the authors' README name; ``medical-cxr-vqa-
    questions.csv`` is accepted, ``.csv.gz`` too) with ``study_id``, ``subject_id``, ``question_type`` (abnormality,
    presence, view, location, level, type), ``question``, ``answer``, and — tolerated, not confirmed —
    ``dicom_id`` and ``split`` (train / val / test); ``mimic_all.csv`` (study metadata: subject_id, study_id,
    dicom_id, view = postero-anterior / antero-posterior, split, ...) names the image of each study (a row's own
    ``dicom_id`` wins). Without a usable ``mimic_all.csv`` (one Quarantine says so) the frontal image (PA, then AP,
    then any; ties by DICOM id) of MIMIC-CXR-JPG's metadata under ``images_root`` is used instead.

    One ``vqa`` Item per row: record id ``s<study>-<hash of the question>`` (the authors generate each question at
    most once per study, so (study, question) is the key; a repeat is quarantined); prompt = question;
    question_type = question_type (a type outside schema.QUESTION_TYPES, e.g. Diff-VQA's ``difference``, is
    quarantined); answer as published, except that an ``abnormality`` answer listing several findings
    ("a, b, c") is rejoined with ``" | "`` so the VQA metric compares it as a set. Split from the ``split`` column
    when there is one (val -> validate), else ``""`` (seeded). Rows stream in file order. Options: ``images_root``,
    ``official_split``.
    """

    name = "medical_cxr_vqa"
    option_names = ("images_root", "official_split")
    QUESTIONS = ("medical_cxr_vqa_questions", "medical-cxr-vqa-questions")
    REQUIRED = ("study_id", "subject_id", "question_type", "question", "answer")
    VIEWS = {"postero-anterior": "PA", "antero-posterior": "AP", "pa": "PA", "ap": "AP"}

    def __init__(self, root: Root, **options: Any):
        super().__init__(root, **options)
        self.official_split = _bool_option(options, "official_split", True)

    def _study_images(self, iroot: Root, out: dict[str, tuple[str, str, str]]) -> Generator[Quarantine, None, str]:
        """Fill ``out`` (study -> (subject, dicom, view)) from ``mimic_all.csv``, or — when that file is missing or
        unusable — from MIMIC-CXR-JPG's metadata under ``images_root``. A study with several rows gets its
        frontal image (PA, then AP, then any; ties by DICOM id)."""
        rank = {"PA": 0, "AP": 1}
        best: dict[str, tuple[int, str, str, str]] = {}

        def offer(study: str, subject: str, dicom: str, view: str) -> None:
            cand = (rank.get(view, 2), dicom, subject, view)
            if study not in best or cand < best[study]:
                best[study] = cand

        rel = self.root.first(*_csv_names("mimic_all"))
        usable = False
        if rel is None:
            yield self.bad("mimic_all.csv", "mimic_all.csv missing; images chosen from MIMIC-CXR-JPG's metadata "
                                            "(frontal first)")
        else:
            table, q = _open_table(self, self.root, rel, ("study_id", "dicom_id"))
            if q:
                yield self.bad(q.file, q.reason + "; images chosen from MIMIC-CXR-JPG's metadata")
            else:
                usable = True
                for line, row, q in table.rows(self.bad):
                    if q:
                        yield q
                        continue
                    study, dicom, subject = _id(row["study_id"]), row["dicom_id"], _id(row.get("subject_id", ""))
                    why = _bad_id("study_id", study) or _bad_id("dicom_id", dicom) or (
                        _bad_id("subject_id", subject) if subject else None)
                    if why:
                        yield self.bad(rel, f"line {line}: {why}", _rec(row))
                        continue
                    raw_view = row.get("view", "").strip()
                    offer(study, subject, dicom, self.VIEWS.get(raw_view.lower(), raw_view.upper()))
        if not usable:
            meta = iroot.first(*_csv_names("mimic-cxr-2.0.0-metadata"))
            if meta is None:
                yield self.bad("mimic-cxr-2.0.0-metadata.csv(.gz)", f"no image index: no usable mimic_all.csv and "
                                                                    f"images_root {iroot.uri} has no metadata")
            else:
                table, q = _open_table(self, iroot, meta, ("dicom_id", "subject_id", "study_id"))
                if q:
                    yield q
                else:
                    for _, row, q in table.rows(self.bad):
                        if q:
                            continue  # MIMIC-CXR-JPG's own faults are the mimic_cxr source's to report
                        study, dicom, subject = _id(row["study_id"]), row["dicom_id"], _id(row["subject_id"])
                        if _bad_id("study_id", study) or _bad_id("dicom_id", dicom) or _bad_id("subject_id", subject):
                            continue
                        offer(study, subject, dicom, row.get("ViewPosition", "").strip().upper())
        for study, (_, dicom, subject, view) in best.items():
            out[study] = (subject, dicom, view)
        return rel if usable else f"{iroot.uri}/mimic-cxr-2.0.0-metadata"

    def items(self) -> Iterator[Item | Quarantine]:
        rel = self.root.first(*_csv_names(*self.QUESTIONS))
        if rel is None:
            raise ValueError(f"source {self.name}: {self.root.uri} holds no {self.QUESTIONS[0]}.csv — give the "
                             f"medical-cxr-vqa-dataset/<version> folder as the root")
        iroot = _images_root(self)
        studies: dict[str, tuple[str, str, str]] = {}
        index = yield from self._study_images(iroot, studies)
        table, q = _open_table(self, self.root, rel, self.REQUIRED)
        if q:
            yield q
            return
        cols = table.columns
        has_split, has_dicom = "split" in cols, "dicom_id" in cols or "image_id" in cols
        seen: dict[bytes, int] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            subject, study = _id(row["subject_id"]), _id(row["study_id"])
            why = _bad_id("subject_id", subject) or _bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", _rec(row))
                continue
            qtype = row["question_type"].strip().lower()
            if qtype not in QUESTION_TYPES:
                yield self.bad(rel, f"line {line}: question_type {row['question_type']!r} is not one of "
                                    f"{QUESTION_TYPES}", _rec(row))
                continue
            question, answer = row["question"].strip(), row["answer"].strip()
            if not question or not answer:
                yield self.bad(rel, f"line {line}: {'question' if not question else 'answer'} is empty", _rec(row))
                continue
            key = hashlib.blake2b(f"{study}\x00{question}".encode(), digest_size=12).digest()
            if key in seen:
                yield self.bad(rel, f"line {line}: duplicate question for study {study} (first at line {seen[key]})"
                                    f"; kept the first", _rec(row))
                continue
            seen[key] = line
            split = ""
            if has_split:
                sp = _split(row["split"])
                if sp is None:
                    yield self.bad(rel, f"line {line}: split value {row['split']!r} is not train/val/test", _rec(row))
                    continue
                split = sp if self.official_split else ""
            dicom = (row.get("dicom_id") or row.get("image_id") or "").strip() if has_dicom else ""
            view = ""
            if dicom:
                why = _bad_id("dicom_id", dicom)
                if why:
                    yield self.bad(rel, f"line {line}: {why}", _rec(row))
                    continue
                known = studies.get(study)
                view = known[2] if known and known[1] == dicom else ""
            else:
                known = studies.get(study)
                if known is None:
                    yield self.bad(rel, f"line {line}: no image known for study {study} (not in {index})", _rec(row))
                    continue
                if known[0] and known[0] != subject:
                    yield self.bad(rel, f"line {line}: study {study} belongs to subject {known[0]} in the image "
                                        f"index, not {subject}", _rec(row))
                    continue
                dicom, view = known[1], known[2]
            if qtype == "abnormality" and "," in answer and answer.lower() not in ("yes", "no"):
                answer = grounding.join_list([a.strip() for a in answer.split(",") if a.strip()])
            rid = f"s{study}-{_digest(question)}"
            yield Item(record_id=rid, patient_id=f"mimic:{subject}", study_id=f"mimic:s{study}", task="vqa",
                       prompt=question, answer=answer, images=[_img(iroot, self.root, image_path(subject, study,
                                                                                                   dicom))],
                       split=split, view=view, question_type=qtype, file=f"{rel}:{line}")
