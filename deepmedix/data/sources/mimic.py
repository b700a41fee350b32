"""The ``mimic_cxr`` adapter: MIMIC-CXR-JPG 2.x reports, one Item per study and report task (findings, impression).

The other sources built on MIMIC-CXR live in :mod:`deepmedix.data.sources.ms_cxr` and
:mod:`deepmedix.data.sources.mimic_vqa`; the id namespace, the quarantine rules and ``official_split`` they all
share are described in :mod:`deepmedix.data.sources.mimic_common`.
"""

from __future__ import annotations

from typing import Any, Generator, Iterator

from deepmedix.data import prompts, text
from deepmedix.data.schema import REPORT_TASKS
from deepmedix.data.sources.base import BadInput, ImageRef, Item, Quarantine, Root, Source, open_root
from deepmedix.data.sources.mimic_common import (
    bad_id,
    bool_option,
    csv_names,
    image_path,
    mimic_id,
    norm_split,
    open_table,
    rec,
    report_path,
)
from deepmedix.errors import InputError

__all__ = ["MimicCxrSource", "CHEXPERT_LABELS"]

CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                   "Pneumonia", "Pneumothorax", "Support Devices")
# mimic-cxr-2.0.0-metadata.csv's published header (MIMIC-CXR-JPG 2.x)
META_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
_REPORT_PREFIXES = ("files/", "mimic-cxr-reports/files/", "", "mimic-cxr-reports/")


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
            raise InputError(f"source {self.name}: option 'labels' must be 'chexpert' or 'negbio', got {labels!r}")
        self.labels = labels
        tasks = options.get("tasks", REPORT_TASKS)
        tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks or ())
        unknown = [t for t in tasks if t not in REPORT_TASKS]
        if unknown or not tasks:
            raise InputError(f"source {self.name}: option 'tasks' must be a non-empty subset of {REPORT_TASKS}, "
                             f"got {list(tasks)}")
        self.tasks = tuple(t for t in REPORT_TASKS if t in tasks)
        self.official_split = bool_option(options, "official_split", True)

    # -- the tables
    def _metadata_file(self) -> str:
        rel = self.root.first(*csv_names("mimic-cxr-2.0.0-metadata"))
        if rel is None:
            raise InputError(f"source {self.name}: {self.root.uri} holds no mimic-cxr-2.0.0-metadata.csv(.gz) — "
                             f"give the mimic-cxr-jpg/2.x.y folder as the root")
        return rel

    def _splits(self, out: dict[str, str]) -> Generator[Quarantine, None, bool]:
        """Fill ``out`` (study_id -> split) from the split CSV, yielding its faults; returns whether there was a
        usable split file."""
        rel = self.root.first(*csv_names("mimic-cxr-2.0.0-split"))
        if rel is None:
            yield self.bad("mimic-cxr-2.0.0-split.csv(.gz)", "split file missing; every study gets the seeded "
                                                              "patient split")
            return False
        table, q = open_table(self, self.root, rel, ("study_id", "split"), ("dicom_id", "subject_id"))
        if q:
            yield self.bad(q.file, q.reason + "; every study gets the seeded patient split")
            return False
        first_line: dict[str, int] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            study = mimic_id(row["study_id"])
            why = bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", rec(row))
                continue
            sp = norm_split(row["split"])
            if sp is None:
                yield self.bad(rel, f"line {line}: split value {row['split']!r} for study {study} is not "
                                    f"train/validate/test", rec(row))
                continue
            if study in out and out[study] != sp:
                yield self.bad(rel, f"line {line}: study {study} is {sp!r} here but {out[study]!r} at line "
                                    f"{first_line[study]}; kept {out[study]!r}", rec(row))
                continue
            out.setdefault(study, sp)
            first_line.setdefault(study, line)
        return True

    def _labels(self, out: dict[str, list[str]]) -> Iterator[Quarantine]:
        """Fill ``out`` (study_id -> positive label names), yielding the label file's faults."""
        stem = f"mimic-cxr-2.0.0-{self.labels}"
        rel = self.root.first(*csv_names(stem))
        if rel is None:
            yield self.bad(f"{stem}.csv(.gz)", f"{self.labels} label file missing; findings left empty")
            return
        table, q = open_table(self, self.root, rel, ("study_id",), ("subject_id", *CHEXPERT_LABELS))
        if q:
            yield self.bad(q.file, q.reason + "; findings left empty")
            return
        names = [c for c in table.columns if c not in ("subject_id", "study_id") and c]
        first_line: dict[str, int] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            study = mimic_id(row["study_id"])
            why = bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", rec(row))
                continue
            if study in out:
                yield self.bad(rel, f"line {line}: duplicate label row for study {study} (first at line "
                                    f"{first_line[study]}); kept the first", rec(row))
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
                                    f"1.0, 0.0, -1.0 or blank); its findings left empty", rec(row))
                pos = []
            out[study] = pos
            first_line[study] = line

    def _metadata(self, studies: dict[str, dict[str, Any]]) -> Generator[Quarantine, None, str]:
        """Fill ``studies`` (study_id -> subject, first line, [(view, dicom)]), yielding the metadata's faults;
        returns the metadata file's path."""
        rel = self._metadata_file()
        table, q = open_table(self, self.root, rel, ("dicom_id", "subject_id", "study_id", "ViewPosition"),
                              META_COLUMNS)
        if q:
            yield q
            return rel
        seen: dict[str, tuple[int, str]] = {}
        for line, row, q in table.rows(self.bad):
            if q:
                yield q
                continue
            dicom, subject, study = row["dicom_id"], mimic_id(row["subject_id"]), mimic_id(row["study_id"])
            why = bad_id("dicom_id", dicom) or bad_id("subject_id", subject) or bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", rec(row))
                continue
            if dicom in seen:
                yield self.bad(rel, f"line {line}: duplicate dicom_id {dicom} (first at line {seen[dicom][0]}, study "
                                    f"{seen[dicom][1]}); kept the first", rec(row))
                continue
            s = studies.get(study)
            if s is not None and s["subject"] != subject:
                yield self.bad(rel, f"line {line}: dicom {dicom} puts study {study} under subject {subject}, but "
                                    f"line {s['line']} has it under subject {s['subject']}; row dropped", rec(row))
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
                                             f"split CSV", rec({"subject_id": subject, "study_id": study}))
                    continue
                split = splits[study] if self.official_split else ""
            images = sorted(s["images"], key=lambda v: (rank.get(v[0], 2), v[1]))
            txt, rpath, why = self._report(rroot, subject, study, order)
            if txt is None:
                yield self.bad(rpath, why, rec({"subject_id": subject, "study_id": study}))
                continue
            if not txt.strip():
                yield self.bad(rpath, f"report of study {study} is empty", rec({"study_id": study}))
                continue
            secs = text.sections(txt)
            found = {"report_findings": secs.get("FINDINGS", ""),
                     "report_impression": secs.get("IMPRESSION") or secs.get("CONCLUSION", "")}
            if not found["report_findings"] and not found["report_impression"]:
                yield self.bad(rpath, f"report of study {study} has no FINDINGS or IMPRESSION section "
                                      f"(sections: {sorted(secs) or 'none'})", rec({"study_id": study}))
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
