"""Conventions and helpers shared by the adapters for MIMIC-CXR and the datasets built on it.

The adapters (:mod:`~deepmedix.data.sources.mimic`, :mod:`~deepmedix.data.sources.ms_cxr`,
:mod:`~deepmedix.data.sources.mimic_vqa`) each read one dataset in its own published layout. All four share the
MIMIC-CXR-JPG image tree (``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg``) and its patients, so their ids share one
namespace: ``patient_id = "mimic:<subject_id>"``, ``study_id = "mimic:s<study_id>"``. The adapters
never open an image (the engine decodes them and quarantines a missing or broken one); they only build the paths
from ids they have checked (digits for subject/study, hex-and-dash for DICOM ids), so a path can never leave the
image root.

Bad data never raises: a bad row, a duplicate id, a missing or unreadable report, an escaping path becomes a
:class:`Quarantine` (file, reason naming the row/column/id and the fault, and the offending record) and the stream
goes on. A missing *secondary* file (split, labels, one VQA split file, ``mimic_all.csv``) is one Quarantine naming
the file. Only a wrong configuration raises ``ValueError``: an unknown option value, or a root that holds none of
the dataset's main index (nothing could be curated, so the caller must hear about it).

Sources (options in brackets):

* ``mimic_cxr`` (``mimic.py``) — MIMIC-CXR-JPG 2.x reports [reports_root, labels, tasks, official_split]
* ``ms_cxr`` (``ms_cxr.py``) — MS-CXR phrase grounding [images_root, official_split]
* ``mimic_cxr_vqa`` (``mimic_vqa.py``) — MIMIC-CXR-VQA (EHRXQA authors) [images_root, official_split]
* ``medical_cxr_vqa`` (``mimic_vqa.py``) — Medical-CXR-VQA (Hu et al. 2024) [images_root, official_split]

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
from typing import Any, Callable, Iterable, Iterator

from deepmedix.data.sources.base import BadInput, ImageRef, Quarantine, Root, Source, match_columns, open_root
from deepmedix.errors import InputError

__all__ = ["digest", "rec", "norm_split", "mimic_id", "bad_id", "image_path", "report_path", "parse_mimic_path",
           "open_table", "csv_names", "bool_option", "images_root", "image_ref"]

_DIGITS = re.compile(r"^\d{2,}$")
_DICOM = re.compile(r"^[0-9A-Fa-f]+(?:-[0-9A-Fa-f]+)*$")
# .../pNN/pSUBJECT/sSTUDY/DICOM[.jpg|.dcm|...] — MIMIC-CXR's file layout, with or without a leading files/
_MIMIC_PATH = re.compile(r"^(?:.*/)?p(\d\d)/p(\d+)/s(\d+)/([^/]+?)(?:\.(?:jpg|jpeg|dcm|png))?$", re.IGNORECASE)
_SPLITS = {"train": "train", "validate": "validate", "valid": "validate", "val": "validate",
           "validation": "validate", "test": "test"}


def digest(s: str, n: int = 4) -> str:
    return hashlib.blake2b(s.encode("utf-8"), digest_size=n).hexdigest()


def rec(obj: Any, limit: int = 500) -> str:
    """The offending record as compact JSON (truncated), for quarantine reports."""
    try:
        s = json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        s = repr(obj)
    return s if len(s) <= limit else s[:limit] + "..."


def norm_split(value: Any) -> str | None:
    """An official split value (``train``/``validate``/``test`` or the datasets' ``val``/``valid``) normalised, or
    None when it is not one."""
    if not isinstance(value, str):
        return None
    return _SPLITS.get(value.strip().lower())


def mimic_id(value: Any) -> str:
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


def bad_id(name: str, value: str) -> str | None:
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


def parse_mimic_path(root: Root, raw: str) -> tuple[tuple[str, str, str] | None, str]:
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
        why = bad_id(name, value)
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
                                      rec(cells))
                continue
            yield line, {k: v.strip() for k, v in zip(self.columns, cells)}, None


def open_table(src: Source, root: Root, rel: str, required: Iterable[str],
               known: Iterable[str] = ()) -> tuple[_Table | None, Quarantine | None]:
    """The table, or a Quarantine for a file that cannot be read. Its columns are renamed to the published names
    (``required`` + ``known``) they match ignoring case and spaces; a missing required column raises
    :class:`HeaderError` (the source stops: a header variant must never quarantine every row)."""
    try:
        table = _Table(root, rel)
    except BadInput as exc:
        return None, src.bad(rel, exc.reason)
    label = rel if root is src.root else f"{root.uri}/{rel}"
    table.columns = match_columns(label, table.columns, tuple(required), tuple(known))
    return table, None


def csv_names(*stems: str) -> list[str]:
    return [f"{s}{ext}" for s in stems for ext in (".csv", ".csv.gz")]


def bool_option(options: dict[str, Any], name: str, default: bool) -> bool:
    v = options.get(name, default)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.strip().lower() in ("true", "1", "yes")
    raise InputError(f"option {name!r} must be true or false, got {v!r}")


def images_root(src: Source) -> Root:
    uri = src.options.get("images_root")
    return open_root(str(uri)) if uri else src.root


def image_ref(root: Root, own: Root, path: str) -> ImageRef:
    return ImageRef(path=path, root=None if root is own else root)
