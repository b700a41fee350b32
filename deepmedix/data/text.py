"""Report text: section extraction, normalisation, PHI scrubbing, duplicate keys.

API (used by the source adapters and the curation engine):

* ``sections(report) -> dict[str, str]`` — upper-case section name (``FINDINGS``, ``IMPRESSION``, ...) to its text.
* ``normalize(text) -> str`` — whitespace collapsed, stray separators dropped; keeps case and the ``___`` spans.
* ``scrub_phi(text) -> str`` — dates, phone numbers, names after titles, record numbers etc. become ``___``.
* ``clean_report_text(text) -> str`` — ``scrub_phi(normalize(text))``, what the curation engine applies.
* ``dedupe_key(text) -> str`` — lower-case, punctuation-free form used to find duplicate texts.

PHI scrubbing (``scrub_phi``) replaces each span with ``___``, MIMIC's de-identification mark, keeping the label
in front of it ("MRN: ___", "Dr. ___", "___-year-old"). It is a rule-based safety net behind datasets that are
already de-identified, tuned to leave clinical wording alone. What it replaces:

* e-mail addresses and URLs (``http(s)://``, ``www.``);
* dates: numeric with ``/``, ``-`` or ``.`` (01/02/2003, 1/2/03, 2003-01-02, 02.01.2003; day/month must be
  plausible and the match must not be followed by a unit), month/day without a year only after a word that
  introduces a date ("from 12/14", "on 3/4", "dated 1/5"; "3/4 of the lung" and "strength 5/5" stay), and
  dates with a month name (Jan 2, 2003, January 2nd 2003, 2 January 2003, 2nd of Jan, 02-Jan-2003,
  January 2003, Jan 2). Month names must be capitalised (``May``/``MAY``, not ``may``) and attached to a day
  or a year, so "may represent" is untouched. A year on its own is kept (HIPAA Safe Harbor allows years);
* times of day: ``10:45``, ``10:45:30``, ``10:45 am``, ``10 a.m.``, ``1045 hours``. They are scrubbed (not
  needed by any task, and a date plus a time narrows an exam down);
* telephone/fax/pager numbers: (617) 555-1234, 617-555-1234, 617.555.1234, +1 617 555 1234, 555-1234, and any
  number after phone/tel/fax/pager/beeper/cell/ext/x;
* SSNs (123-45-6789) and labelled identifiers (MRN, MR#, medical record number, accession, account, unit
  number, patient ID, ID, SSN, order/exam/study/case/visit number, CSN, FIN ...) when the value holds a digit;
* any other run of 6 or more digits not followed by a unit;
* names after titles (Dr., Dr, DR., Doctor, Mr., Mrs., Ms., Miss, Prof., Professor, Nurse): "Dr. John A. Smith"
  -> "Dr. ___", "Prof. van Gogh" -> "Prof. ___", "DR. SMITH" -> "DR. ___", "Smith's" -> "___'s". Upper-case
  ``MR``/``MS`` need a period and an upper-case name after it (MR = mitral regurgitation / MR imaging, MS =
  multiple sclerosis); a bare upper-case ``DR`` (digital radiography) counts only after "with", "to", "by",
  "paged", ... A trailing credential (", MD") is kept;
* names followed by a credential (John Smith, MD / RN / NP / DO / PhD);
* names after hand-off phrases (discussed with, d/w, spoke with/to, paged, notified, informed, called,
  communicated/conveyed/relayed to, reviewed with, telephoned): only title-case name-like tokens that are not
  role or department words (Emergency Department, Radiology Resident, ICU team are kept). In all-caps reports
  these untitled names cannot be told from words and are left alone;
* ages over 89 (HIPAA): "92-year-old", "92 year old", "92 yo", "92 y/o", "age 95", "aged 91" -> the number.

It never touches ``___`` or IU X-ray's ``XXXX`` marks, section headers, measurements (3.2 cm, 10 x 12 mm,
4 cm above the carina), vertebral levels (T12, C5-6), counts (2 views), percentages, or ordinary capitalised
words at the start of sentences.
"""

from __future__ import annotations

