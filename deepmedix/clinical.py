"""Rule-based CheXpert-style labels for chest X-ray report text, and the F1 scores built on them.

A stand-in for the CheXpert labeler (Irvin et al. 2019) with no parser and no models: regular expressions find
*mentions* of the 14 observations in each clause, each mention is classified positive (1.0), negative (0.0) or
uncertain (-1.0) from nearby cue words, and the mentions of one observation are aggregated as CheXpert does
(positive if any is positive, else uncertain if any is, else negative; None if never mentioned).

Rules, in order, for one mention within its clause (clauses end at ``;``, "but", "however", "aside from", ...):

1. double negation ("cannot exclude X", "X is not excluded", "no new X") -> uncertain;
2. a normal-type statement ("heart size is normal", "the lungs are clear") -> negative;
3. a negation cue up to 8 words before ("no", "without", "negative for", ...) or a negating predicate right after
   ("X is not seen", "X has resolved", "X is absent") -> negative;
4. an uncertainty cue before ("may", "possible", "suspicious for", "versus", ...) or right after ("X is likely",
   "X or Y") -> uncertain; else positive.

"Heart" / "cardiac silhouette" / "mediastinal contours" style phrases count only together with a size word
(enlarged, normal, stable, borderline...). "No Finding" is 1.0 when nothing but Support Devices is positive or
uncertain, counting other abnormalities CheXpert tracks (emphysema, granuloma, scoliosis, ...); else None.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping, Sequence

from deepmedix.errors import InputError

__all__ = ["OBSERVATIONS", "FIVE", "UNCERTAIN_POLICIES", "label", "positive_set", "label_f1", "corpus_f1"]

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
UNCERTAIN_POLICIES = ("positive", "negative", "ignore")

POS, NEG, UNC = 1.0, 0.0, -1.0
_OTHER = "_other"  # abnormalities outside the 14 that still rule out "No Finding"


def _re(*alternatives: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")


# ------------------------------------------------------------------------------------------------ mentions
# (observation, pattern, base value); the base is POS unless the phrase itself carries the judgement.
_RULES: tuple[tuple[str, re.Pattern, float], ...] = (
    ("Enlarged Cardiomediastinum", _re(r"(?:cardio)?mediastinal (?:widening|enlargement)", r"widened mediastinum"),
     POS),
    ("Cardiomegaly", _re(r"cardiomegaly", r"cardiac enlargement", r"enlargement of the heart"), POS),
    ("Lung Opacity", _re(r"opaci\w*", r"decreased translucency", r"increased density",
                         r"(?<!bone )(?<!soft tissue )(?<!osseous )(?<!metallic )(?<!fluid )densit(?:y|ies)",
                         r"air[- ]?space (?:disease|process)", r"infiltrat\w*", r"reticula\w*",
                         r"interstitial (?:markings?|pattern|prominence|abnormality|disease|lung disease)",
                         r"(?<!pleural )(?<!pleuroparenchymal )(?<!parenchymal )scar(?:s|ring)?",
                         r"parenchymal scarring", r"(?:peribronchial|bronchial wall) thickening",
                         r"ground[- ]glass", r"haziness"), POS),
    ("Lung Opacity", _re(r"lungs?(?: fields?| parenchyma)? (?:(?!not\b|no\b)[a-z-]+ ){0,4}clear", r"clear lungs"),
     NEG),
    ("Lung Lesion", _re(r"(?<!calcified )nodules?", r"nodular (?:densit(?:y|ies)|opacit(?:y|ies)|opacification)",
                        r"mass(?:es)?(?! effect)", r"lump", r"cavitary lesions?",
                        r"(?<!osseous )(?<!lytic )(?<!sclerotic )(?<!bony )(?<!skin )lesions?",
                        r"carcinoma", r"neoplasm", r"tumou?rs?", r"malignancy"), POS),
    ("Edema", _re(r"edema", r"heart failure", r"chf"), POS),
    ("Edema", _re(r"congestion", r"vascular (?:prominence|engorgement)", r"indistinctness"), UNC),  # as CheXpert
    ("Consolidation", _re(r"consolidat\w*"), POS),
    ("Pneumonia", _re(r"(?:broncho)?pneumonias?", r"infection", r"infectious(?: process)?"), POS),
    ("Atelectasis", _re(r"atelecta\w*", r"collapsed?"), POS),
    ("Pneumothorax", _re(r"(?:hydro)?pneumothora\w*", r"ptx"), POS),
    ("Pleural Effusion", _re(r"(?<!pericardial )(?<!joint )effusions?", r"pleural fluid", r"hydrothorax"), POS),
    ("Pleural Other", _re(r"pleural (?:thickening|plaques?)", r"fibrosis", r"fibrothorax",
                          r"(?:pleural|pleuroparenchymal|pleuro-parenchymal|pleural-parenchymal) scar(?:s|ring)?"),
     POS),
    ("Fracture", _re(r"fractures?", r"fractured", r"fx"), POS),
    ("Support Devices", _re(r"(?<!pleural )(?<!septal )(?<!kerley b )(?<!skin )(?<!fissure )(?<!paraspinal )"
                            r"(?<!paratracheal )(?<!azygoesophageal )(?<!junction )lines?",
                            r"tubes?", r"catheters?", r"picc", r"ports?", r"port-a-cath", r"mediport", r"pacemakers?",
                            r"pacers?", r"a?icd", r"defibrillators?", r"clips?", r"wires?", r"devices?", r"hardware",
                            r"drains?", r"cannulas?", r"stents?", r"coils?", r"screws?",
                            r"plates?(?![- ]like| atelecta)", r"prosthes[ie]s", r"arthroplast\w*", r"apparatus",
                            r"(?:prosthetic|mechanical|bioprosthetic) valves?", r"valve (?:replacement|prosthesis)",
                            r"lvad", r"impella", r"ecmo", r"balloon pump", r"iabp"), POS),
    (_OTHER, _re(r"emphysema\w*", r"hyperinflat\w*", r"hyperexpan\w*", r"copd", r"granulomas?", r"calcifi\w*",
                 r"scoliosis", r"kyphosis", r"kyphotic", r"hernia", r"eventration", r"elevat(?:ed|ion)",
                 r"degenerat\w*", r"atherosclero\w*", r"blunt\w*", r"pneumomediastinum", r"pneumoperitoneum",
                 r"metasta\w*", r"bullae", r"bulla", r"bullous", r"contusions?", r"hematoma", r"hemorrhage",
                 r"aspiration", r"bronchitis", r"bronchiolitis", r"bronchiectasis", r"cephalization", r"cuffing",
                 r"osteopenia", r"deformity", r"volume loss", r"inflammat\w*", r"hypertension", r"osteophyt\w*",
                 r"air trapping", r"bronchospasm", r"prominen\w*"), POS),
)

# Size-statement anchors: a mention only together with a size word before ("enlarged heart") or after
# ("the heart is mildly enlarged", "heart size is normal").
_ANCHORS: tuple[tuple[str, re.Pattern], ...] = (
    ("Cardiomegaly", _re(r"heart size", r"cardiac size", r"size of the heart", r"cardiac silhouettes?",
                         r"cardiac contours?", r"cardiac shadow", r"heart(?! failure)",
                         r"cardiac(?= and mediastinal| and hilar|, mediastinal|, hilar)")),
    ("Enlarged Cardiomediastinum", _re(r"cardiomediastinal (?:silhouettes?|contours?|shadow|size|width)",
                                       r"cardiomediastinum", r"mediastinum", r"pericardial silhouette",
                                       r"mediastinal (?:(?:and|,) hilar )?(?:silhouettes?|contours?|configuration"
                                       r"|shadow|width)")),
)
_QUAL = (r"(?:(?P<neg>normal|unremarkable)|(?P<unc>borderline|stable|unchanged|similar)|"
         r"(?P<pos>enlarg\w*|large|larger|increased|prominent|widened|widening))")
_QUAL_BEFORE = re.compile(r"\b" + _QUAL + r"(?:\s+(?!is\b|are\b|and\b|with\b|was\b|were\b)[\w-]+){0,2}\s*$")
_QUAL_AFTER = re.compile(r"\b" + _QUAL + r"\b")
_AFTER_WORDS = 8

# ------------------------------------------------------------------------------------------------ cues
_AUX = r"(?:is|are|was|were|be|been|being|has|have|had|does|do|did|appears?|appeared|remains?|remained|seems?|looks?)"
_ADV = (r"(?:now|also|again|still|otherwise|essentially|completely|entirely|totally|fully|since|interval|"
        r"previously|largely|nearly|almost|virtually|grossly|definitely|currently|then)")
_GAP = r"(?:(?!" + _AUX + r"\b|that\b|which\b|no\b|not\b|but\b)[\w/-]+,?\s+){0,4}?"

_NEG_PRE = _re(r"no", r"not", r"without", r"nor", r"neither", r"never", r"none", r"free of", r"negative for",
               r"absence of", r"absent", r"rather than", r"rule out", r"ruled out", r"r/o", r"resolution of",
               r"resolved", r"removal of", r"removed", r"disappearance of", r"clearing of", r"cleared", r"clear of",
               r"history of", r"exclude[sd]?", r"excluding")
# words between a negation cue and the mention that end the negation's reach
_NEG_BREAK = _re(r"consistent with", r"compatible with", r"(?<!to )suggest\w*", r"concerning", r"worrisome",
                 r"likely", r"probabl\w*", r"possibl\w*", r"represent\w*", r"due to", r"secondary to", r"with",
                 r"there (?:is|are)", r"(?:is|are|was|were) (?:seen|present|noted|identified)")
_NEG_POST = re.compile(
    r"^[\s,]*" + _GAP + r"(?:"
    r"(?:" + _AUX + r"\s+)+(?:" + _ADV + r"\s+)*"
    r"(?:not(?!\s+(?:[a-z]+\s+)?(?:changed|increased|decreased|worsened|improved|progressed|excluded|ruled|well"
    r"|clearly))|no longer|never|normal|unremarkable|absent|resolved|cleared|removed|excluded|ruled out|gone)"
    r"|(?:not|no longer)\s+(?:" + _ADV + r"\s+)*(?:seen|identified|visualized|visible|present|appreciated"
    r"|demonstrated|evident|noted|enlarged|detected)"
    r"|resolved|removed|absent)\b")
_DN_PRE = _re(r"(?:cannot|can ?not|can't|could not|couldn't|unable to|difficult to|hard to|not)\s+(?:be\s+)?"
              r"(?:(?:entirely|completely|definitely|totally|fully|confidently)\s+)?"
              r"(?:exclude[ds]?|rule[ds]? out|ruled out)", r"no new")
_DN_POST = re.compile(
    r"^[\s,]*" + _GAP + r"(?:" + _AUX + r"\s+)*(?:cannot|can ?not|can't|could not|couldn't|may not|might not|not)"
    r"\s+(?:(?:be|been)\s+)?(?:(?:entirely|completely|definitely|totally|fully|yet)\s+)?(?:excluded|ruled out)\b")
_UNC_PRE = _re(r"may", r"might", r"could", r"would", r"possible", r"possibly", r"probable", r"probably", r"likely",
               r"unlikely", r"presum\w*", r"suspect\w*", r"suspicious", r"suspicion", r"question of", r"questionable",
               r"concern(?:ing)? for", r"worrisome for", r"suggest\w*", r"differential", r"borderline", r"equivocal",
               r"indeterminate", r"uncertain", r"consider\w*", r"maybe", r"perhaps", r"either",
               r"correlat\w* (?:clinically )?for", r"(?:evaluat|assess)\w* for",
               r"not (?:well|clearly) (?:seen|visualized|evaluated)")
_UNC_NEAR = _re(r"or", r"and/or", r"versus", r"vs")
_UNC_POST = re.compile(
    r"^[\s,]*(?:(?:" + _AUX + r"|felt|thought|to|also|still|now|most|more|less|quite|very)\s+){0,3}"
    r"(?:may|might|could|would|possible|possibly|probable|probably|likely|unlikely|suspected|suspicious|"
    r"questionable|questioned|suggested|favou?red|considered|versus|vs|or|and/or|presumed|presumably|equivocal|"
    r"indeterminate|uncertain|obscured|not (?:well|clearly) (?:seen|visualized|evaluated|assessed)|"
    r"poorly (?:seen|visualized|evaluated|assessed))\b")
_PRE_WORDS, _NEAR_WORDS = 8, 4
_REACH = 200  # characters looked at on either side of a mention (keeps degenerate, repetitive text linear)

# ------------------------------------------------------------------------------------------------ text
_DEID = re.compile(r"_{2,}")
_ABBREV = re.compile(r"\b(vs|approx|dr|e\.g|i\.e)\.")
_SENTENCE = re.compile(r"[.!?\n]+(?!\d)")
_CLAUSE = re.compile(r";|\b(?:but|however|although|though|whereas|while|yet|except|aside from|apart from|other than|"
                     r"besides|which|with the exception of)\b|\band (?=(?:there|mild|moderate|severe|small|large|"
                     r"minimal|trace|new|increased|persistent|the|a|an)\b)")


def _clauses(text: str) -> list[str]:
    t = _ABBREV.sub(lambda m: m.group(1).replace(".", ""), _DEID.sub(" ", text.lower()))
    return [c for s in _SENTENCE.split(t) for c in _CLAUSE.split(s) if c.strip()]


def _anchor_base(clause: str, start: int, end: int) -> float | None:
    """Value of a size-statement anchor from its size word: the one right before it, else the first after it."""
    m = _QUAL_BEFORE.search(clause, max(0, start - _REACH), start)
    if m is None:
        m = _QUAL_AFTER.search(" ".join(clause[end:end + _REACH].split()[:_AFTER_WORDS]))
    if m is None:
        return None
    return NEG if m.group("neg") else UNC if m.group("unc") else POS


def _negated_before(window: str) -> bool:
    last = None
    for m in _NEG_PRE.finditer(window):
        last = m
    return last is not None and not _NEG_BREAK.search(window, last.end())


def _classify(clause: str, start: int, end: int, base: float) -> float:
    """One mention's value from the cues around clause[start:end] (the rules in the module docstring)."""
    words = clause[max(0, start - _REACH):start].split()
    window = " ".join(words[-_PRE_WORDS:])
    post = clause[end:end + _REACH]
    if _DN_PRE.search(window) or _DN_POST.match(post):
        return UNC
    if base == NEG or _negated_before(window) or _NEG_POST.match(post):
        return NEG
    if (base == UNC or _UNC_PRE.search(window) or _UNC_NEAR.search(" ".join(words[-_NEAR_WORDS:]))
            or _UNC_POST.match(post)):
        return UNC
    return POS


