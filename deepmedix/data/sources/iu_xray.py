"""IU X-ray (Indiana University chest X-ray collection, Open-i ``NLMCXR``): reports with their PA/lateral images.

Layout read (the two Open-i archives extracted side by side under the root)::

    ecgen-radiology/<n>.xml          NLMCXR_reports.tgz: one XML report per study (3,955)
    NLMCXR_png/<image id>.png        NLMCXR_png.tgz: the images, named by the report's parentImage ids

Each report looks like::

    <eCitation>
      <uId id="CXR1"/> ...
      <MedlineCitation ...><Article ...><Abstract>
        <AbstractText Label="COMPARISON">...</AbstractText>
        <AbstractText Label="INDICATION">...</AbstractText>
        <AbstractText Label="FINDINGS">...</AbstractText>
        <AbstractText Label="IMPRESSION">...</AbstractText>
      </Abstract></Article></MedlineCitation>
      <MeSH><major>Cardiomegaly/mild</major><automatic>...</automatic></MeSH>
      <parentImage id="CXR1_1_IM-0001-3001"><figureId>F1</figureId><caption>...</caption>...</parentImage>
      <parentImage id="CXR1_1_IM-0001-4001">...</parentImage>
    </eCitation>

Items: tasks ``report_findings`` and ``report_impression`` per report (record ids ``<uId>-findings`` /
``<uId>-impression``), answer the section text (whitespace normalised; the ``XXXX`` de-identification spans are
kept as published — the engine's PHI guard handles anything else). ``images``: the report's ``parentImage`` ids in
XML order. The XML has no per-image view label (the caption, when present, describes the whole study, e.g.
"Xray Chest PA and Lateral"), so ``view`` is "" and the order is not guaranteed to be frontal first. IU X-ray
has one study per patient and no patient ids, so ``patient_id`` and ``study_id`` are ``iu:<uId>`` (``iu:<file
stem>`` when the report has no uId). ``findings``: the curated MeSH ``major`` terms, first component only
(``Cardiomegaly/mild`` -> ``Cardiomegaly``), without ``normal`` / ``No Indexing``. Split "" (no official split:
the engine's seeded patient split).

Options: ``reports_dir`` (default ``ecgen-radiology``), ``images_dir`` (default ``NLMCXR_png``). Images are looked
up by file name under ``images_dir``; when that folder holds no PNG, the whole root is searched (the archive
is sometimes extracted without its folder). An image not found keeps the path ``<images_dir>/<id>.png`` so the
engine reports it missing.

Quarantined (file = the XML, reason names the element): unreadable or empty files, text not valid in the declared
encoding, malformed XML, XML with entity declarations (refused outright), a root element other than
``eCitation``, unsafe or duplicate uIds, reports without any usable ``parentImage`` (and each parentImage without
an id, with an unsafe id, or repeated), and an empty or missing FINDINGS / IMPRESSION section (that task only).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any, Iterator

from deepmedix.data.prompts import findings_prompt, impression_prompt
from deepmedix.data.sources.base import BadInput, ImageRef, Item, Quarantine, Root, Source
from deepmedix.data.text import normalize

__all__ = ["IUXray"]

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DECL_RE = re.compile(rb"""^\s*<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
_NOT_FINDINGS = {"normal", "no indexing"}


