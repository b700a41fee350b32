"""GRPO rewards: the paper's rule-based reward (exact), a word-level variant, grounding against reference boxes,
clinical correctness of reports, and weighted composites of them.

Every reward scores one output against one record and returns its components, ``overall`` among them:

* ``paper`` — the released DeepMedix-R1 reward, bit-exact, quirks included: the answer is compared with BLEU over
  *characters* (``sentence_bleu`` on raw strings), list answers' F1 divides by the item counts (duplicates
  included), and boxes are only checked against the 512-pixel frame (``[a,b,c,d]`` with no space after ``[``, as
  the release's pattern reads them), never against a reference. ``overall = 0.9·accuracy + 0.1·format +
  coordinate``.
* ``paper-words`` — the same with BLEU over word tokens (``\\w+`` runs and single punctuation marks).
* ``grounded`` — the reasoning's boxes matched to the record's reference boxes (model frame) by Hungarian matching
  on IoU: ``iou`` is the matched pairs' mean IoU, ``count`` the count agreement (min/max of the two counts);
  ``soft`` mode gives ``iou_weight·iou + count_weight·count``, ``gemex`` mode gives 1 when the counts match and
  the mean IoU is above ``gemex_iou`` (GEMeX-ThinkVG), else 0. Records without reference boxes are neutral
  (``None``: TRL leaves them out of the sum).
* ``clinical`` — report tasks only (neutral elsewhere): F1 of the 14 CheXpert observations found by
  :mod:`deepmedix.clinical` in the answer against those in the reference.

A composite (:class:`RewardSpec`) weights several of them; in GRPO each becomes one TRL reward function (logged
by TRL as ``rewards/<name>/mean``) with its weight in ``reward_weights``, and its parts are logged on their own
through TRL's ``log_metric`` (``rewards/<name>/<part>``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from deepmedix import grounding, store

_NORM_RE = re.compile(r"\s*(<|>|/)\s*")
_FORMAT_RE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.S)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
# The release's box pattern: four numbers, commas with optional spaces *after* them, nothing else inside.
_PAPER_BOX_RE = re.compile(r"\[([-+]?\d*\.?\d+(?:,\s*[-+]?\d*\.?\d+){3})\]")
_WORD_RE = re.compile(r"\w+|[^\w\s]")

ACC_SCALE = 1.5
FORMAT_WEIGHT = 0.1
COORD_GOOD = 0.05
COORD_BAD = -0.2
COORD_CAP = 0.15
COORD_LIMIT = 512  # a box with any value above this is outside the model frame


# ---------------------------------------------------------------- completions

def completion_text(c: Any) -> str:
    """The text of one completion: a plain string, or the last assistant turn of a conversation."""
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, dict):
        return _content_text(c.get("content"))
    msgs = list(c)
    if not msgs:
        return ""
    if all(isinstance(m, str) for m in msgs):
        return "".join(msgs)
    assistant = [m for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"]
    msg = assistant[-1] if assistant else msgs[-1]
    return _content_text(msg.get("content") if isinstance(msg, dict) else msg)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    # multimodal content parts: [{"type": "text", "text": "..."}, ...]
    parts = []
    for p in content:
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, dict) and p.get("type", "text") == "text":
            parts.append(str(p.get("text", "")))
    return "".join(parts)


# ---------------------------------------------------------------- the paper's reward

def normalise(output: str) -> str:
    """Drop whitespace around ``<``, ``>`` and ``/`` so that ``< think >`` reads as ``<think>``."""
    return _NORM_RE.sub(r"\1", output)


def boxed_answer(normalised: str) -> str:
    """The boxed answer as the release reads it: ``"None"`` if absent or unclosed, ``" "`` if empty."""
    a = grounding.last_boxed(normalised)
    if a is None:
        return "None"
    return a if a else " "


def format_score(normalised: str) -> float:
    return 1.0 if _FORMAT_RE.fullmatch(normalised) else 0.0


def coordinate_score(normalised: str) -> float:
    """+0.05 per box of the first reasoning block inside the frame, -0.2 per box outside; at most 0.15."""
    m = _THINK_RE.search(normalised)
    if not m:
        return 0.0
    value = 0.0
    for item in _PAPER_BOX_RE.findall(m.group(1)):
        value += COORD_BAD if max(float(v.strip()) for v in item.split(",")) > COORD_LIMIT else COORD_GOOD
    return COORD_CAP if value > COORD_CAP else value


def answer_kind(truth: str) -> str:
    """How the release scores an answer against ``truth``: ``list`` (item F1), ``short`` (exact match) or
    ``long`` (text similarity)."""
    n_words = len(truth.strip().split())
    if "|" in truth and n_words <= 20:
        return "list"
    return "short" if n_words <= 2 else "long"


def _item_f1(answer: str, truth: str) -> float:
    """The release's list F1: the sets' overlap over the item *counts* (a repeated item counts twice)."""
    ref = [x.strip().lower() for x in truth.strip().split("|")]
    pred = [x.strip().lower() for x in answer.strip().split("|")]
    hit = len(set(ref) & set(pred))
    precision = hit / len(pred) if len(pred) > 0 else 0
    recall = hit / len(ref) if len(ref) > 0 else 0
    return 2 * (precision * recall) / (precision + recall) if (precision + recall) > 0 else 0


@lru_cache(maxsize=1)
def _rouge1():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def _text_similarity(answer: str, truth: str, words: bool = False) -> float:
    """Mean of BLEU-1, BLEU-4 (over characters, or over word tokens with ``words``) and ROUGE-1 F."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method2
    ref, hyp = (_WORD_RE.findall(truth), _WORD_RE.findall(answer)) if words else (truth, answer)
    bleu1 = sentence_bleu([ref], hyp, weights=(1, 0, 0, 0), smoothing_function=smooth)
    bleu4 = sentence_bleu([ref], hyp, weights=(0.25, 0.25, 0.25, 0.25), smoothing_function=smooth)
    rouge1 = _rouge1().score(answer, truth)["rouge1"].fmeasure  # the release's argument order (F is symmetric)
    return (bleu1 + bleu4 + rouge1) / 3