import re

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{2,40}?)[ \t]*:", re.MULTILINE)


def sections(report: str) -> dict[str, str]:
    """Split a radiology report on upper-case ``NAME:`` headers at the start of a line."""
    out: dict[str, str] = {}
    marks = [(m.start(), m.end(), m.group(1).strip()) for m in _HEADER.finditer(report)]
    for i, (_, end, name) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(report)
        body = normalize(report[end:stop])
        if body:
            out[name] = (out[name] + " " + body) if name in out else body
    return out


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]*\n[ \t\f\v]*", " ", text)
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def dedupe_key(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", " ", text.lower()).strip()


# ------------------------------------------------------------------------------------------------ PHI scrubbing

MARK = "___"

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_MONTH_ABBR = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sept", "Sep", "Oct", "Nov", "Dec")


def _month_alternatives() -> str:
    names = sorted({*_MONTHS, *_MONTH_ABBR}, key=len, reverse=True)
    return "|".join([*names, *(n.upper() for n in names)])


_MON = rf"(?:{_month_alternatives()})\b(?:\.(?=[ \t]*\d))?"
_ORD = r"(?:st|nd|rd|th|ST|ND|RD|TH)?"
_YEAR = r"(?:\d{4}|'\d{2}|\d{2})"
_UNIT = r"(?:(?:mm|cm|m|ml|mL|cc|mg|g|kg|l|L|min|mins|sec|s|hz|Hz|mmHg|x|X|cm2|mm2|Fr|F)\b|%)"

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"')\]]+", re.IGNORECASE)

_DATE_NUMERIC = re.compile(
    r"(?<![\w./-])(\d{1,2})([/.-])(\d{1,2})\2(\d{4}|\d{2})(?![\w/-]|\.\d)(?!\s*" + _UNIT + r")")
# month/day without a year only after a word that introduces a date ("from 12/14"): "3/4 of the lung" and
# "strength 5/5" are not dates
_DATE_SHORT = re.compile(
    r"(?i)(?<![\w/])((?:on|from|since|dated|until|through|prior|study|exam|radiograph|film|comparison:?)[ \t]+)"
    r"(\d{1,2})/(\d{1,2})(?![\w/-]|\.\d)(?![ \t]*" + _UNIT + r")")
_DATE_ISO = re.compile(r"(?<![\w./-])(?:19|20)\d{2}([/.-])(\d{1,2})\1(\d{1,2})(?![\w/-]|\.\d)")
_DATE_WORDS = re.compile(
    "|".join([
        rf"\b\d{{1,2}}{_ORD}[ -](?:of\s+)?{_MON}(?:,?[ -]?{_YEAR}\b)?",     # 2 January 2003, 2nd of Jan, 02-Jan-03
        rf"\b{_MON}[ ]?\d{{1,2}}{_ORD}\b(?:,?\s*{_YEAR}\b)?",                # Jan 2, 2003 / January 2nd 2003 / Jan 2
        rf"\b{_MON},?\s+(?:19|20)\d{{2}}\b",                                  # January 2003
    ]))
_TIME = re.compile(
    r"(?<![\w:.])(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?:\s*(?:[AaPp]\.\s?[Mm]\.|[AaPp][Mm]\b))?(?![\w:])"
    r"|(?<![\w:.])(?:1[0-2]|0?[1-9])\s*(?:[AaPp]\.\s?[Mm]\.|[AaPp][Mm]\b)"
    r"|(?<![\w:.])(?:[01]\d|2[0-3])[0-5]\d\s*(?:hours|hrs|hr|h)\b")
_SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")
_PHONE_LABELLED = re.compile(
    r"(?i)\b(?:tele)?(?:phone|fax|pager|beeper|mobile|tel|ext|extension)\b\.?[ \t]*(?:number|no\.?|#)?[ \t]*"
    r"(?:at[ \t]+)?[:#]?[ \t]*(\+?\d[\d \t().-]{2,}\d|\d{3,})")