class IUXray(Source):
    name = "iu_xray"
    option_names = ("reports_dir", "images_dir")

    def __init__(self, root: Root, **options: Any):
        super().__init__(root, **options)
        self.reports_dir = str(options.get("reports_dir") or "ecgen-radiology").strip("/")
        self.images_dir = str(options.get("images_dir") or "NLMCXR_png").strip("/")

    def _image_index(self, bad: list[Quarantine]) -> dict[str, str]:
        paths = list(self.root.walk(self.images_dir, (".png",)))
        if not paths:
            paths = list(self.root.walk("", (".png",)))
        out: dict[str, str] = {}
        for rel in paths:
            stem = rel.rsplit("/", 1)[-1][:-4]
            if stem in out:
                bad.append(self.bad(rel, f"duplicate image file name {stem}.png (using {out[stem]})", stem))
                continue
            out[stem] = rel
        return out

    def _parse(self, rel: str) -> ET.Element:
        """The root element of one report; BadInput with a specific reason otherwise."""
        data = self.root.read_bytes(rel)
        if not data.strip():
            raise BadInput(rel, "empty file")
        if b"<!ENTITY" in data:
            raise BadInput(rel, "XML entity declarations are not allowed")
        m = _DECL_RE.match(data)
        enc = m.group(1).decode("ascii").lower() if m else "utf-8"
        try:
            data.decode(enc)
        except LookupError:
            raise BadInput(rel, f"unknown XML encoding {enc!r}") from None
        except UnicodeDecodeError as exc:
            raise BadInput(rel, f"not valid {enc} text (byte {exc.start})") from None
        try:
            root = ET.fromstring(data)
        except ET.ParseError as exc:
            raise BadInput(rel, f"malformed XML ({exc})") from None
        if root.tag != "eCitation":
            raise BadInput(rel, f"root element is <{root.tag}>, expected <eCitation>")
        return root

    def items(self) -> Iterator[Item | Quarantine]:
        reports = list(self.root.walk(self.reports_dir, (".xml",)))
        if not reports:
            yield self.bad(self.reports_dir, "no XML reports found")
            return
        bad: list[Quarantine] = []
        index = self._image_index(bad)
        yield from bad
        seen_uid: dict[str, str] = {}
        for rel in sorted(reports, key=lambda r: (len(r), r)):  # 1.xml, 2.xml, ..., 10.xml
            try:
                root = self._parse(rel)
            except BadInput as exc:
                yield self.bad(exc.file, exc.reason, exc.record)
                continue
            stem = rel.rsplit("/", 1)[-1][:-4]
            uid_el = root.find("uId")
            if uid_el is None:
                uid_el = root.find(".//uId")
            uid = (uid_el.get("id") or "").strip() if uid_el is not None else ""
            key = uid or stem
            if not _ID_RE.match(key):
                yield self.bad(rel, f"uId {key!r} is not a plain identifier", key)
                continue
            if key in seen_uid:
                yield self.bad(rel, f"duplicate uId {key} (first in {seen_uid[key]})", key)
                continue
            seen_uid[key] = rel

            images: list[ImageRef] = []
            ids_seen: set[str] = set()
            for k, el in enumerate(root.iter("parentImage"), 1):
                iid = (el.get("id") or "").strip()
                if not iid:
                    yield self.bad(rel, f"parentImage #{k} without an id", key)
                    continue
                if not _ID_RE.match(iid):
                    yield self.bad(rel, f"parentImage id {iid!r} is not a plain file name", key)
                    continue
                if iid in ids_seen:
                    yield self.bad(rel, f"duplicate parentImage id {iid}", key)
                    continue
                ids_seen.add(iid)
                images.append(ImageRef(path=index.get(iid, f"{self.images_dir}/{iid}.png")))
            if not images:
                yield self.bad(rel, "report has no parentImage with a usable id (no images)", key)
                continue

            sections: dict[str, str] = {}
            for el in root.iter("AbstractText"):
                label = (el.get("Label") or "").strip().upper()
                body = normalize("".join(el.itertext()))
                if label and body:
                    sections[label] = f"{sections[label]} {body}" if label in sections else body
            findings = []
            for el in root.iter("major"):
                term = normalize("".join(el.itertext())).split("/")[0].strip()
                if term and term.lower() not in _NOT_FINDINGS and term not in findings:
                    findings.append(term)

            for task, section, suffix, prompt in (("report_findings", "FINDINGS", "findings", findings_prompt),
                                                  ("report_impression", "IMPRESSION", "impression",
                                                   impression_prompt)):
                text = sections.get(section, "")
                if not text:
                    yield self.bad(rel, f"no {section} text (AbstractText Label=\"{section}\" missing or empty)",
                                   key)
                    continue
                rid = f"{key}-{suffix}"
                yield Item(record_id=rid, patient_id=f"iu:{key}", study_id=f"iu:{key}", task=task,
                           prompt=prompt(rid), answer=text, images=list(images), split="", view="",
                           findings=list(findings), file=rel)