def accuracy_score(answer: str, truth: str, words: bool = False) -> float:
    kind = answer_kind(truth)
    if kind == "list":
        return _item_f1(answer, truth) * ACC_SCALE
    if kind == "short":
        return ACC_SCALE if answer.lower() == truth.lower() else 0.0
    return _text_similarity(answer, truth, words) * ACC_SCALE


def paper_components(output: str, truth: str, words: bool = False) -> dict[str, float]:
    """The paper's rule-based reward and its parts: accuracy (0..1.5), format (0/1), coordinate (<= 0.15)."""
    acc, fmt, coord, overall = _paper(output or "", truth or "", words)
    return {"accuracy": acc, "format": fmt, "coordinate": coord, "overall": overall}


@lru_cache(maxsize=4096)  # a batch's components are asked for by several reward functions
def _paper(output: str, truth: str, words: bool) -> tuple[float, float, float, float]:
    p = normalise(output)
    acc = accuracy_score(boxed_answer(p), truth, words)
    fmt = format_score(p)
    coord = coordinate_score(p)
    return acc, fmt, coord, (1 - FORMAT_WEIGHT) * acc + FORMAT_WEIGHT * fmt + coord


# ---------------------------------------------------------------- grounded

def _boxes(ref: Any, where: str = "boxes") -> list[list[float]]:
    """Reference boxes as lists of 4 floats; ValueError naming the field when they are not."""
    if ref is None:
        return []
    if not isinstance(ref, (list, tuple)):
        raise ValueError(f"{where}: expected a list of [x1, y1, x2, y2] boxes, got {ref!r}")
    out = []
    for i, b in enumerate(ref):
        if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b):
            raise ValueError(f"{where}[{i}]: expected 4 finite numbers [x1, y1, x2, y2], got {b!r}")
        out.append([float(v) for v in b])
    return out