_PHONE = re.compile(
    r"(?<![\w.+-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[.-])\d{3}[.-]\d{4}(?![\w-]|\.\d)"
    r"|(?<![\w.+-])\+\d{1,3}(?:[\s.-]\d{2,4}){2,4}(?![\w-]|\.\d)"
    r"|(?<![\w./-])\d{3}-\d{4}(?![\w-]|\.\d)")
_ID_LABEL = (
    r"MRN|MR\s?#|MR\s?No\b\.?|Medical\s+Record(?:\s+(?:Number|No\b\.?|#))?|Med\s?Rec(?:\s+(?:Number|No\b\.?|#))?"
    r"|Unit\s+(?:Number|No\b\.?|#)|Accession(?:\s+(?:Number|No\b\.?))?|Acc\b\.?|Acct\b\.?"
    r"|Account(?:\s+(?:Number|No\b\.?))?|Patient\s+ID|Pt\.?\s*ID|ID|SSN|Social\s+Security(?:\s+(?:Number|No\b\.?))?"
    r"|(?:Order|Exam|Study|Case|Visit|Encounter|Requisition|Record|Film|Reference|Ref)\s*(?:Number|No\b\.?|#|ID)"
    r"|CSN|FIN|HAR")
_ID_LABELLED = re.compile(
    rf"(?i)\b({_ID_LABEL})[ \t]*(?:(?:#|:|-|no\b\.?|number)[ \t]*)*([A-Z]{{0,4}}\d[A-Z0-9-]{{2,}})\b")
_LONG_DIGITS = re.compile(r"(?<![\w.,])\d{6,}(?![\w,]|\.\d)(?!\s*" + _UNIT + r")")
_AGE = re.compile(
    r"(?i)(?<![\w.])(\d{2,3})(?=\s*-?\s*(?:years?|yrs?|y)\s*-?\s*old\b|\s*-?\s*(?:yo|y/o|y\.o\.|yr\.?s?)\b"
    r"|\s*-?\s*years?\b(?!\s+ago))"
    r"|(?i:\b(?:age|aged|age:)\s*:?\s*)(\d{2,3})\b")

# names ---------------------------------------------------------------------------------------------------------

# words that are never part of a name: function words, role and department words, report vocabulary
_ROLE = {w for w in """
the a an our their his her emergency department dept ed er radiology radiologist resident residents attending
fellow nurse nursing team service surgery surgical medicine medical physician physicians patient patients
provider clinician clinical referring primary care floor unit icu micu sicu ccu csru nicu intensive cardiology
pulmonary oncology trauma thoracic covering on-call house staff doctor doctors hospitalist intern nephrology
neurology consult consulting ordering treating fellow ct mri ir us ob gyn pa np rn md""".split()}
_STOP = _ROLE | {w for w in """
and or of to from with at on in by via for who whom which was were is are be been has had have that this these
those he she they him them it its as regarding about over re per after before during today yesterday tonight
morning afternoon evening night time telephone phone person pager page cell call fax email findings impression
report results result chest left right do pa-c phd am pm monday tuesday wednesday thursday friday saturday
sunday wet read final preliminary addendum comparison note notes above below overnight code rapid response
stroke acute no not there heart lungs lung both mild moderate severe stable unchanged normal new interval again
please see status post possible likely small large bilateral consent history known image images view views
exam study system portable frontal lateral ap pa leader back out up down later again stat immediately
results""".split()}
_CREDENTIAL = r"(?:M\.D\.|MD|D\.O\.|DO|RN|NP|PA-C|PhD|MBBS|FRCR|FRCPC|DNP)"
_TITLE = re.compile(
    r"(?<![\w.])(Dr|Doctor|Prof|Professor|Mr|Mrs|Ms|Miss|Mx|Nurse|DR|DOCTOR|PROF|PROFESSOR|MRS|MISS|NURSE)\b(\.?)"
    r"|(?<![\w.])(MR|MS)(\.)")
# an upper-case "DR" without its period is a title only after these words ("DISCUSSED WITH DR SMITH")
_DR_BARE_AFTER = {"with", "to", "by", "paged", "called", "notified", "informed", "and", "attn", "cc", "per",
                  "from", "dear"}
