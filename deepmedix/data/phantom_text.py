"""Report and VQA text for the phantom chest X-ray dataset (see :mod:`deepmedix.data.phantom`).

Everything here is a pure function of a ``numpy.random.Generator`` and the study's findings, so the same
seed gives the same text. Sides are the *patient's* sides (radiological convention: the patient's right
is on the image's left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepmedix.errors import InputError

FINDINGS = ("cardiomegaly", "left pleural effusion", "right pleural effusion", "nodule", "mass",
            "pneumothorax", "consolidation", "atelectasis")
SEVERITIES = ("mild", "moderate", "severe")
ZONES = ("upper", "middle", "lower")
SIDES = ("right", "left")

# findings whose side is part of the label
_SIDED_LABELS = {"left pleural effusion": "left", "right pleural effusion": "right"}
# findings that take a side and a zone chosen at planning time
_FREE_SIDE = ("nodule", "mass", "pneumothorax", "consolidation", "atelectasis")
_ZONED = ("nodule", "mass", "consolidation")
# presence concepts -> the labels that make them present
CONCEPTS = {
    "cardiomegaly": ("cardiomegaly",),
    "pleural effusion": ("left pleural effusion", "right pleural effusion"),
    "nodule": ("nodule",),
    "mass": ("mass",),
    "pneumothorax": ("pneumothorax",),
    "consolidation": ("consolidation",),
    "atelectasis": ("atelectasis",),
}
# short "type" answers
TYPE_WORD = {"cardiomegaly": "cardiomegaly", "left pleural effusion": "pleural effusion",
             "right pleural effusion": "pleural effusion", "nodule": "nodule", "mass": "mass",
             "pneumothorax": "pneumothorax", "consolidation": "consolidation", "atelectasis": "atelectasis"}
OPACITIES = ("nodule", "mass", "consolidation", "atelectasis", "left pleural effusion", "right pleural effusion")


@dataclass(frozen=True)
class FindingSpec:
    """One finding to draw: label (from FINDINGS), severity, patient side and lung zone where they apply."""

    label: str
    severity: str = "moderate"
    side: str = ""   # "right" / "left" (patient's side); "" for cardiomegaly
    zone: str = ""   # "upper" / "middle" / "lower" for nodule, mass, consolidation

    def __post_init__(self) -> None:
        if self.label not in FINDINGS:
            raise InputError(f"unknown finding {self.label!r}; expected one of {FINDINGS}")
        if self.severity not in SEVERITIES:
            raise InputError(f"unknown severity {self.severity!r}; expected one of {SEVERITIES}")
        if self.side and self.side not in SIDES:
            raise InputError(f"unknown side {self.side!r}; expected one of {SIDES}")
        if self.zone and self.zone not in ZONES:
            raise InputError(f"unknown zone {self.zone!r}; expected one of {ZONES}")


def complete_spec(rng: np.random.Generator, spec: FindingSpec) -> FindingSpec:
    """Fill side/zone the finding needs but the spec leaves empty (drawn from rng)."""
    side, zone = spec.side, spec.zone
    if spec.label in _SIDED_LABELS:
        side = _SIDED_LABELS[spec.label]
    elif spec.label in _FREE_SIDE:
        side = side or SIDES[int(rng.integers(2))]
        if spec.label in _ZONED:
            zone = zone or ZONES[int(rng.integers(3))]
        elif spec.label == "atelectasis":
            zone = "lower"
        else:  # pneumothorax: apex
            zone = "upper"
    else:
        side, zone = "", ""
    return FindingSpec(spec.label, spec.severity, side, zone)


def plan_findings(rng: np.random.Generator, labels) -> list[FindingSpec]:
    """Full specs (severity, side, zone drawn from rng) for the given labels, in FINDINGS order."""
    out = []
    for label in sorted(labels, key=FINDINGS.index):
        sev = SEVERITIES[int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
        out.append(complete_spec(rng, FindingSpec(label, sev)))
    return out


def location(spec: FindingSpec) -> str:
    """Short location phrase, e.g. 'right upper lung', 'left base', 'right apex'; '' if not localisable."""
    if spec.label == "cardiomegaly":
        return ""
    if spec.label in _SIDED_LABELS or spec.label == "atelectasis":
        return f"{spec.side} base"
    if spec.label == "pneumothorax":
        return f"{spec.side} apex"
    return f"{spec.side} {'mid' if spec.zone == 'middle' else spec.zone} lung"


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


_ADVERB = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}

_SENTENCES = {
    "cardiomegaly": ("The heart is {adv} enlarged.", "There is {sev} cardiomegaly.",
                     "The cardiac silhouette is {adv} enlarged, consistent with {sev} cardiomegaly."),
    "effusion": ("There is a {sev} {side} pleural effusion.",
                 "A {sev} {side} pleural effusion is present, blunting the {side} costophrenic angle.",
                 "{Sev} {side} pleural effusion with a meniscus at the {side} base."),
    "nodule": ("A {sev} nodule is seen in the {loc}.", "There is a {sev} rounded nodule in the {loc}.",
               "{Sev} pulmonary nodule in the {loc}."),
    "mass": ("There is a {sev} mass in the {loc}.", "A {sev} lobulated mass is seen in the {loc}.",
             "{Sev} rounded mass projecting over the {loc}."),
    "pneumothorax": ("There is a {sev} {side} apical pneumothorax with a visible pleural line.",
                     "A {sev} {side} pneumothorax is present; no lung markings are seen beyond the pleural line.",
                     "{Sev} {side}-sided pneumothorax at the apex."),
    "consolidation": ("There is {sev} patchy consolidation in the {loc}.",
                      "{Sev} airspace consolidation is seen in the {loc}.",
                      "Patchy opacity in the {loc} consistent with {sev} consolidation."),
    "atelectasis": ("There is {sev} atelectasis at the {side} lung base.",
                    "{Sev} linear atelectasis is seen at the {side} base.",
                    "Plate-like opacity at the {side} base, consistent with {sev} atelectasis."),
}
_NORMAL_HEART = ("The heart size is normal.", "Cardiac silhouette is within normal limits.",
                 "Heart size is normal.", "The cardiomediastinal silhouette is unremarkable.")
_NEGATIONS = {
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."),
    "pleural effusion": ("No pleural effusion.", "There is no pleural effusion.", "No pleural effusion is seen."),
    "consolidation": ("No focal consolidation.", "There is no focal consolidation.",
                      "No focal airspace consolidation is seen."),
    "nodule": ("No suspicious pulmonary nodule.", "There is no pulmonary nodule or mass."),
    "atelectasis": ("No atelectasis.", "There is no atelectasis."),
}
_CLEAR_LUNGS = ("The lungs are clear.", "Both lungs are clear.", "The lungs are well expanded and clear.")
_BONES = ("The osseous structures are intact.", "No acute osseous abnormality.", "")
_SHORT = {
    "cardiomegaly": "{Sev} cardiomegaly", "effusion": "{Sev} {side} pleural effusion",
    "nodule": "{Sev} {loc} nodule", "mass": "{Sev} {loc} mass", "pneumothorax": "{Sev} {side} pneumothorax",
    "consolidation": "{Sev} {loc} consolidation", "atelectasis": "{Sev} {side} basilar atelectasis",
}
NORMAL_IMPRESSION = "No acute cardiopulmonary process."


def _key(label: str) -> str:
    return "effusion" if label.endswith("pleural effusion") else label


def _fmt(template: str, spec: FindingSpec) -> str:
    return template.format(sev=spec.severity, Sev=_cap(spec.severity), adv=_ADVERB[spec.severity],
                           side=spec.side, loc=location(spec))


def findings_text(rng: np.random.Generator, specs: list[FindingSpec], view: str = "PA") -> str:
    """The FINDINGS paragraph: heart size, each present finding (location and severity), a few negations."""
    present = {s.label for s in specs}
    parts: list[str] = []
    if view == "AP" and rng.random() < 0.5:
        parts.append(pick(rng, ("Portable AP view of the chest.", "Single frontal AP view.")))
    by_label = {s.label: s for s in specs}
    parts.append(_fmt(pick(rng, _SENTENCES["cardiomegaly"]), by_label["cardiomegaly"])
                 if "cardiomegaly" in present else pick(rng, _NORMAL_HEART))
    for s in specs:
        if s.label != "cardiomegaly":
            parts.append(_fmt(pick(rng, _SENTENCES[_key(s.label)]), s))
    if not present - {"cardiomegaly"}:
        parts.append(pick(rng, _CLEAR_LUNGS))
    absent = [c for c in ("pneumothorax", "pleural effusion", "consolidation", "nodule", "atelectasis")
              if not any(lab in present for lab in CONCEPTS[c])
              and not (c == "nodule" and "mass" in present)]
    for side in SIDES:  # one-sided effusion: negate the other side
        if f"{side} pleural effusion" in present and f"{SIDES[1 - SIDES.index(side)]} pleural effusion" not in present:
            absent.append(f"no {SIDES[1 - SIDES.index(side)]} effusion")
    n_neg = min(len(absent), int(rng.integers(2, 4)))
    for i in sorted(rng.choice(len(absent), n_neg, replace=False).tolist()) if n_neg else []:
        c = absent[i]
        if c.startswith("no "):
            parts.append(f"No {c.split()[1]} pleural effusion.")
        else:
            parts.append(pick(rng, _NEGATIONS[c]))
    bones = pick(rng, _BONES)
    if bones:
        parts.append(bones)
    return " ".join(parts)


def impression_text(rng: np.random.Generator, specs: list[FindingSpec]) -> str:
    """The IMPRESSION: 'No acute cardiopulmonary process.' for normals, else the findings in short."""
    if not specs:
        return NORMAL_IMPRESSION
    items = [_fmt(_SHORT[_key(s.label)], s) for s in specs]
    if len(items) > 1 and rng.random() < 0.5:
        return " ".join(f"{i + 1}. {t}." for i, t in enumerate(items))
    if len(items) == 1:
        return items[0] + "."
    return ", ".join(items[:-1]) + " and " + items[-1][0].lower() + items[-1][1:] + "."


FINDINGS_PROMPTS = ("Describe the findings of this chest X-ray.", "Write the findings section of the radiology "
                    "report for this chest radiograph.", "What are the findings on this chest X-ray?",
                    "Provide the FINDINGS for this frontal chest radiograph.")
IMPRESSION_PROMPTS = ("What is the impression for this chest X-ray?", "Write the impression of the report for "
                      "this chest radiograph.", "Summarize this chest X-ray in a short impression.",
                      "Give the IMPRESSION for this frontal chest radiograph.")


def grounding_prompt(label: str) -> str:
    return f"Locate the {label} in this image."


def _presence(rng, specs):
    present = {s.label for s in specs}
    concepts = list(CONCEPTS)
    pos = [c for c in concepts if any(lab in present for lab in CONCEPTS[c])]
    neg = [c for c in concepts if c not in pos]
    c = pick(rng, pos) if pos and rng.random() < 0.5 else pick(rng, neg)
    ans = "yes" if c in pos else "no"
    if c == "pleural effusion" and rng.random() < 0.4:
        side = pick(rng, SIDES)
        c = f"{side} pleural effusion"
        ans = "yes" if c in present else "no"
    art = "an" if c[0] in "aeiou" else "a"
    q = pick(rng, (f"Is there {art} {c}?", f"Does this chest X-ray show {art} {c}?", f"Is {art} {c} present?"))
    if c in ("cardiomegaly", "consolidation", "atelectasis"):
        q = pick(rng, (f"Is there {c}?", f"Does this chest X-ray show {c}?", f"Is {c} present?"))
    return q, ans, tuple(lab for lab in CONCEPTS.get(c, (c,)) if lab in present)


def _abnormality(rng, specs):
    q = pick(rng, ("What abnormalities are seen in this image?", "Which findings are present in this chest X-ray?",
                    "List the abnormalities in this chest radiograph."))
    return q, " | ".join(s.label for s in specs) if specs else "no finding", tuple(s.label for s in specs)


def _location(rng, specs):
    spec = pick(rng, [s for s in specs if location(s)])
    name = "pleural effusion" if spec.label.endswith("pleural effusion") else spec.label
    q = pick(rng, (f"Where is the {name}?", f"Where is the {name} located?", f"In which region is the {name}?"))
    if spec.label.endswith("pleural effusion") and sum(s.label.endswith("effusion") for s in specs) > 1:
        q = f"Where is the {spec.label}?"
    return q, location(spec), (spec.label,)


def _level(rng, specs):
    spec = pick(rng, specs)
    q = pick(rng, (f"How severe is the {spec.label}?", f"What is the severity of the {spec.label}?",
                    f"What is the level of the {spec.label}?"))
    return q, spec.severity, (spec.label,)


def _view(rng, view):
    q = pick(rng, ("What is the view of this chest X-ray?", "Is this a PA or AP radiograph?",
                    "Which projection is this chest radiograph?"))
    return q, view, ()


def _type(rng, specs):
    locs = [location(s) for s in specs]
    uniq = [s for s, loc in zip(specs, locs) if loc and locs.count(loc) == 1]
    spec = pick(rng, uniq)
    loc = location(spec)
    if spec.label in OPACITIES and rng.random() < 0.6:
        q = pick(rng, (f"What type of opacity is seen in the {loc}?", f"What kind of opacity is in the {loc}?"))
    else:
        q = pick(rng, (f"What type of abnormality is seen in the {loc}?", f"What is the finding in the {loc}?"))
    return q, TYPE_WORD[spec.label], (spec.label,)


def vqa_items(rng: np.random.Generator, specs: list[FindingSpec], view: str,
              k: int) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """k (question_type, question, answer, evidence) items; types drawn without repeat until the available ones run
    out. The evidence is the labels of the findings the answer rests on: the one asked about (location, level,
    type, a present finding), every finding (the abnormality list), none (the view, an absent finding)."""
    avail = ["presence", "abnormality", "view"]
    if specs:
        avail.append("level")
    if any(location(s) for s in specs):
        avail.append("location")
    locs = [location(s) for s in specs]
    if any(loc and locs.count(loc) == 1 for loc in locs):
        avail.append("type")
    out: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    order: list[str] = []
    while len(out) < k:
        if not order:
            order = [avail[i] for i in rng.permutation(len(avail))]
        qt = order.pop(0)
        for _ in range(4):  # avoid asking the same question twice in a study where possible
            if qt == "presence":
                q, a, ev = _presence(rng, specs)
            elif qt == "abnormality":
                q, a, ev = _abnormality(rng, specs)
            elif qt == "location":
                q, a, ev = _location(rng, specs)
            elif qt == "level":
                q, a, ev = _level(rng, specs)
            elif qt == "view":
                q, a, ev = _view(rng, view)
            else:
                q, a, ev = _type(rng, specs)
            if q not in seen:
                break
        seen.add(q)
        out.append((qt, q, a, ev))
    return out