def grounded_components(output: str, ref_boxes: Any, mode: str = "soft", iou_weight: float = 0.5,
                        count_weight: float = 0.5, gemex_iou: float = 0.75) -> dict[str, float] | None:
    """The reasoning's boxes against the reference boxes (both in the model frame); None without references.
    ``iou`` is the evaluation's mIoU: the matched IoUs summed over the larger of the two counts, so an extra or a
    missing box counts 0 (spraying boxes cannot raise it)."""
    ref = _boxes(ref_boxes)
    if not ref:
        return None
    pred = grounding.parse(normalise(output or "")).boxes
    iou = grounding.mean_matched_iou(pred, ref)
    count = min(len(pred), len(ref)) / max(len(pred), len(ref))
    if mode == "gemex":
        value = 1.0 if len(pred) == len(ref) and iou > gemex_iou else 0.0
    else:
        value = iou_weight * iou + count_weight * count
    return {"iou": iou, "count": count, "overall": value}


# ---------------------------------------------------------------- clinical

def is_report(task: str | None, truth: str) -> bool:
    """Report tasks (findings / impression generation); without a task name, a long free-text answer."""
    if task:
        return task.startswith("report")
    return answer_kind(truth or "") == "long"


def report_answer(output: str) -> str:
    """The report a completion gives: its boxed answer, else its text after the reasoning."""
    p = normalise(output or "")
    answer = grounding.last_boxed(p)
    if answer is not None:
        return answer
    return p.rsplit("</think>", 1)[-1].strip()


def clinical_components(output: str, truth: str, task: str | None = None,
                        uncertain: str = "positive") -> dict[str, float] | None:
    """CheXpert-observation F1 of the answer against the reference report; None for non-report tasks.

    One hardening over the labeller: an answer that mentions none of the observations earns no "No Finding" (the
    labeller gives it to any text without findings, so gibberish would match every normal study)."""
    from deepmedix import clinical

    if not is_report(task, truth):
        return None
    labels = clinical.label(report_answer(output))
    pred = clinical.positive_set(labels, uncertain)
    if all(v is None for k, v in labels.items() if k != "No Finding"):
        pred.discard("No Finding")
    ref = clinical.positive_set(clinical.label(truth or ""), uncertain)
    if not pred and not ref:
        return {"overall": 1.0}
    tp = len(pred & ref)
    return {"overall": 2 * tp / (len(pred) + len(ref))}


# ---------------------------------------------------------------- composites

COMPONENTS = ("paper", "paper-words", "grounded", "clinical")
REWARD_DIR = Path(__file__).resolve().parents[2] / "configs" / "rewards"
_SPEC_KEYS = {"weights", "grounded_mode", "grounded_iou_weight", "grounded_count_weight", "grounded_gemex_iou",
              "clinical_uncertain"}