_TITLECASE_TOKEN = re.compile(
    r"(?:Mc|Mac|O'|O’|D'|D’)?[A-Z][a-z]+(?:[-'’][A-Z][a-z]+)*(?![\w-])(?!['’][A-Za-z]{2})")
_UPPER_TOKEN = re.compile(r"(?:O'|O’|D'|D’)?[A-Z]{2,}(?:[-'’][A-Z]+)*(?![\w'’-])")
_INITIAL = re.compile(r"[A-Z]\.(?=[ \t])|[A-Z](?=[ \t]+[A-Z])")
_BLANKS = re.compile(r"[ \t]+")
# lower-case surname particles, part of a name when a capitalised token follows ("van Gogh", "de la Cruz")
_PARTICLE = re.compile(r"(?:van|von|der|den|de|da|del|della|di|du|la|le|ten|ter|bin|ibn|al|el)(?=[ \t])")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")
_HANDOFF = re.compile(
    r"(?i)\b(?:discussed[ \t]+with|d/w|spoke[ \t]+(?:with|to)|spoken[ \t]+(?:with|to)|paged|notified|informed"
    r"|called|communicated[ \t]+(?:to|with)|conveyed[ \t]+to|relayed[ \t]+to|reviewed[ \t]+with|telephoned)"
    r"[ \t]+")
_NAME_CREDENTIAL = re.compile(
    r"\b((?:(?:Mc|Mac|O')?[A-Z][a-z]+[ \t]+)(?:[A-Z]\.?[ \t]+)?(?:Mc|Mac|O')?[A-Z][a-z]+(?:-[A-Z][a-z]+)?)"
    rf"(,?[ \t]+{_CREDENTIAL})(?![\w])")


def _name_span(text: str, pos: int, allow_upper: bool) -> int:
    """End of the run of name-like tokens starting at ``pos`` (``pos`` when there is none).

    Tokens are separated by spaces/tabs (never newlines), at most four. The first token fixes the style:
    title-case names take title-case tokens and initials; an upper-case name (only when ``allow_upper``) takes
    upper-case tokens. A stop word (role words, prepositions, AM/PM, credentials, report words) ends the run.
    """
    end = i = pos
    style = ""
    count = 0
    while count < 4:
        m_title = _TITLECASE_TOKEN.match(text, i)
        m_upper = _UPPER_TOKEN.match(text, i) if allow_upper else None
        m_init = _INITIAL.match(text, i)
        m = None
        m_part = _PARTICLE.match(text, i) if style in ("", "title") else None
        if m_part and count < 3:
            j = i
            while True:  # one or more particles, then a capitalised token
                pm = _PARTICLE.match(text, j)
                sep = _BLANKS.match(text, pm.end()) if pm else None
                if not pm or not sep:
                    break
                j = sep.end()
            nxt = _TITLECASE_TOKEN.match(text, j)
            if j > i and nxt and nxt.group(0).lower() not in _STOP:
                count += 1
                end = nxt.end()
                style = "title"
                sep = _BLANKS.match(text, end)
                if not sep:
                    break
                i = sep.end()
                continue
            break
        if m_title and style in ("", "title"):
            if m_title.group(0).lower() in _STOP:
                break
            m, style = m_title, "title"
        elif m_upper and style in ("", "upper"):
            if m_upper.group(0).lower() in _STOP:
                break
            m, style = m_upper, "upper"
        elif m_init:
            # an initial must be followed by more of the name ("John A. Smith", "J. Smith")
            sep = _BLANKS.match(text, m_init.end())
            nxt = sep.end() if sep else m_init.end()
            t2 = _TITLECASE_TOKEN.match(text, nxt)
            u2 = _UPPER_TOKEN.match(text, nxt) if allow_upper else None
            ok = (t2 and style in ("", "title") and t2.group(0).lower() not in _STOP) or \
                 (u2 and style in ("", "upper") and u2.group(0).lower() not in _STOP)
            if not sep or not ok:
                break
            m = m_init
        if m is None:
            break
        count += 1
        end = m.end()
        sep = _BLANKS.match(text, end)
        if not sep:
            break
        i = sep.end()
    return end


