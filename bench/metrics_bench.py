"""Report-metrics benchmark: :mod:`deepmedix.eval.nlg` against pycocoevalcap 1.2 on the same synthetic
report pairs, timed in the same run.

Pairs (``--pairs``, default 4,547): phantom chest X-ray reports (:mod:`deepmedix.data.phantom_text`), each a FINDINGS
paragraph padded with common report sentences to 40-80 words and an IMPRESSION of 10-20 words. The prediction for a
study is the report re-written: the same findings re-phrased, sometimes one missed, one added or a severity
changed, part of the other sentences kept, a few verbatim copies. Both sides are lower-cased and space-tokenised with
:func:`~deepmedix.eval.nlg.tokenize` (the bench checks that pycocoevalcap's PTBTokenizer gives the same).

Timed each round, interleaved (coco, then ours), medians over ``--rounds``:

* coco, scorers only (the strict baseline): ``Bleu(4)``, ``Meteor()`` (constructed inside the timing: its JVM start
  and paraphrase-table load are part of every use), ``Rouge()``, ``Cider()`` on the tokenised text;
* coco + PTBTokenizer (the usual pipeline): ``PTBTokenizer().tokenize`` on the raw texts plus the scorers' time of
  the same round (the scorers' input is then the same text, so their time is too);
* ours: ``corpus_scores`` on the tokenised text; ours + tokenize: :func:`tokenize` of the raw texts plus that;
* for information: ours without METEOR against coco's BLEU + ROUGE-L + CIDEr, and CPU seconds (process + children).

Untimed first: the jar and paraphrase-table files are read once (the same warm page cache for both), and ours runs
on a few pairs, which builds its one-off paraphrase index on a first use on this machine (the time is reported).

Values must agree (BLEU, ROUGE-L, CIDEr to 1e-9; METEOR to 0.005) or the script exits 1. Goal (issue): ours >= 5x
faster than coco's scorers. Prints a table and writes ``metrics_bench.json`` and ``metrics_bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deepmedix.data import phantom_text as pt  # noqa: E402
from deepmedix.eval import meteor  # noqa: E402
from deepmedix.eval import nlg as RM  # noqa: E402

GOAL = 5.0
TOL = {"bleu1": 1e-9, "bleu2": 1e-9, "bleu3": 1e-9, "bleu4": 1e-9, "meteor": 0.005, "rouge_l": 1e-9, "cider": 1e-9}

FINDINGS_EXTRA = (
    "The mediastinal and hilar contours are within normal limits.", "There is no evidence of pulmonary edema.",
    "The pulmonary vasculature is not engorged.", "Lung volumes are low, with bronchovascular crowding.",
    "A right internal jugular central venous catheter terminates in the mid SVC.",
    "An endotracheal tube terminates 4.5 cm above the carina.",
    "A nasogastric tube courses below the diaphragm, with its tip in the stomach.",
    "Degenerative changes are noted in the thoracic spine.", "The visualized upper abdomen is unremarkable.",
    "Compared to the prior study, there is no significant interval change.", "The trachea is midline.",
    "Sternotomy wires and mediastinal clips are intact.", "There is mild tortuosity of the thoracic aorta.",
    "Calcification of the aortic knob is noted.", "No free air is seen under the diaphragm.",
    "There are healed fractures of the left lateral ribs.", "Surgical clips are seen in the right upper quadrant.",
    "A left-sided pacemaker is seen with leads terminating in the right atrium and right ventricle.",
)
IMPRESSION_EXTRA = (
    "Recommend follow-up chest radiograph in 6 weeks.", "Findings were discussed with the referring physician.",
    "Stable appearance compared to the prior study.", "Lines and tubes in standard position.",
    "Clinical correlation is recommended.", "No evidence of pneumonia.", "No acute cardiopulmonary process.",
)


# ------------------------------------------------------------------------------------------- the pairs

def _pad(rng: np.random.Generator, text: str, pool: tuple[str, ...], lo: int, hi: int,
         keep: list[str] | None = None) -> tuple[str, list[str]]:
    """``text`` plus sentences from ``pool`` (first those in ``keep``) until it has a drawn 'lo..hi' word count."""
    target = int(rng.integers(lo, hi + 1))
    order = list(keep or []) + [pool[i] for i in rng.permutation(len(pool)) if pool[i] not in (keep or [])]
    added = []
    for s in order:
        if len(text.split()) >= target:
            break
        added.append(s)
        text = f"{text} {s}"
    return text, added


def _pair(seed: int, i: int) -> tuple[str, str, int, int]:
    """(raw prediction, raw reference, findings words, impression words) of study ``i``."""
    rng = np.random.default_rng([seed, i])
    labels = [f for f in pt.FINDINGS if rng.random() < 0.18]
    specs = pt.plan_findings(rng, labels)
    view = "AP" if rng.random() < 0.3 else "PA"
    findings, f_extra = _pad(rng, pt.findings_text(rng, specs, view), FINDINGS_EXTRA, 40, 80)
    impression, i_extra = _pad(rng, pt.impression_text(rng, specs), IMPRESSION_EXTRA, 10, 20)
    reference = f"{findings} {impression}"
    if rng.random() < 0.04:  # a verbatim copy
        return reference, reference, len(findings.split()), len(impression.split())

    p_specs = list(specs)
    if p_specs and rng.random() < 0.2:  # a missed finding
        p_specs.pop(int(rng.integers(len(p_specs))))
    if rng.random() < 0.15:  # a false finding
        extra = [f for f in pt.FINDINGS if f not in {s.label for s in p_specs}]
        p_specs = pt.plan_findings(rng, [s.label for s in p_specs] + [extra[int(rng.integers(len(extra)))]])
    if p_specs and rng.random() < 0.2:  # a wrong severity
        j = int(rng.integers(len(p_specs)))
        p_specs[j] = pt.FindingSpec(p_specs[j].label, pt.SEVERITIES[int(rng.integers(3))], p_specs[j].side,
                                    p_specs[j].zone)
    kept = [s for s in f_extra if rng.random() < 0.7]
    p_findings, _ = _pad(rng, pt.findings_text(rng, p_specs, view), FINDINGS_EXTRA, 30, 80, kept)
    p_impression, _ = _pad(rng, pt.impression_text(rng, p_specs), IMPRESSION_EXTRA, 5, 20,
                           [s for s in i_extra if rng.random() < 0.7])
    return f"{p_findings} {p_impression}", reference, len(findings.split()), len(impression.split())


def make_pairs(n: int, seed: int = 0) -> dict:
    rows = [_pair(seed, i) for i in range(n)]
    return {"raw_pred": [r[0] for r in rows], "raw_ref": [r[1] for r in rows],
            "findings_words": float(np.mean([r[2] for r in rows])),
            "impression_words": float(np.mean([r[3] for r in rows]))}


# ------------------------------------------------------------------------------------------- the runs

def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_coco(preds: list[str], refs: list[str]) -> dict:
    """pycocoevalcap's four scorers, each timed; a fresh Meteor() (JVM) as every COCOEvalCap.evaluate() makes."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = {i: [r] for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)}
    secs, values = {}, {}
    cpu0, t0 = _cpu(), time.perf_counter()
    t = time.perf_counter()
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    secs["bleu"] = time.perf_counter() - t
    values.update({f"bleu{k + 1}": float(b) for k, b in enumerate(bleu)})
    t = time.perf_counter()
    meteor = Meteor()
    values["meteor"] = float(meteor.compute_score(gts, res)[0])
    del meteor  # its __del__ stops the JVM
    secs["meteor"] = time.perf_counter() - t
    t = time.perf_counter()
    values["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    secs["rouge_l"] = time.perf_counter() - t
    t = time.perf_counter()
    values["cider"] = float(Cider().compute_score(gts, res)[0])
    secs["cider"] = time.perf_counter() - t
    return {"s": time.perf_counter() - t0, "cpu_s": _cpu() - cpu0, "per_scorer_s": secs, "values": values}


def run_ptb(raw_preds: list[str], raw_refs: list[str]) -> tuple[float, list[str], list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    n = len(raw_preds)
    caps = {i: [{"caption": t}] for i, t in enumerate(raw_preds + raw_refs)}
    t = time.perf_counter()
    out = PTBTokenizer().tokenize(caps)
    secs = time.perf_counter() - t
    return secs, [out[i][0] for i in range(n)], [out[n + i][0] for i in range(n)]


def run_ours(preds: list[str], refs: list[str], meteor: bool = True) -> dict:
    cpu0, t = _cpu(), time.perf_counter()
    values = RM.corpus_scores(preds, refs, meteor=meteor)
    return {"s": time.perf_counter() - t, "cpu_s": _cpu() - cpu0, "values": values}


def _java_version() -> str:
    r = subprocess.run(["java", "-version"], capture_output=True, text=True)
    return (r.stderr or r.stdout).splitlines()[0] if r.returncode == 0 else "?"


# ------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4547)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats (medians used)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "metrics"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = make_pairs(args.pairs, args.seed)
    t = time.perf_counter()
    preds = [RM.tokenize(s) for s in data["raw_pred"]]
    refs = [RM.tokenize(s) for s in data["raw_ref"]]
    tokenize_s = time.perf_counter() - t
    words = [len(s.split()) for s in refs]
    print(f"{args.pairs} pairs: reference report {np.mean(words):.0f} words on average (findings "
          f"{data['findings_words']:.0f}, impression {data['impression_words']:.0f}); {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    jar_dir = Path(importlib.util.find_spec("pycocoevalcap.meteor.meteor").origin).parent
    for f in (jar_dir / "meteor-1.5.jar", jar_dir / "data" / "paraphrase-en.gz"):
        f.read_bytes()  # the same warm page cache for both
    t = time.perf_counter()
    RM.corpus_scores(preds[:20], refs[:20], meteor_jobs=1)  # builds the paraphrase index on a first use
    warmup_s = time.perf_counter() - t

    coco, ptb, ours, ours_nm, tok = [], [], [], [], []
    for r in range(args.rounds):  # interleaved, so that drift in machine speed hits both alike
        print(f"round {r + 1}/{args.rounds}: pycocoevalcap ...", flush=True)
        coco.append(run_coco(preds, refs))
        ptb_s, ptb_preds, ptb_refs = run_ptb(data["raw_pred"], data["raw_ref"])
        ptb.append(ptb_s)
        print(f"round {r + 1}/{args.rounds}: ours ...", flush=True)
        ours.append(run_ours(preds, refs))
        ours_nm.append(run_ours(preds, refs, meteor=False))
        t = time.perf_counter()
        for text in data["raw_pred"] + data["raw_ref"]:
            RM.tokenize(text)
        tok.append(time.perf_counter() - t)
    ptb_same = float(np.mean([a == b for a, b in zip(ptb_preds + ptb_refs, preds + refs)]))

    med = statistics.median
    coco_s, ours_s = med(x["s"] for x in coco), med(x["s"] for x in ours)
    coco_ptb_s = med(x["s"] + p for x, p in zip(coco, ptb))
    ours_tok_s = med(x["s"] + k for x, k in zip(ours, tok))
    per_scorer = {k: med(x["per_scorer_s"][k] for x in coco) for k in coco[0]["per_scorer_s"]}
    coco_brc = med(x["per_scorer_s"]["bleu"] + x["per_scorer_s"]["rouge_l"] + x["per_scorer_s"]["cider"]
                   for x in coco)
    ours_nm_s = med(x["s"] for x in ours_nm)
    diffs = {k: max(abs(o["values"][k] - c["values"][k]) for o, c in zip(ours, coco)) for k in RM.KEYS}
    same = all(diffs[k] <= TOL[k] for k in RM.KEYS)
    ratio = coco_s / ours_s
    res = {
        "pairs": args.pairs, "rounds": args.rounds, "seed": args.seed, "cpu_count": os.cpu_count(),
        "load_average_end": os.getloadavg()[0], "java": _java_version(),
        "meteor_jobs": min(os.cpu_count() or 1, math.ceil(args.pairs / meteor.SEGMENTS_PER_JVM)),
        "words": {"report": float(np.mean(words)), "findings": data["findings_words"],
                  "impression": data["impression_words"]},
        "coco": {"s": coco_s, "runs_s": [x["s"] for x in coco], "per_scorer_s": per_scorer,
                 "cpu_s": med(x["cpu_s"] for x in coco), "values": coco[-1]["values"]},
        "coco_ptb": {"s": coco_ptb_s, "ptb_runs_s": ptb, "ptb_equals_tokenize": ptb_same},
        "ours": {"s": ours_s, "runs_s": [x["s"] for x in ours], "cpu_s": med(x["cpu_s"] for x in ours),
                 "values": ours[-1]["values"]},
        "ours_tokenize": {"s": ours_tok_s, "tokenize_runs_s": tok},
        "no_meteor": {"ours_s": ours_nm_s, "coco_s": coco_brc, "ratio": coco_brc / ours_nm_s},
        "warmup_s": warmup_s, "tokenize_first_s": tokenize_s,
        "values": {"max_abs_diff": diffs, "tolerance": TOL, "same": same},
        "goal": {"target": GOAL, "ratio": ratio, "met": ratio >= GOAL,
                 "ratio_with_tokenizers": coco_ptb_s / ours_tok_s},
    }

    def row(name: str, secs: float, cpu: float | None, speedup: float | None, note: str = "") -> None:
        print(f"  {name:<32}{secs:9.2f}{'' if cpu is None else f'{cpu:9.1f}':>9}"
              f"{'' if speedup is None else f'{speedup:9.2f}x':>11}   {note}".rstrip())

    print()
    print(f"report metrics, {args.pairs} pairs, median of {args.rounds} round(s); {os.cpu_count()} CPUs; "
          f"METEOR on {res['meteor_jobs']} JVM(s)")
    print(f"  {'':<32}{'seconds':>9}{'CPU s':>9}{'speed-up':>11}")
    row("pycocoevalcap, scorers only", coco_s, res["coco"]["cpu_s"], 1.0,
        "(" + ", ".join(f"{k} {v:.2f}" for k, v in per_scorer.items()) + ")")
    row("ours, corpus_scores", ours_s, res["ours"]["cpu_s"], ratio)
    row("pycocoevalcap + PTBTokenizer", coco_ptb_s, None, None)
    row("ours + tokenize", ours_tok_s, None, coco_ptb_s / ours_tok_s, "(against pycocoevalcap + PTBTokenizer)")
    row("BLEU+ROUGE-L+CIDEr: pycocoeval.", coco_brc, None, 1.0)
    row("BLEU+ROUGE-L+CIDEr: ours", ours_nm_s, None, coco_brc / ours_nm_s)
    print("  values (ours): " + ", ".join(f"{k} {ours[-1]['values'][k]:.4f}" for k in RM.KEYS))
    print("  max |ours - pycocoevalcap|: " + ", ".join(f"{k} {diffs[k]:.1e}" for k in RM.KEYS)
          + f" -> {'SAME' if same else 'DIFFERENT'}")
    print(f"  PTBTokenizer output equals tokenize() on {ptb_same:.1%} of the texts; warm-up {warmup_s:.1f} s")
    print(f"  goal: ours >= {GOAL:.0f}x faster than pycocoevalcap's scorers: {ratio:.2f}x "
          f"{'PASS' if ratio >= GOAL else 'NOT MET'}")
    (out / "metrics_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    _plot(res, out / "metrics_bench.png")
    print(f"  wrote {out / 'metrics_bench.json'} and {out / 'metrics_bench.png'}")
    return 0 if same else 1


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    names = ["coco scorers", "coco + PTB", "ours", "ours + tokenize"]
    vals = [res["coco"]["s"], res["coco_ptb"]["s"], res["ours"]["s"], res["ours_tokenize"]["s"]]
    bars = a.bar(names, vals, color=["#999", "#bbb", "#2a7", "#185"])
    for bar, v in zip(bars, vals):
        a.annotate(f"{v:.1f} s\n{vals[0] / v:.1f}x", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                   va="bottom", fontsize=8)
    a.set_ylabel("seconds (median)")
    a.set_title(f"{res['pairs']} report pairs, all seven metrics (goal >= {res['goal']['target']:.0f}x)")
    per = res["coco"]["per_scorer_s"]
    b.bar(list(per), list(per.values()), color="#999", label="pycocoevalcap")
    b.bar(["ours: BLEU+ROUGE+CIDEr"], [res["no_meteor"]["ours_s"]], color="#2a7", label="ours")
    b.set_ylabel("seconds (median)")
    b.set_title("pycocoevalcap per scorer")
    b.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