@dataclass
class RewardSpec:
    """Which rewards, with which weights and settings. ``overall`` is the weighted sum of the components that
    apply to a record (a neutral one — ``None`` — adds nothing)."""
    weights: dict[str, float] = field(default_factory=lambda: {"paper": 1.0})
    grounded_mode: str = "soft"          # soft: iou_weight * IoU + count_weight * count agreement; gemex: 0/1
    grounded_iou_weight: float = 0.5
    grounded_count_weight: float = 0.5
    grounded_gemex_iou: float = 0.75     # gemex: the counts match and the mean matched IoU is above this
    clinical_uncertain: str = "positive"  # uncertain CheXpert mentions count as positive, negative or ignore
    name: str = "paper"

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError(f"reward {self.name}: no components (known: {', '.join(COMPONENTS)})")
        for k, w in self.weights.items():
            if k not in COMPONENTS:
                raise ValueError(f"reward {self.name}: unknown component {k!r} (known: {', '.join(COMPONENTS)})")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ValueError(f"reward {self.name}: weight of {k!r} must be a number, got {w!r}")
        for key in ("grounded_iou_weight", "grounded_count_weight", "grounded_gemex_iou"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"reward {self.name}: {key} must be a number, got {v!r}")
        if not 0.0 <= self.grounded_gemex_iou <= 1.0:
            raise ValueError(f"reward {self.name}: grounded_gemex_iou must be within 0..1, got "
                             f"{self.grounded_gemex_iou}")
        if self.grounded_mode not in ("soft", "gemex"):
            raise ValueError(f"reward {self.name}: grounded_mode must be 'soft' or 'gemex', got {self.grounded_mode!r}")
        if self.clinical_uncertain not in ("positive", "negative", "ignore"):
            raise ValueError(f"reward {self.name}: clinical_uncertain must be positive, negative or ignore, got "
                             f"{self.clinical_uncertain!r}")

    @classmethod
    def parse(cls, spec: str, **settings: Any) -> "RewardSpec":
        """``spec`` is a component name (``paper``), a composite's name under ``configs/rewards/``, a YAML file
        (``weights:`` plus any of the settings), or inline weights (``paper=1,grounded=0.5``). ``settings`` are
        defaults that a composite file's own settings override."""
        spec = (spec or "").strip()
        if spec in COMPONENTS:
            return cls(weights={spec: 1.0}, name=spec, **settings)
        path = Path(spec) if spec.endswith((".yaml", ".yml")) else REWARD_DIR / f"{spec}.yaml"
        if path.is_file():
            return cls._from_file(path, settings)
        if "=" in spec:
            weights = {}
            for part in spec.split(","):
                k, _, v = part.partition("=")
                if k.strip() in weights:
                    raise ValueError(f"reward {spec!r}: {k.strip()!r} is given twice")
                try:
                    weights[k.strip()] = float(v)
                except ValueError:
                    raise ValueError(f"reward {spec!r}: {part.strip()!r} is not NAME=WEIGHT") from None
            return cls(weights=weights, name=spec, **settings)
        known = sorted(COMPONENTS) + sorted(p.stem for p in REWARD_DIR.glob("*.yaml"))
        raise ValueError(f"unknown reward {spec!r}: expected one of {', '.join(known)}, a YAML file, or inline "
                         f"weights such as paper=1,grounded=0.5")

    @classmethod
    def _from_file(cls, path: Path, settings: dict[str, Any]) -> "RewardSpec":
        import yaml

        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: not a readable YAML reward file ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with 'weights', got {type(data).__name__}")
        unknown = set(data) - _SPEC_KEYS
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(known: {', '.join(sorted(_SPEC_KEYS))})")
        if not isinstance(data.get("weights"), dict):
            raise ValueError(f"{path}: 'weights' must map component names to weights, e.g. {{paper: 1.0}}")
        try:
            return cls(**{**settings, **data, "name": path.stem})
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_config(cls, cfg: Any) -> "RewardSpec":
        """From a stage config: ``reward`` (a name, composite or file), then what the config itself sets wins —
        ``reward_weights`` when given, and every setting changed from the config's default (a composite file's
        settings beat the defaults, not the run's own choices)."""
        import dataclasses

        keys = [f.name for f in fields(cls) if f.name not in ("weights", "name") and hasattr(cfg, f.name)]
        defaults = type(cfg)()
        base = cls.parse(cfg.reward, **{k: getattr(cfg, k) for k in keys})
        changes = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) != getattr(defaults, k)}
        weights = getattr(cfg, "reward_weights", None)
        if weights:
            changes.update(weights=dict(weights), name="+".join(weights))
        return dataclasses.replace(base, **changes)

    # -- scoring

    def component(self, name: str, output: str, truth: str, boxes: Any = None,
                  task: str | None = None) -> dict[str, float] | None:
        if name == "paper":
            return paper_components(output, truth)
        if name == "paper-words":
            return paper_components(output, truth, True)
        if name == "grounded":
            return grounded_components(output, boxes, self.grounded_mode, self.grounded_iou_weight,
                                       self.grounded_count_weight, self.grounded_gemex_iou)
        return clinical_components(output, truth, task, self.clinical_uncertain)

    def score(self, output: str, truth: str, boxes: Any = None, task: str | None = None) -> dict[str, float | None]:
        """Every component (``name`` and ``name/part``) and ``overall``, for one output."""
        out: dict[str, float | None] = {}
        total = None  # None when no component applies (TRL leaves such a completion out, too)
        for name, w in self.weights.items():
            parts = self.component(name, output, truth, boxes, task)
            out[name] = None if parts is None else parts["overall"]
            for k, v in (parts or {}).items():
                if k != "overall":
                    out[f"{name}/{k}"] = v
            if parts is not None:
                total = (total or 0.0) + w * parts["overall"]
        out["overall"] = total
        return out

    # -- TRL

    def trl_functions(self, on_scores: Callable[[dict], None] | None = None) -> tuple[list[Callable], list[float]]:
        """One TRL reward function per component (named after it, so TRL logs ``rewards/<name>/mean``) and their
        weights. Each logs its parts through TRL's ``log_metric``. ``on_scores`` gets each batch's scores once all
        components are in (the rollout sample)."""
        names = list(self.weights)
        batch: dict[str, Any] = {"key": None, "scores": {}}

        def make(name: str) -> Callable:
            def reward(completions: list, answer: list[str], ref_boxes_frame: list | None = None,
                       task: list[str] | None = None, log_metric: Callable | None = None, **kw) -> list[float | None]:
                n = len(completions)
                if len(answer) != n:
                    raise ValueError(f"reward {name}: {n} completions but {len(answer)} answers")
                boxes = ref_boxes_frame if ref_boxes_frame is not None else [None] * n
                tasks = task if task is not None else [None] * n
                rows = [self.component(name, completion_text(c), a, b, t)
                        for c, a, b, t in zip(completions, answer, boxes, tasks)]
                if log_metric is not None:
                    for part in sorted({k for r in rows if r for k in r} - {"overall"}):
                        vals = [r[part] for r in rows if r]
                        log_metric(f"rewards/{name}/{part}", sum(vals) / len(vals))
                if on_scores is not None:
                    key = id(completions)  # one list per batch, passed to every function; a name seen again
                    if batch["key"] != key or name in batch["scores"]:  # also starts a batch (ids are reused)
                        batch.update(key=key, scores={})
                    batch["scores"][name] = rows
                    if len(batch["scores"]) == len(names):
                        on_scores({"completions": [completion_text(c) for c in completions], "answer": list(answer),
                                   "task": list(tasks), "scores": batch["scores"], "weights": dict(self.weights),
                                   "kwargs": kw})
                return [None if r is None else r["overall"] for r in rows]

            reward.__name__ = name
            return reward

        return [make(n) for n in names], [float(self.weights[n]) for n in names]


# ---------------------------------------------------------------- scoring files (the CLI)

def read_score_rows(path: Path) -> list[dict[str, Any]]:
    """The lines of a JSONL file to score, checked: each an object with string ``prediction`` and
    ``ground_truth`` (``boxes``: a list of [x1, y1, x2, y2] in the model frame, ``task``: optional)."""
    rows = []
    for _, where, row in store.jsonl_objects(path):
        for key in ("prediction", "ground_truth"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {row.get(key)!r}")
        if row.get("task") is not None and not isinstance(row["task"], str):
            raise ValueError(f"{where}: field 'task' must be a string, got {row['task']!r}")
        row["boxes"] = _boxes(row.get("boxes"), f"{where}: field 'boxes'") if row.get("boxes") is not None else None
        rows.append(row)
    return rows


def score_rows(spec: RewardSpec, rows: Iterable[dict[str, Any]]) -> Iterable[dict[str, float | None]]:
    for r in rows:
        yield spec.score(r["prediction"], r["ground_truth"], r.get("boxes"), r.get("task"))
