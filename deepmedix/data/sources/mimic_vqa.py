"""The VQA adapters on MIMIC-CXR-JPG images: ``mimic_cxr_vqa`` (MIMIC-CXR-VQA, EHRXQA authors) and
``medical_cxr_vqa`` (Medical-CXR-VQA, Hu et al. 2024), one ``vqa`` Item per question.

Ids, quarantine rules and ``official_split`` follow the MIMIC-CXR family conventions described in
:mod:`deepmedix.data.sources.mimic_common`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Generator, Iterator

from deepmedix import grounding
from deepmedix.data.schema import QUESTION_TYPES
from deepmedix.data.sources.base import BadInput, Item, Quarantine, Root, Source
from deepmedix.data.sources.mimic import CHEXPERT_LABELS, META_COLUMNS
from deepmedix.data.sources.mimic_common import (
    bad_id,
    bool_option,
    csv_names,
    digest,
    image_path,
    image_ref,
    images_root,
    mimic_id,
    norm_split,
    open_table,
    parse_mimic_path,
    rec,
)
from deepmedix.errors import InputError

__all__ = ["MimicCxrVqaSource", "MedicalCxrVqaSource"]

# Medical-CXR-VQA's mimic_all.csv header (the columns read here, its CheXpert labels and the rest it publishes)
MIMIC_ALL_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS, "dicom_id", "view", "split", "study_date",
                     "study_order")


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
        self.official_split = bool_option(options, "official_split", True)

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
            raise InputError(f"source {self.name}: {self.root.uri} holds no train/valid/test.json (looked in "
                             f"{[x or '<root>' for x in self.DIRS]})")
        iroot = images_root(self)
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
                                            f"{seen[idx]}); kept the first", rec(e))
                        continue
                    seen[idx] = f"{rel} entry {pos}"
                    entries.append((idx, item))
            entries.sort(key=lambda t: t[0])
            for _, item in entries:
                yield item

    def _entry(self, rel: str, pos: int, e: Any, split: str, iroot: Root) -> tuple[int, Item] | Quarantine:
        if not isinstance(e, dict):
            return self.bad(rel, f"entry {pos} is a JSON {type(e).__name__}, not a JSON object", rec(e))
        where = f"entry {pos}"
        idx = e.get("idx")
        if isinstance(idx, str) and idx.strip().isdigit():
            idx = int(idx)
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            return self.bad(rel, f"{where}: 'idx' is {idx!r}, not a non-negative integer", rec(e))
        where = f"entry {pos} (idx {idx})"
        q = e.get("question")
        if not isinstance(q, str) or not q.strip():
            return self.bad(rel, f"{where}: 'question' is missing or empty", rec(e))
        ctype = e.get("content_type")
        ctype = ctype.strip().lower() if isinstance(ctype, str) else ctype
        if ctype not in QUESTION_TYPES:
            return self.bad(rel, f"{where}: content_type {ctype!r} is not one of {QUESTION_TYPES}", rec(e))
        ans = e.get("answer")
        if isinstance(ans, str):
            ans = [ans] if ans.strip() else []
        if not isinstance(ans, list) or not all(isinstance(a, str) for a in ans):
            return self.bad(rel, f"{where}: 'answer' is {ans!r}, expected a list of strings", rec(e))
        ans = [a.strip() for a in ans if a.strip()]
        if ctype == "gender":
            ans = [{"m": "male", "f": "female"}.get(a.lower(), a) for a in ans]
        answer = grounding.join_list(ans) if ans else "none"
        dicom = e.get("image_id")
        dicom = dicom.strip() if isinstance(dicom, str) else ""
        why = bad_id("dicom_id", dicom)
        if why:
            return self.bad(rel, f"{where}: image_id: {why}", rec(e))
        subject, study = mimic_id(e.get("subject_id")), mimic_id(e.get("study_id"))
        raw = e.get("image_path")
        if isinstance(raw, str) and raw.strip():
            parsed, why = parse_mimic_path(iroot, raw.strip())
            if parsed is None:
                return self.bad(rel, f"{where}: image_path: {why}", rec(e))
            for name, mine, theirs in (("subject_id", subject, parsed[0]), ("study_id", study, parsed[1]),
                                       ("image_id", dicom, parsed[2])):
                if mine and mine != theirs:
                    return self.bad(rel, f"{where}: image_path {raw!r} does not match {name} {mine!r}", rec(e))
            subject, study = parsed[0], parsed[1]
        for name, value in (("subject_id", subject), ("study_id", study)):
            why = bad_id(name, value)
            if why:
                return self.bad(rel, f"{where}: no image_path and {why}" if not raw else f"{where}: {why}", rec(e))
        rid = f"{split}-{idx}"
        return idx, Item(record_id=rid, patient_id=f"mimic:{subject}", study_id=f"mimic:s{study}", task="vqa",
                         prompt=q.strip(), answer=answer,
                         images=[image_ref(iroot, self.root, image_path(subject, study, dicom))],
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
        self.official_split = bool_option(options, "official_split", True)

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

        rel = self.root.first(*csv_names("mimic_all"))
        usable = False
        if rel is None:
            yield self.bad("mimic_all.csv", "mimic_all.csv missing; images chosen from MIMIC-CXR-JPG's metadata "
                                            "(frontal first)")
        else:
            table, q = open_table(self, self.root, rel, ("study_id", "dicom_id"), MIMIC_ALL_COLUMNS)
            if q:
                yield self.bad(q.file, q.reason + "; images chosen from MIMIC-CXR-JPG's metadata")
            else:
                usable = True
                for line, row, q in table.rows(self.bad):
                    if q:
                        yield q
                        continue
                    study, dicom, subject = (mimic_id(row["study_id"]), row["dicom_id"],
                                             mimic_id(row.get("subject_id", "")))
                    why = bad_id("study_id", study) or bad_id("dicom_id", dicom) or (
                        bad_id("subject_id", subject) if subject else None)
                    if why:
                        yield self.bad(rel, f"line {line}: {why}", rec(row))
                        continue
                    raw_view = row.get("view", "").strip()
                    offer(study, subject, dicom, self.VIEWS.get(raw_view.lower(), raw_view.upper()))
        if not usable:
            meta = iroot.first(*csv_names("mimic-cxr-2.0.0-metadata"))
            if meta is None:
                yield self.bad("mimic-cxr-2.0.0-metadata.csv(.gz)", f"no image index: no usable mimic_all.csv and "
                                                                    f"images_root {iroot.uri} has no metadata")
            else:
                table, q = open_table(self, iroot, meta, ("dicom_id", "subject_id", "study_id"), META_COLUMNS)
                if q:
                    yield q
                else:
                    for _, row, q in table.rows(self.bad):
                        if q:
                            continue  # MIMIC-CXR-JPG's own faults are the mimic_cxr source's to report
                        study, dicom, subject = mimic_id(row["study_id"]), row["dicom_id"], mimic_id(row["subject_id"])
                        if bad_id("study_id", study) or bad_id("dicom_id", dicom) or bad_id("subject_id", subject):
                            continue
                        offer(study, subject, dicom, row.get("ViewPosition", "").strip().upper())
        for study, (_, dicom, subject, view) in best.items():
            out[study] = (subject, dicom, view)
        return rel if usable else f"{iroot.uri}/mimic-cxr-2.0.0-metadata"

    def items(self) -> Iterator[Item | Quarantine]:
        rel = self.root.first(*csv_names(*self.QUESTIONS))
        if rel is None:
            raise InputError(f"source {self.name}: {self.root.uri} holds no {self.QUESTIONS[0]}.csv — give the "
                             f"medical-cxr-vqa-dataset/<version> folder as the root")
        iroot = images_root(self)
        studies: dict[str, tuple[str, str, str]] = {}
        index = yield from self._study_images(iroot, studies)
        table, q = open_table(self, self.root, rel, self.REQUIRED, ("split", "dicom_id", "image_id"))
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
            subject, study = mimic_id(row["subject_id"]), mimic_id(row["study_id"])
            why = bad_id("subject_id", subject) or bad_id("study_id", study)
            if why:
                yield self.bad(rel, f"line {line}: {why}", rec(row))
                continue
            qtype = row["question_type"].strip().lower()
            if qtype not in QUESTION_TYPES:
                yield self.bad(rel, f"line {line}: question_type {row['question_type']!r} is not one of "
                                    f"{QUESTION_TYPES}", rec(row))
                continue
            question, answer = row["question"].strip(), row["answer"].strip()
            if not question or not answer:
                yield self.bad(rel, f"line {line}: {'question' if not question else 'answer'} is empty", rec(row))
                continue
            key = hashlib.blake2b(f"{study}\x00{question}".encode(), digest_size=12).digest()
            if key in seen:
                yield self.bad(rel, f"line {line}: duplicate question for study {study} (first at line {seen[key]})"
                                    f"; kept the first", rec(row))
                continue
            seen[key] = line
            split = ""
            if has_split:
                sp = norm_split(row["split"])
                if sp is None:
                    yield self.bad(rel, f"line {line}: split value {row['split']!r} is not train/val/test", rec(row))
                    continue
                split = sp if self.official_split else ""
            dicom = (row.get("dicom_id") or row.get("image_id") or "").strip() if has_dicom else ""
            view = ""
            if dicom:
                why = bad_id("dicom_id", dicom)
                if why:
                    yield self.bad(rel, f"line {line}: {why}", rec(row))
                    continue
                known = studies.get(study)
                view = known[2] if known and known[1] == dicom else ""
            else:
                known = studies.get(study)
                if known is None:
                    yield self.bad(rel, f"line {line}: no image known for study {study} (not in {index})", rec(row))
                    continue
                if known[0] and known[0] != subject:
                    yield self.bad(rel, f"line {line}: study {study} belongs to subject {known[0]} in the image "
                                        f"index, not {subject}", rec(row))
                    continue
                dicom, view = known[1], known[2]
            if qtype == "abnormality" and "," in answer and answer.lower() not in ("yes", "no"):
                answer = grounding.join_list([a.strip() for a in answer.split(",") if a.strip()])
            rid = f"s{study}-{digest(question)}"
            yield Item(record_id=rid, patient_id=f"mimic:{subject}", study_id=f"mimic:s{study}", task="vqa",
                       prompt=question, answer=answer,
                       images=[image_ref(iroot, self.root, image_path(subject, study, dicom))],
                       split=split, view=view, question_type=qtype, file=f"{rel}:{line}")
