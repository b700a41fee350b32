"""The ``manifest`` source: a hospital's own studies, one example a row, in ``DIR/manifest.jsonl`` or
``DIR/manifest.csv`` (``deepmedix curate --source manifest --root DIR``; in a mix, ``{name: manifest, root: DIR}``).

Fields (CSV column names are matched ignoring case and whitespace, in any order):

* ``patient_id``, ``study_id`` — text (numbers are taken as text);
* ``image`` — a path relative to DIR (PNG, JPEG or DICOM); several views of the study as a JSON list, or in CSV
  ``|``-separated. The first image is the one ``boxes`` are drawn on;
* ``task`` — ``report_findings``, ``report_impression``, ``vqa`` or ``grounding``;
* ``answer`` — the report section, the VQA answer, or for grounding the finding's name;
* ``question`` — optional for reports (the curated paraphrases are used) and for grounding
  (``Locate the <answer> in this image.``), required for ``vqa``;
* ``question_type`` — for ``vqa``: one of :data:`~deepmedix.data.schema.QUESTION_TYPES`; when absent, a yes/no
  answer is ``presence`` and any other answer needs it;
* ``boxes`` — optional (required for grounding): a JSON list of ``{"label": ..., "box": [x1, y1, x2, y2]}`` in the
  first image's own pixels;
* ``view`` (optional, e.g. ``PA``), ``split`` (optional: ``train``, ``validate``/``val``, ``test``; else the seeded
  patient-level split), ``id`` (optional: the record id, else one derived from the study, task and content).

A bad row is quarantined with its line number and the reason (not JSON, not UTF-8, a missing or empty field, an
unknown task, an image path leaving DIR or missing, a malformed box, a duplicate id), keeping its ids and image
paths but none of its text; the rest of the file is kept. ``patient_id`` and ``study_id`` are kept as given
(``manifest:<patient_id>``): give pseudonyms, not medical record numbers. A box outside its image is found when
the image is decoded (the engine names the line too). PHI scrubbing of the texts, image de-duplication and the
patient-level split apply as for the public sources.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any, Iterator

from deepmedix.data import prompts
from deepmedix.data.schema import QUESTION_TYPES, TASKS, Box
from deepmedix.data.sources.base import (
    BadInput,
    HeaderError,
    ImageRef,
    Item,
    Quarantine,
    Source,
    match_columns,
    slug,
)
from deepmedix.data.sources.mimic_common import digest, norm_split, rec
from deepmedix.errors import InputError

__all__ = ["ManifestSource", "FIELDS", "REQUIRED"]

REQUIRED = ("patient_id", "study_id", "image", "task", "answer")
FIELDS = (*REQUIRED, "id", "view", "question", "question_type", "boxes", "split")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RowError(Exception):
    """A row to quarantine (the reason, without the line)."""


class ManifestSource(Source):
    name = "manifest"

    def _rows(self) -> tuple[str, Iterator[tuple[int, Any]]]:
        """The manifest file and its rows as (line, dict | RowError)."""
        found = [name for name in ("manifest.jsonl", "manifest.csv") if self.root.exists(name)]
        if not found:
            raise InputError(f"source manifest: {self.root.uri} holds no manifest.jsonl or manifest.csv")
        if len(found) == 2:
            raise InputError(f"source manifest: {self.root.uri} holds both manifest.jsonl and manifest.csv; keep one")
        rel = found[0]
        data = self.root.read_bytes(rel)
        return rel, (_jsonl_rows(data) if rel.endswith(".jsonl") else _csv_rows(rel, data))

    def items(self) -> Iterator[Item | Quarantine]:
        rel, rows = self._rows()
        seen: dict[str, int] = {}
        for line, row in rows:
            where = f"{rel} line {line}"
            if isinstance(row, RowError):
                yield self.bad(rel, f"line {line}: {row}")
                continue
            try:
                item = self._item(row, where)
            except RowError as exc:
                yield self.bad(rel, f"line {line}: {exc}", _ids(row))
                continue
            if item.record_id in seen:
                yield self.bad(rel, f"line {line}: duplicate of line {seen[item.record_id]} (id {item.record_id})",
                               _ids(row))
                continue
            seen[item.record_id] = line
            yield item

    def _item(self, row: dict[str, Any], where: str) -> Item:
        unknown = sorted(k for k in row if k not in FIELDS)
        if unknown:
            raise RowError(f"unknown field(s) {unknown}; the fields are {list(FIELDS)}")
        val = {k: _text(k, row.get(k)) for k in FIELDS if k not in ("image", "boxes")}
        for k in REQUIRED:
            if k not in ("image",) and not val[k]:
                raise RowError(f"field '{k}' is missing or empty")
        task = val["task"]
        if task not in TASKS:
            raise RowError(f"task {task!r} is not one of {list(TASKS)}")
        images = self._images(row.get("image"))
        boxes = _boxes(row.get("boxes"))
        if task == "grounding" and not boxes:
            raise RowError("a grounding row needs boxes")
        question, qtype = val["question"], val["question_type"].lower()
        if task == "vqa":
            if not question:
                raise RowError("field 'question' is missing or empty (a vqa row needs it)")
            if not qtype:
                if val["answer"].lower() not in ("yes", "no"):
                    raise RowError(f"field 'question_type' is missing; answer {val['answer']!r} is not yes/no, so "
                                   f"name one of {list(QUESTION_TYPES)}")
                qtype = "presence"
            if qtype not in QUESTION_TYPES:
                raise RowError(f"question_type {qtype!r} is not one of {list(QUESTION_TYPES)}")
        split = ""
        if val["split"]:
            split = norm_split(val["split"]) or ""
            if not split:
                raise RowError(f"split {val['split']!r} is not train, validate or test")
        rid = val["id"] or f"{slug(val['study_id'])}-{task}-" + digest(json.dumps(
            [question, val["answer"], qtype, [i.path for i in images], [[b.label, b.box] for b in boxes]]), 5)
        if not _ID_RE.match(rid):
            raise RowError(f"id {rid!r} is not a plain name (letters, digits, . _ -)")
        if not question:
            question = {"report_findings": prompts.findings_prompt, "report_impression": prompts.impression_prompt,
                        "grounding": lambda _k: prompts.grounding_prompt(val["answer"])}[task](rid)
        return Item(record_id=rid, patient_id=f"manifest:{val['patient_id']}", study_id=val["study_id"], task=task,
                    prompt=question, answer=val["answer"], images=images, split=split, view=val["view"].upper(),
                    question_type=qtype if task == "vqa" else "", boxes=boxes, file=where)

    def _images(self, value: Any) -> list[ImageRef]:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise RowError(f"field 'image' is not a JSON list ({exc.msg})") from None
            else:
                value = [p.strip() for p in text.split("|")]
        if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise RowError("field 'image' must be a path, or a non-empty list of paths")
        out = []
        for path in value:
            try:
                norm = self.root.safe(path.strip())
            except BadInput as exc:
                raise RowError(f"image {path!r}: {exc.reason}") from None
            if not self.root.exists(norm):
                raise RowError(f"image {path!r} not found under the manifest's folder")
            out.append(ImageRef(path=norm))
        return out


def _ids(row: Any) -> str:
    """What a quarantine entry keeps of a bad row: its ids, task and image paths, never its free text (a report
    or answer may hold what PHI scrubbing would have removed)."""
    keep = ("id", "patient_id", "study_id", "task", "image")
    return rec({k: row.get(k) for k in keep if k in row}) if isinstance(row, dict) else ""


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowError(f"field '{name}' must be text, got {type(value).__name__}")
    return str(value).strip()


def _boxes(value: Any) -> list[Box]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"field 'boxes' is not JSON ({exc.msg})") from None
    if not isinstance(value, list):
        raise RowError("field 'boxes' must be a list of {\"label\": ..., \"box\": [x1, y1, x2, y2]}")
    out = []
    for n, b in enumerate(value, 1):
        if not isinstance(b, dict) or not isinstance(b.get("label"), str) or not b["label"].strip():
            raise RowError(f"box {n}: needs a 'label' (text) and a 'box'")
        box = b.get("box")
        if not (isinstance(box, list) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise RowError(f"box {n} ({b['label']}): 'box' must be four finite numbers [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if min(box) < 0 or not (x1 < x2 and y1 < y2):
            raise RowError(f"box {n} ({b['label']}): {box} is negative or has no area (x1 < x2, y1 < y2)")
        out.append(Box(b["label"].strip(), [x1, y1, x2, y2]))
    return out


def _jsonl_rows(data: bytes) -> Iterator[tuple[int, Any]]:
    for n, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield n, RowError(f"not UTF-8 text (byte {exc.start})")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield n, RowError(f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        yield n, obj if isinstance(obj, dict) else RowError(f"a JSON {type(obj).__name__}, not an object")


def _csv_rows(rel: str, data: bytes) -> Iterator[tuple[int, Any]]:
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, [])
    except csv.Error as exc:
        raise BadInput(rel, f"header is not readable CSV ({exc})") from None
    columns = match_columns(rel, header, REQUIRED, FIELDS)
    unknown = [c for c in columns if c and c not in FIELDS]
    if unknown:  # a header problem stops the source; it must not quarantine every row
        raise HeaderError(f"{rel}: unknown column(s) {unknown}; found {[h.strip() for h in header]}; the columns are "
                          f"{list(FIELDS)} (matched ignoring case and spaces)")
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, RowError(f"not readable CSV ({exc}); the rest of the file is skipped")
            return
        if not cells or all(not c.strip() for c in cells):
            continue
        if any("\udc80" <= ch <= "\udcff" for c in cells for ch in c):
            yield line, RowError("not UTF-8 text")
            continue
        if len(cells) != len(columns):
            yield line, RowError(f"{len(cells)} fields, the header has {len(columns)}")
            continue
        yield line, {k: v for k, v in zip(columns, cells) if k and (v.strip() or k in REQUIRED)}