def _previous_word(text: str, pos: int) -> str:
    words = _WORD.findall(text[max(0, pos - 40):pos])
    return words[-1].lower() if words else ""


def _scrub_titled_names(text: str) -> str:
    out, last = [], 0
    for m in _TITLE.finditer(text):
        if m.start() < last:
            continue
        title = m.group(1) or m.group(3)
        has_period = bool(m.group(2) or m.group(4))
        if title == "DR" and not has_period and _previous_word(text, m.start()) not in _DR_BARE_AFTER:
            continue  # "DR" = digital radiography
        gap = _BLANKS.match(text, m.end())
        if not gap:
            continue  # "Dr.Smith"/"Dr" glued to something: not a title we can read
        start = gap.end()
        end = _name_span(text, start, allow_upper=True)
        if end > start and title in ("MR", "MS") and not _UPPER_TOKEN.match(text, start):
            continue  # "known MS. Heart size ..." is multiple sclerosis, not a title
        if end > start:
            out.append(text[last:start])
            out.append(MARK)
            last = end
    out.append(text[last:])
    return "".join(out)


def _scrub_handoff_names(text: str) -> str:
    out, last = [], 0
    for m in _HANDOFF.finditer(text):
        if m.start() < last:
            continue
        start = m.end()
        # skip role words: "discussed with the ED attending Jane Smith"
        for _ in range(4):
            w = _WORD.match(text, start)
            if not w or w.group(0).lower() not in _ROLE:
                break
            sep = _BLANKS.match(text, w.end())
            if not sep:
                break
            start = sep.end()
        if _TITLE.match(text, start):
            continue  # the title rule has done it
        end = _name_span(text, start, allow_upper=False)
        if end > start:
            out.append(text[last:start])
            out.append(MARK)
            last = end
    out.append(text[last:])
    return "".join(out)


def _numeric_date(m: re.Match) -> str:
    a, b = int(m.group(1)), int(m.group(3))
    if 1 <= a <= 31 and 1 <= b <= 31 and (a <= 12 or b <= 12):
        return MARK
    return m.group(0)


def _short_date(m: re.Match) -> str:
    mo, d = int(m.group(2)), int(m.group(3))
    return m.group(1) + MARK if 1 <= mo <= 12 and 1 <= d <= 31 else m.group(0)


def _iso_date(m: re.Match) -> str:
    mo, d = int(m.group(2)), int(m.group(3))
    return MARK if 1 <= mo <= 12 and 1 <= d <= 31 else m.group(0)


def _age(m: re.Match) -> str:
    if m.group(1) is not None:
        return MARK if int(m.group(1)) >= 90 and int(m.group(1)) < 130 else m.group(0)
    num = m.group(2)
    if 90 <= int(num) < 130:
        return m.group(0)[: m.start(2) - m.start(0)] + MARK
    return m.group(0)


def scrub_phi(text: str) -> str:
    """Replace PHI-like spans with ``___`` (see the module docstring for the rules). Idempotent."""
    if not text:
        return text
    t = _EMAIL.sub(MARK, text)
    t = _URL.sub(MARK, t)
    t = _ID_LABELLED.sub(lambda m: m.group(0)[: m.start(2) - m.start(0)] + MARK, t)
    t = _SSN.sub(MARK, t)
    t = _PHONE_LABELLED.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + MARK, t)
    t = _DATE_ISO.sub(_iso_date, t)
    t = _DATE_NUMERIC.sub(_numeric_date, t)
    t = _DATE_WORDS.sub(MARK, t)
    t = _DATE_SHORT.sub(_short_date, t)
    t = _PHONE.sub(MARK, t)
    t = _TIME.sub(MARK, t)
    t = _LONG_DIGITS.sub(MARK, t)
    t = _AGE.sub(_age, t)
    t = _NAME_CREDENTIAL.sub(lambda m: MARK + m.group(2), t)
    t = _scrub_titled_names(t)
    t = _scrub_handoff_names(t)
    return t


def clean_report_text(text: str) -> str:
    """What the curation engine stores: :func:`normalize` then :func:`scrub_phi`."""
    return scrub_phi(normalize(text or ""))