def _aggregate(values: list[float]) -> float:
    """CheXpert's rule for several mentions: positive beats uncertain beats negative."""
    return POS if POS in values else UNC if UNC in values else NEG


@lru_cache(maxsize=4096)
def _label_tuple(text: str) -> tuple[float | None, ...]:
    """The labels in OBSERVATIONS order (cached: the metrics label each reference text many times)."""
    found: dict[str, list[float]] = {}
    for clause in _clauses(text):
        for obs, pattern, base in _RULES:
            for m in pattern.finditer(clause):
                value = _classify(clause, m.start(), m.end(), base)
                found.setdefault(obs, []).append(value)
                if m.group() in ("chf", "heart failure") and value != NEG:  # CheXpert: also uncertain cardiomegaly
                    found.setdefault("Cardiomegaly", []).append(UNC)
        for obs, pattern in _ANCHORS:
            for m in pattern.finditer(clause):
                anchor = _anchor_base(clause, m.start(), m.end())
                if anchor is not None:
                    found.setdefault(obs, []).append(_classify(clause, m.start(), m.end(), anchor))
    out = {obs: _aggregate(values) for obs, values in found.items()}
    if text.strip() and not any(v in (POS, UNC) for obs, v in out.items() if obs != "Support Devices"):
        out["No Finding"] = POS
    return tuple(out.get(obs) for obs in OBSERVATIONS)


