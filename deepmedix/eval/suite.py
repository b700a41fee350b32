"""The evaluation suite: every metric per subset, with bootstrap 95 % confidence intervals.

Subsets (each named ``source/task[/kind]``, plus ``all/...`` across sources where there are several sources):

* reports (``report_findings``, ``report_impression``): BLEU-1..4, METEOR, ROUGE-L and CIDEr with pycocoevalcap's
  definitions (:mod:`deepmedix.eval.nlg`, on :func:`~deepmedix.eval.nlg.tokenize`\\ d text)
  and CheXpert F1 (micro and macro, over the 14 observations and over the 5 common ones) from the rule-based
  labeller (:mod:`deepmedix.clinical`); with the models configured, BERTScore, CheXbert F1 and RadGraph F1
  (:mod:`deepmedix.eval.model_based`);
* VQA: accuracy by question type (list answers: the same set of items; others: a normalised exact match);
* grounding: mIoU and accuracy at IoU 0.5 by finding label (the first reference box's label).

Intervals: ``rounds`` resamples of the subset's records with replacement (seeded), each metric recomputed on the
resample — corpus BLEU from the summed per-pair statistics, CheXpert F1 from summed per-observation counts, the
others as means of per-pair values (CIDEr with the full subset's document frequencies, as its per-pair values
are defined). METEOR's value is the jar's corpus aggregate; its interval is that of the segment scores' mean,
shifted to the aggregate (and kept within [0, 1]). The percentile interval (2.5 %, 97.5 %) is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deepmedix import clinical, grounding
from deepmedix.data.schema import REPORT_TASKS
from deepmedix.errors import InputError
from deepmedix.eval.scoring import report_text, row_answer, row_iou, vqa_correct


def _ci(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def _entry(value: float, samples: np.ndarray | None) -> dict[str, float]:
    if samples is None or len(samples) == 0:
        return {"value": float(value)}
    lo, hi = _ci(samples)
    return {"value": float(value), "ci_low": lo, "ci_high": hi}


def _chexpert_counts(preds: list[str], refs: list[str], uncertain: str, labeller=None) -> np.ndarray:
    """(N, 14, 3) per-record true positives, false positives and false negatives per observation. ``labeller``:
    texts -> CheXpert label dicts (default: the rule-based :func:`deepmedix.clinical.label` on each)."""
    out = np.zeros((len(preds), len(clinical.OBSERVATIONS), 3), dtype=np.int64)
    if labeller is None:
        pred_labels, ref_labels = [clinical.label(p) for p in preds], [clinical.label(r) for r in refs]
    else:
        both = labeller(list(preds) + list(refs))
        pred_labels, ref_labels = both[:len(preds)], both[len(preds):]
    for i, (p, r) in enumerate(zip(pred_labels, ref_labels)):
        ps = clinical.positive_set(p, uncertain)
        rs = clinical.positive_set(r, uncertain)
        for j, obs in enumerate(clinical.OBSERVATIONS):
            out[i, j] = (obs in ps and obs in rs, obs in ps and obs not in rs, obs in rs and obs not in ps)
    return out


def _chexpert_f1(counts: np.ndarray, columns: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Micro and macro F1 from summed counts (..., 14, 3), over the given observation columns; macro over the
    observations with reference support."""
    c = counts[..., columns, :]
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        micro_den = 2 * tp.sum(-1) + fp.sum(-1) + fn.sum(-1)
        micro = np.where(micro_den > 0, 2 * tp.sum(-1) / np.maximum(micro_den, 1), 0.0)
        per = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        support = (tp + fn) > 0
        macro = np.where(support.sum(-1) > 0, (per * support).sum(-1) / np.maximum(support.sum(-1), 1), 0.0)
    return micro, macro


