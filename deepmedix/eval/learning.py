"""The learning benchmark's statistics (``make bench-learning``, ``bench/learning_bench.py``): does each stage of the
recipe raise, on held-out records, what it is meant to raise?

* :func:`record_values`: one evaluation's prediction rows (``predictions.jsonl``) as per-record values — VQA
  correctness (overall and per question type), grounding IoU and accuracy at IoU 0.5, format compliance, the paper
  reward and the grounded reward — keyed by record id, so that two models are compared on the same records.
* Two baselines that see no image, as prediction rows scored like any model's: the majority answer of each question
  type in the train split (:func:`majority_answers`) and each label's mean train box (:func:`label_prior`). A third,
  for VQA only and outside the targets, reads the whole question: the train split's majority answer to the same
  question text (:func:`question_answers`, :func:`text_only_values`), what a model that reads no image can reach.
* :func:`interval` (percentile bootstrap over records) and :func:`paired` (the paired bootstrap of a difference:
  both models' values on the same resampled records).
* :func:`targets`: the benchmark's targets, each judged on a lower (or, for "no loss", upper) 95 % bound.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import numpy as np

from deepmedix.data.schema import Record
from deepmedix.eval.scoring import PLAIN, row_answer, row_iou, vqa_correct
from deepmedix.grounding import box_str, parse
from deepmedix.rewards.grounded import grounded_components
from deepmedix.rewards.paper import paper_components

# the benchmark's metrics, in table order (VQA accuracy per question type is added as vqa_accuracy/<type>, the paper
# reward's terms as paper_reward/<term>)
METRICS = ("vqa_accuracy", "grounding_miou", "grounding_acc@0.5", "format_compliance", "paper_reward",
           "grounded_reward")
BASELINE_METRICS = ("vqa_accuracy", "grounding_miou", "grounding_acc@0.5")
# overall = 0.9 accuracy + 0.1 format + coordinate (rewards/paper.py): the terms, to show which one a change moved
PAPER_TERMS = ("accuracy", "format", "coordinate")
Values = dict[str, dict[str, float]]  # metric -> record id -> value


def record_values(rows: Iterable[dict[str, Any]]) -> Values:
    """Per-record values of one model's prediction rows. VQA rows give ``vqa_accuracy`` and
    ``vqa_accuracy/<question type>``; grounding rows with reference boxes give ``grounding_miou`` and
    ``grounding_acc@0.5``; every row gives ``format_compliance``, ``paper_reward`` and its terms
    (``paper_reward/accuracy``, ``/format``, ``/coordinate``, unweighted); rows with reference boxes
    (any task) give ``grounded_reward`` (the ``grounded`` reward's default soft mode, as GRPO scores it)."""
    out: Values = {}

    def put(metric: str, rid: str, value: float) -> None:
        out.setdefault(metric, {})[rid] = float(value)

    for row in rows:
        rid, task, raw = row["record_id"], row.get("task"), row.get("raw_output") or ""
        refs = row.get("ref_boxes_frame") or []
        if task == "vqa":
            ok = vqa_correct(row_answer(row), row.get("reference") or "")
            put("vqa_accuracy", rid, ok)
            if row.get("question_type"):
                put(f"vqa_accuracy/{row['question_type']}", rid, ok)
        elif task == "grounding" and refs:
            iou = row_iou(row)
            put("grounding_miou", rid, iou)
            put("grounding_acc@0.5", rid, iou >= 0.5)
        put("format_compliance", rid, parse(raw).format_ok)
        paper = paper_components(raw, row.get("reference") or "")
        put("paper_reward", rid, paper["overall"])
        for term in PAPER_TERMS:
            put(f"paper_reward/{term}", rid, paper[term])
        grounded = grounded_components(raw, refs, n_images=row.get("n_images") or 1)
        if grounded is not None:
            put("grounded_reward", rid, grounded["overall"])
    return out


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def _majority(train: Iterable[Record], key) -> dict[str, str]:
    counts: dict[str, Counter] = {}
    for rec in train:
        if rec.task == "vqa":
            counts.setdefault(key(rec), Counter())[_fold(rec.answer)] += 1
    return {k: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k, c in counts.items()}


def majority_answers(train: Iterable[Record]) -> dict[str, str]:
    """The most common answer of each VQA question type in the train split (ties: the first in sorted order)."""
    return _majority(train, lambda rec: rec.question_type or "")


def question_answers(train: Iterable[Record]) -> dict[str, str]:
    """The most common answer to each VQA question text in the train split (case and spacing folded; ties: the
    first in sorted order). On the phantom set the text alone tells much: "Where is the right pleural effusion?"
    is always "right base"."""
    return _majority(train, lambda rec: _fold(rec.prompt))


def label_prior(train: Iterable[Record]) -> dict[str, list[float]]:
    """Each label's mean box over the train split's grounding records, as fractions of the image's width and height
    (a box that does not look at the image: the prior a grounding model has to beat)."""
    sums: dict[str, np.ndarray] = {}
    counts: Counter = Counter()
    for rec in train:
        if rec.task != "grounding":
            continue
        w, h = rec.image_sizes[0]
        for b in rec.boxes:
            sums[b.label] = sums.get(b.label, np.zeros(4)) + np.asarray(b.box, dtype=float) / [w, h, w, h]
            counts[b.label] += 1
    return {label: (sums[label] / counts[label]).tolist() for label in sorted(sums)}


def baseline_rows(test_rows: Iterable[dict[str, Any]], answers: dict[str, str],
                  prior: dict[str, list[float]], by_question: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The two baselines as prediction rows on the same records (plain answers): a VQA row answers its question
    type's majority answer, a grounding row names its label with the label's prior box in the row's model frame
    (``frame_size``). Other tasks are left out; a type or label the train split lacks answers nothing. With
    ``by_question`` (:func:`question_answers`), a VQA row whose question text the train split has answers that
    text's majority answer instead."""
    out = []
    for row in test_rows:
        if row.get("task") == "vqa":
            raw = ((by_question or {}).get(_fold(row.get("prompt") or ""))
                   or answers.get(row.get("question_type") or "", ""))
        elif row.get("task") == "grounding":
            label = (row.get("ref_labels") or [""])[0]
            w, h = row.get("frame_size") or [1, 1]
            box = prior.get(label)
            raw = f"{label} " + box_str([box[0] * w, box[1] * h, box[2] * w, box[3] * h]) if box else label
        else:
            continue
        out.append({**row, "raw_output": raw, "prompt_mode": PLAIN})
    return out


def baseline_values(test_rows: Iterable[dict[str, Any]], train: list[Record]) -> Values:
    """The baselines' per-record VQA and grounding values on the records of ``test_rows`` (their format and
    rewards are not a model's and are left out)."""
    rows = baseline_rows(test_rows, majority_answers(train), label_prior(train))
    return {m: v for m, v in record_values(rows).items() if m.split("/")[0] in BASELINE_METRICS}


def text_only_values(test_rows: Iterable[dict[str, Any]], train: list[Record]) -> Values:
    """The question-text baseline's per-record VQA values on the records of ``test_rows`` (a question text the train
    split lacks falls back to its type's majority answer)."""
    rows = [r for r in test_rows if r.get("task") == "vqa"]
    rows = baseline_rows(rows, majority_answers(train), {}, question_answers(train))
    return {m: v for m, v in record_values(rows).items() if m.split("/")[0] == "vqa_accuracy"}


def _draws(n: int, rounds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(rounds, n))


def interval(values: dict[str, float], rounds: int = 1000, seed: int = 0) -> dict[str, float]:
    """The mean over records and its percentile bootstrap 95 % interval (records resampled with replacement)."""
    v = np.asarray([values[k] for k in sorted(values)], dtype=float)
    if not len(v):
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    means = v[_draws(len(v), rounds, seed)].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"value": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": len(v)}


def paired(before: dict[str, float], after: dict[str, float], rounds: int = 1000, seed: int = 0) -> dict[str, float]:
    """``after - before`` on the records both have: the mean difference and its paired bootstrap 95 % interval
    (each resample draws records, and both models' values on those records)."""
    common = sorted(set(before) & set(after))
    return interval({k: after[k] - before[k] for k in common}, rounds, seed)


def _target(name: str, rule: str, met: bool, stats: dict[str, float], threshold: float, **extra) -> dict[str, Any]:
    """One target: ``threshold`` is what the rule compares the interval's bound with."""
    return {"name": name, "met": bool(met), "value": stats["value"], "ci_low": stats["ci_low"],
            "ci_high": stats["ci_high"], "n": stats["n"], "rule": rule, "threshold": threshold, **extra}


def targets(values: dict[str, Values], rounds: int = 1000, seed: int = 0, vqa_margin: float = 0.15,
            format_min: float = 0.95) -> list[dict[str, Any]]:
    """The benchmark's targets on the test split, from per-record values of the models ``baseline``, ``sft``,
    ``coldstart``, ``grpo_grounded`` and ``grpo_paper``. Differences use the paired bootstrap over the same records."""
    def get(model: str, metric: str) -> dict[str, float]:
        return values.get(model, {}).get(metric, {})

    out = []
    d = paired(get("baseline", "vqa_accuracy"), get("sft", "vqa_accuracy"), rounds, seed)
    out.append(_target("sft_vqa_accuracy_minus_majority_baseline", f"ci_low >= {vqa_margin}",
                       d["ci_low"] >= vqa_margin, d, vqa_margin))
    d = paired(get("baseline", "grounding_miou"), get("sft", "grounding_miou"), rounds, seed)
    out.append(_target("sft_grounding_miou_minus_label_prior", "ci_low > 0", d["ci_low"] > 0, d, 0.0))
    f = interval(get("coldstart", "format_compliance"), rounds, seed)
    out.append(_target("coldstart_format_compliance", f"ci_low >= {format_min}", f["ci_low"] >= format_min, f,
                       format_min))
    cs = interval(get("coldstart", "vqa_accuracy"), rounds, seed)
    sft = interval(get("sft", "vqa_accuracy"), rounds, seed)
    out.append(_target("coldstart_vqa_accuracy_keeps_sft", "ci_high >= SFT's ci_low (the intervals overlap, or better)",
                       cs["ci_high"] >= sft["ci_low"], cs, sft["ci_low"],
                       sft={k: sft[k] for k in ("value", "ci_low", "ci_high")},
                       difference=paired(get("sft", "vqa_accuracy"), get("coldstart", "vqa_accuracy"), rounds, seed)))
    d = paired(get("coldstart", "grounding_miou"), get("grpo_grounded", "grounding_miou"), rounds, seed)
    out.append(_target("grpo_grounded_test_miou_minus_coldstart", "ci_low > 0", d["ci_low"] > 0, d, 0.0))
    d = paired(get("coldstart", "paper_reward"), get("grpo_paper", "paper_reward"), rounds, seed)
    terms = {t: paired(get("coldstart", f"paper_reward/{t}"), get("grpo_paper", f"paper_reward/{t}"), rounds, seed)
             for t in PAPER_TERMS}  # which term moved: the answers, or the boxes the coordinate term counts
    out.append(_target("grpo_paper_test_paper_reward_minus_coldstart", "ci_low > 0", d["ci_low"] > 0, d, 0.0,
                       terms=terms))
    for t in out:  # a target with no records to judge it on is not met
        t["met"] = t["met"] and t["n"] > 0
    return out


def table(values: dict[str, Values], rounds: int = 1000, seed: int = 0) -> dict[str, dict[str, dict[str, float]]]:
    """``{metric: {model: interval}}`` for every metric any model has (the paper reward's terms and VQA per question
    type after the headline metrics)."""
    names = [m for m in METRICS if any(m in v for v in values.values())]
    names += [f"paper_reward/{t}" for t in PAPER_TERMS if any(f"paper_reward/{t}" in v for v in values.values())]
    names += sorted({m for v in values.values() for m in v if m.startswith("vqa_accuracy/")})
    return {m: {model: interval(v[m], rounds, seed) for model, v in values.items() if m in v} for m in names}