def label(text: str) -> dict[str, float | None]:
    """CheXpert-style labels of a report: 1.0 positive, 0.0 negative, -1.0 uncertain, None not mentioned."""
    return dict(zip(OBSERVATIONS, _label_tuple(text or "")))


# ------------------------------------------------------------------------------------------------ scores

def _check_policy(uncertain: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}, got {uncertain!r}")


def positive_set(labels: Mapping[str, float | None], uncertain: str = "positive") -> set[str]:
    """Observations counted positive; ``uncertain``: "positive" (U-Ones), "negative" (U-Zeros) or "ignore"."""
    _check_policy(uncertain)
    accept = (POS, UNC) if uncertain == "positive" else (POS,)
    return {obs for obs, v in labels.items() if v in accept}


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def label_f1(pred_text: str, ref_text: str, uncertain: str = "positive") -> float:
    """F1 of the prediction's positive observations against the reference's; 1.0 when both have none."""
    pred, ref = positive_set(label(pred_text), uncertain), positive_set(label(ref_text), uncertain)
    if not pred and not ref:
        return 1.0
    tp = len(pred & ref)
    return _f1(tp, len(pred) - tp, len(ref) - tp)


def corpus_f1(predictions: Sequence[str], references: Sequence[str], uncertain: str = "positive",
              observations: Sequence[str] = OBSERVATIONS) -> dict:
    """CheXpert F1 over a corpus: per observation precision/recall/f1/support (support = reference positives),
    ``micro_precision``/``micro_recall``/``micro_f1`` and ``macro_f1`` (over observations with support) for
    ``observations``, and ``micro_f1_5``/``macro_f1_5`` for the five common ones (:data:`FIVE`)."""
    _check_policy(uncertain)
    if len(predictions) != len(references):
        raise InputError(f"predictions and references differ in length: {len(predictions)} vs {len(references)}")
    unknown = [o for o in observations if o not in OBSERVATIONS]
    if unknown:
        raise InputError(f"unknown observations {unknown}; expected names from {OBSERVATIONS}")
    counts = {obs: [0, 0, 0] for obs in OBSERVATIONS}  # tp, fp, fn
    for p, r in zip(predictions, references):
        pred, ref = positive_set(label(p), uncertain), positive_set(label(r), uncertain)
        for obs in pred | ref:
            counts[obs][0 if obs in pred and obs in ref else 1 if obs in pred else 2] += 1

    def summary(names: Sequence[str]) -> tuple[float, float, float, float]:
        tp, fp, fn = (sum(counts[o][i] for o in names) for i in range(3))
        supported = [_f1(*counts[o]) for o in names if counts[o][0] + counts[o][2] > 0]
        return (tp / (tp + fp) if tp else 0.0, tp / (tp + fn) if tp else 0.0, _f1(tp, fp, fn),
                sum(supported) / len(supported) if supported else 0.0)

    per = {o: {"precision": counts[o][0] / (counts[o][0] + counts[o][1]) if counts[o][0] else 0.0,
               "recall": counts[o][0] / (counts[o][0] + counts[o][2]) if counts[o][0] else 0.0,
               "f1": _f1(*counts[o]), "support": counts[o][0] + counts[o][2]} for o in observations}
    micro_p, micro_r, micro_f1, macro_f1 = summary(observations)
    _, _, micro_f1_5, macro_f1_5 = summary(FIVE)
    return {"per_observation": per, "micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": micro_f1,
            "macro_f1": macro_f1, "micro_f1_5": micro_f1_5, "macro_f1_5": macro_f1_5, "n": len(predictions)}