def _resampled_sums(counts: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``counts[idx].sum(1)`` without the (rounds, n, ...) array: each round's draw counts times the rows."""
    n = len(counts)
    draws = np.stack([np.bincount(row, minlength=n) for row in idx])
    return (draws @ counts.reshape(n, -1)).reshape((len(idx),) + counts.shape[1:])


def _label_f1s(prefix: str, counts: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    """Micro and macro F1, over the 14 observations and over the 5, from per-record (N, 14, 3) counts."""
    five = [clinical.OBSERVATIONS.index(o) for o in clinical.FIVE]
    out: dict[str, Any] = {}
    for cols, suffix in ((list(range(len(clinical.OBSERVATIONS))), ""), (five, "_5")):
        micro, macro = _chexpert_f1(counts.sum(0), cols)
        bm, bM = _chexpert_f1(_resampled_sums(counts, idx), cols) if len(idx) else (None, None)
        out[f"{prefix}_micro_f1{suffix}"] = _entry(float(micro), bm)
        out[f"{prefix}_macro_f1{suffix}"] = _entry(float(macro), bM)
    return out


def _report_subset(rows: list[dict], idx: np.ndarray, meteor: bool, uncertain: str,
                   extra: dict[int, dict[str, Any]]) -> dict[str, Any]:
    from deepmedix.eval import nlg as rm

    preds = [rm.tokenize(report_text(grounding.parse(r.get("raw_output") or ""))) for r in rows]
    refs = [rm.tokenize(r.get("reference") or "") for r in rows]
    ps = rm.pair_scores(preds, refs, meteor=meteor)
    corpus = ps.corpus()
    out: dict[str, Any] = {}
    bleu_boot = np.array([rm.corpus_bleu(ps.bleu_stats[i].sum(0, keepdims=True)) for i in idx]) if len(idx) else None
    for n in range(4):
        out[f"bleu{n + 1}"] = _entry(corpus[f"bleu{n + 1}"], None if bleu_boot is None else bleu_boot[:, n])
    if ps.meteor is not None:
        seg = ps.meteor
        shift = corpus["meteor"] - float(seg.mean())
        out["meteor"] = _entry(corpus["meteor"], np.clip(seg[idx].mean(1) + shift, 0.0, 1.0) if len(idx) else None)
    out["rouge_l"] = _entry(corpus["rouge_l"], ps.rouge_l[idx].mean(1) if len(idx) else None)
    out["cider"] = _entry(corpus["cider"], ps.cider[idx].mean(1) if len(idx) else None)
    counts = _chexpert_counts([report_text(grounding.parse(r.get("raw_output") or "")) for r in rows],
                              [r.get("reference") or "" for r in rows], uncertain)
    out.update(_label_f1s("chexpert", counts, idx))
    if rows and "chexbert" in extra.get(id(rows[0]), {}):
        out.update(_label_f1s("chexbert", np.stack([extra[id(r)]["chexbert"] for r in rows]), idx))
    if rows and "bertscore" in extra.get(id(rows[0]), {}):
        scores = np.array([extra[id(r)]["bertscore"] for r in rows])  # (n, 3): precision, recall, f1
        for j, key in enumerate(("bertscore_precision", "bertscore_recall", "bertscore_f1")):
            out.update(_mean_subset(key, scores[:, j], idx))
    if rows and "radgraph" in extra.get(id(rows[0]), {}):
        scores = np.array([extra[id(r)]["radgraph"] for r in rows])  # (n, 3): simple, partial, complete
        for j, level in enumerate(("simple", "partial", "complete")):
            out.update(_mean_subset(f"radgraph_f1_{level}", scores[:, j], idx))
    return out


def _model_scores(rows: list[dict], cfg: Any, uncertain: str) -> dict[int, dict[str, Any]]:
    """Per report row (keyed by ``id(row)``), once for all subsets: BERTScore (precision, recall, f1) and CheXbert
    per-observation counts and RadGraph rewards (simple, partial, complete), for the models ``cfg`` (an
    :class:`~deepmedix.config.EvalConfig`) names."""
    from deepmedix.eval import model_based as mm

    reports = [r for r in rows if r.get("task") in REPORT_TASKS]
    out: dict[int, dict[str, Any]] = {id(r): {} for r in reports}
    if cfg is None or not reports:
        return out
    preds = [report_text(grounding.parse(r.get("raw_output") or "")) for r in reports]
    refs = [r.get("reference") or "" for r in reports]
    if getattr(cfg, "bertscore_model", ""):
        bs = mm.bertscore(preds, refs, cfg.bertscore_model, layers=cfg.bertscore_layers, idf=cfg.bertscore_idf)
        for r, p, rc, f in zip(reports, bs["precision"], bs["recall"], bs["f1"]):
            out[id(r)]["bertscore"] = (float(p), float(rc), float(f))
    if getattr(cfg, "radgraph_model", ""):
        from deepmedix.eval.radgraph import radgraph_f1

        rg = radgraph_f1(preds, refs, cfg.radgraph_model, encoder=cfg.radgraph_encoder, model_type=cfg.radgraph_type)
        for r, a, b, c in zip(reports, rg["simple"], rg["partial"], rg["complete"]):
            out[id(r)]["radgraph"] = (float(a), float(b), float(c))
    if getattr(cfg, "chexbert_checkpoint", ""):
        labeller = mm.CheXbert(cfg.chexbert_checkpoint, cfg.chexbert_tokenizer)
        counts = _chexpert_counts(preds, refs, uncertain, labeller.label)
        for r, c in zip(reports, counts):
            out[id(r)]["chexbert"] = c
    return out


def _mean_subset(name: str, values: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    return {name: _entry(float(values.mean()), values[idx].mean(1) if len(idx) else None)}


def _ref_label(row: dict) -> str:
    labels = row.get("ref_labels") or []
    return str(labels[0]) if labels else "all"


def subsets(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each subset: ``source/task`` for reports, ``source/vqa/<question type>`` and ``source/vqa``,
    ``source/grounding/<label>`` and ``source/grounding``; ``all/...`` too where rows come from several sources."""
    groups: dict[str, list[dict]] = {}
    sources = {r.get("source") or "unknown" for r in rows}
    for r in rows:
        task = r.get("task") or "unknown"
        for src in [r.get("source") or "unknown"] + (["all"] if len(sources) > 1 else []):
            groups.setdefault(f"{src}/{task}", []).append(r)
            if task == "vqa" and r.get("question_type"):
                groups.setdefault(f"{src}/vqa/{r['question_type']}", []).append(r)
            if task == "grounding" and r.get("ref_labels"):
                groups.setdefault(f"{src}/grounding/{_ref_label(r)}", []).append(r)
    return dict(sorted(groups.items()))


def evaluate_rows(rows: list[dict], rounds: int = 1000, seed: int = 0, meteor: bool = True,
                  uncertain: str = "positive", models: Any = None) -> dict[str, dict[str, Any]]:
    """``{subset: {"n": N, metric: {"value", "ci_low", "ci_high"}}}`` for prediction rows (the evaluation's
    ``predictions.jsonl`` rows). ``rounds=0`` skips the intervals. ``models``: an
    :class:`~deepmedix.config.EvalConfig` whose ``bertscore_model`` / ``chexbert_checkpoint`` / ``radgraph_model``
    add BERTScore, CheXbert F1 and RadGraph F1 to the report subsets (:mod:`deepmedix.eval.model_based`)."""
    if rounds < 0:
        raise InputError(f"bootstrap rounds must be >= 0, got {rounds}")
    extra = _model_scores(rows, models, uncertain)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, Any]] = {}
    for name, group in subsets(rows).items():
        task = group[0].get("task")
        if task == "grounding":  # as score_predictions: a record without reference boxes has no IoU to score
            group = [r for r in group if r.get("ref_boxes_frame")]
            if not group:
                continue
        n = len(group)
        idx = rng.integers(0, n, size=(rounds, n)) if rounds and n else np.zeros((0, n), dtype=np.int64)
        entry: dict[str, Any] = {"n": n}
        if task in REPORT_TASKS:
            entry.update(_report_subset(group, idx, meteor, uncertain, extra))
        elif task == "vqa":
            ok = np.array([vqa_correct(row_answer(r), r.get("reference") or "") for r in group], dtype=np.float64)
            entry.update(_mean_subset("accuracy", ok, idx))
        elif task == "grounding":
            ious = np.array([row_iou(r) for r in group], dtype=np.float64)
            entry.update(_mean_subset("miou", ious, idx))
            entry.update(_mean_subset("acc@0.5", (ious >= 0.5).astype(np.float64), idx))
        out[name] = entry
    return out


def markdown(result: dict[str, dict[str, Any]]) -> str:
    """One table per subset: metric, value and the 95 % interval."""
    parts = []
    for name, entry in result.items():
        lines = [f"### {name} (n = {entry['n']})", "", "| metric | value | 95 % CI |", "|---|---|---|"]
        for k, v in entry.items():
            if k == "n":
                continue
            ci = f"[{v['ci_low']:.4f}, {v['ci_high']:.4f}]" if "ci_low" in v else "—"
            lines.append(f"| {k} | {v['value']:.4f} | {ci} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_png(result: dict[str, dict[str, Any]], path) -> None:
    """Each subset's headline metric with its interval, as a horizontal error-bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = ("bleu4", "rouge_l", "chexpert_micro_f1", "chexbert_micro_f1", "bertscore_f1", "radgraph_f1_partial",
                "accuracy", "miou")
    rows = [(f"{name}: {k}", v) for name, entry in result.items() for k, v in entry.items() if k in headline]
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.35 * len(rows) + 1)))
    for i, (_label, v) in enumerate(rows):
        lo, hi = v.get("ci_low", v["value"]), v.get("ci_high", v["value"])
        ax.errorbar(v["value"], i, xerr=[[v["value"] - lo], [hi - v["value"]]], fmt="o", capsize=3)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("value (95 % bootstrap interval)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
