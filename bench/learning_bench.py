"""Learning benchmark (``make bench-learning``): does each stage of the recipe learn what it is meant to learn?

One command runs the recipe on a phantom configuration chosen for it (``configs/<stage>/bench.yaml``: curation,
model, SFT, cold start, GRPO, evaluation) — curate -> base model -> stage-1 SFT -> cold start (template traces, SFT)
-> GRPO twice from the cold-start model, once with the ``grounded`` reward and once with the ``paper`` reward —
then evaluates every stage's model on the same held-out test split (``deepmedix`` evaluation, greedy) and prints one
table with bootstrap 95 % intervals (:mod:`deepmedix.eval.learning`):

* VQA accuracy, overall and by question type, against the majority answer of each question type in the train split
  (and, outside the targets, against the train split's majority answer to the same question text: ``text_only``,
  what reading the question alone gets);
* grounding mIoU and Acc@0.5, against a label prior that predicts each label's mean train box;
* format compliance, the paper reward and the grounded reward.

Then the targets, each judged on a 95 % bound over the test records (differences: paired bootstrap over the same
records): SFT beats the majority baseline's VQA accuracy by >= 0.15 and the label prior's mIoU; cold start reaches
>= 0.95 format compliance without losing SFT's VQA accuracy (the intervals overlap, or better); GRPO with the
grounded reward raises test mIoU over the cold-start model and GRPO with the paper reward raises the test paper
reward. A target not met is printed as not met with its numbers; the exit status is 0 either way (1 on an error).

Writes ``--out`` (default ``runs/bench-learning``): every stage's artifact, ``learning.json`` (``table``,
``targets``: ``{"name", "met", "value", "ci_low", "ci_high", ...}``, ``config``, wall times), ``learning.md`` and
``learning.png``. A stage whose artifact is already there is reused when its settings and those of every stage it
starts from are the ones it ran with (``bench-settings.json`` keeps a fingerprint per stage and evaluation); one
whose settings changed is run again, and so is everything downstream of it: ``--set grpo.beta=0.05`` reruns the two
GRPO runs and their evaluations, not the hour before them. ``--fresh`` starts over. ``--set STAGE.KEY=VALUE``
overrides one config key (repeatable). ``--device cuda`` runs the same on a GPU; ``--device cpu`` (the default)
hides any.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("base", "sft", "coldstart", "grpo_grounded", "grpo_paper")
COLUMNS = ("baseline", "text_only") + MODELS
HEADLINE = ("vqa_accuracy", "grounding_miou", "grounding_acc@0.5", "format_compliance", "paper_reward",
            "grounded_reward")


def log(msg: str) -> None:
    print(f"[bench-learning {time.strftime('%H:%M:%S')}] {msg}", flush=True)


STAGES = ("curate", "model", "sft", "coldstart", "grpo", "eval")
SETTINGS = "bench-settings.json"  # each finished stage's and evaluation's settings fingerprint (Ledger)
WALLS = "stage-walls.json"  # each finished stage's and evaluation's wall time, kept for a rerun that reuses them
# The GRPO run with the grounded reward: the grounding prompts (the target is grounding mIoU; a phantom VQA record
# has no boxes for a view or an absent finding, so the reward has nothing to score there), advantages r - group
# mean (Dr. GRPO's scale_rewards none: IoUs that differ by a hair are not blown up to +-1; TRL's grpo_trainer.py
# subtracts the group mean and divides by the std only when scale_rewards != "none") over 8 rollouts at temperature
# 0.5, KL weight 0.01 (as measured; the paper run's is 0.1), 600 steps. The reward is the matched IoU alone (iou
# weight 1, count weight 0), which is the evaluation's mIoU of the record: on these prompts the count term is 1.0
# for nearly every rollout, so it only halved the IoU's weight against the KL term.
# What each setting did is in configs/grpo/bench.yaml; the paper-reward run takes that file as it is. --set grpo.KEY
# wins over these (both runs take it); they are part of the settings a rerun must share.
GROUNDED_RUN = ["tasks=[grounding]", "scale_rewards=none", "temperature=0.5", "num_generations=8", "beta=0.01",
                "grounded_iou_weight=1.0", "grounded_count_weight=0.0", "max_steps=600"]


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """``--set STAGE.KEY=VALUE`` items as each stage's ``KEY=VALUE`` overrides; a bad item exits with its name."""
    out: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in items:
        stage, dot, rest = item.partition(".")
        if not dot or stage not in out or "=" not in rest:
            raise SystemExit(f"bench-learning: --set {item!r}: expected STAGE.KEY=VALUE with STAGE one of "
                             f"{', '.join(STAGES)}")
        out[stage].append(rest)
    return out


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


MADE_BY = {"base": "base_model", "sft": "sft", "coldstart": "coldstart_sft", "grpo_grounded": "grpo (grounded reward)",
           "grpo_paper": "grpo (paper reward)"}
# what each stage and evaluation starts from (the names the stages log under)
DEPENDS = {"curate": (), "base_model": ("curate",), "sft": ("base_model",), "coldstart_synth": ("curate",),
           "coldstart_sft": ("sft", "coldstart_synth"), "grpo (grounded reward)": ("coldstart_sft",),
           "grpo (paper reward)": ("coldstart_sft",),
           **{f"evaluate {m}": (MADE_BY[m], "curate") for m in MODELS}}


def fingerprints(own: dict[str, dict], grounded_run: list[str]) -> dict[str, str]:
    """Each stage's and evaluation's fingerprint from every stage's config (``own``, as a dict) and the grounded
    run's overrides: its own settings and the fingerprints of what it starts from (``DEPENDS``), so a change
    anywhere upstream changes everything below it."""
    own = json.loads(json.dumps(own, default=str))  # as bench-settings.json of an older bench stored them
    settings = {"curate": own["curate"], "base_model": own["model"], "sft": own["sft"],
                "coldstart_synth": own["coldstart"], "coldstart_sft": own["coldstart"],
                "grpo (grounded reward)": [own["grpo"], "grounded", grounded_run],
                "grpo (paper reward)": [own["grpo"], "paper", []], **{f"evaluate {m}": own["eval"] for m in MODELS}}
    fp: dict[str, str] = {}
    for name, deps in DEPENDS.items():  # upstream first
        fp[name] = _fingerprint(settings[name], [fp[d] for d in deps])
    return fp


class Ledger:
    """Which finished stages a rerun may reuse: ``bench-settings.json`` maps each stage to the fingerprint of the
    settings it ran with, written after the stage has published (atomically: a folder that is there is complete).
    A folder with no fingerprint or another one, or one made from a stage that ran again in this run, is stale: it
    is removed and the stage runs again."""

    def __init__(self, out: Path, current: dict[str, str], walls: dict[str, float]):
        self.out, self.current, self.walls = out, current, walls
        self.path = out / SETTINGS
        self.done: dict[str, str] = json.loads(self.path.read_text())["stages"] if self.path.exists() else {}
        self.ran: set[str] = set()

    def run(self, name: str, path: Path, fn):
        """``fn()`` unless ``path`` is there from a run with the same settings; returns its result or None."""
        if path.exists():
            upstream = [d for d in DEPENDS[name] if d in self.ran]
            if self.done.get(name) == self.current[name] and not upstream:
                log(f"{name}: reusing {path}")
                return None
            why = (f"{', '.join(upstream)} ran again" if upstream else "it was made with other settings"
                   if name in self.done else "no record of the settings it was made with")
            log(f"{name}: running it again ({why}; replacing {path})")
            shutil.rmtree(path)
        self.done.pop(name, None)
        self._save()
        t0 = time.time()
        result = fn()
        self.walls[name] = time.time() - t0
        _write(self.out / WALLS, json.dumps(self.walls, indent=2))
        self.done[name] = self.current[name]
        self.ran.add(name)
        self._save()
        return result

    def _save(self) -> None:
        _write(self.path, json.dumps({"stages": self.done}, indent=2, sort_keys=True))


def run_stages(out: Path, size: str, ledger: Ledger, sets: dict[str, list[str]]) -> dict[str, Path]:
    """The recipe, each stage skipped when the ledger says its artifact is current. Returns each model's folder."""
    from deepmedix import stages

    def step(name: str, path: Path, fn) -> None:
        def logged():
            log(f"{name} ...")
            return fn()
        result = ledger.run(name, path, logged)
        if result is not None:
            shown = {k: result.get(k) for k in ("metric", "before", "after", "steps") if k in result}
            log(f"{name}: done in {ledger.walls[name]:.0f} s {shown}")

    data = out / "data"
    models = {m: out / m for m in MODELS}
    step("curate", data, lambda: stages.curate(str(data), size, ["workers=2", *sets["curate"]], log=lambda s: None))
    step("base_model", models["base"], lambda: stages.base_model(str(data), str(models["base"]), size,
                                                                 sets["model"]))
    step("sft", models["sft"], lambda: stages.sft(str(data), str(models["base"]), str(models["sft"]), size,
                                                  sets["sft"]))
    traces = out / "traces"
    step("coldstart_synth", traces, lambda: stages.coldstart_synth(str(data), str(traces), size, sets["coldstart"]))
    step("coldstart_sft", models["coldstart"],
         lambda: stages.coldstart_sft(str(traces), str(models["sft"]), str(models["coldstart"]), size,
                                      sets["coldstart"]))
    for reward, extra in (("grounded", GROUNDED_RUN), ("paper", [])):
        dest = models[f"grpo_{reward}"]
        step(f"grpo ({reward} reward)", dest,
             lambda dest=dest, reward=reward, extra=extra: stages.grpo(str(data), str(models["coldstart"]), str(dest),
                                                                      size, [f"reward={reward}", *extra,
                                                                             *sets["grpo"]]))
    return models


def evaluate_all(out: Path, size: str, models: dict[str, Path], ledger: Ledger,
                 overrides: list[str]) -> dict[str, list[dict]]:
    from deepmedix import stages

    def evaluate(folder: Path, dest: Path) -> dict:
        log(f"evaluate {dest.name} on the test split ...")
        result = stages.evaluate(str(out / "data"), str(folder), str(dest), size, overrides,
                                 progress=lambda done, total: print(f"\r  {done}/{total} records", end="",
                                                                    flush=True))
        print(flush=True)
        return result

    rows = {}
    for name, folder in models.items():
        dest = out / "eval" / name
        ledger.run(f"evaluate {name}", dest, lambda folder=folder, dest=dest: evaluate(folder, dest))
        rows[name] = [json.loads(x) for x in (dest / "predictions.jsonl").read_text().splitlines() if x.strip()]
    return rows


def _cell(e: dict | None) -> str:
    if not e or e.get("n", 0) == 0:
        return "—"
    return f"{e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def markdown(tab: dict, tgts: list[dict], n_test: dict[str, int], wall_s: float, stages_s: float) -> str:
    lines = ["# Learning benchmark (test split, 95 % bootstrap intervals)", "",
             "| metric | n | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for metric, cells in tab.items():
        n = max((e["n"] for e in cells.values()), default=0)
        lines.append(f"| {metric} | {n} | " + " | ".join(_cell(cells.get(c)) for c in COLUMNS) + " |")
    lines += ["", "baseline: the majority answer of each question type (train split) for VQA; each label's mean "
              "train box for grounding. text_only: the majority answer to the same question text (train split; VQA "
              "only, not a target's baseline).", "", "## Targets", "",
              "| target | rule | value [95 % interval] | met |", "|---|---|---|---|"]
    for t in tgts:
        lines.append(f"| {t['name']} | {t['rule']} | {_cell(t)} | {'MET' if t['met'] else 'NOT MET'} |")
    for t in tgts:
        if t.get("terms"):  # overall = 0.9 accuracy + 0.1 format + coordinate
            lines += ["", f"{t['name']}, by term (paired difference, unweighted): "
                      + "; ".join(f"{k} {_cell(e)}" for k, e in t["terms"].items()) + "."]
    lines += ["", f"Test records: {n_test}. Wall time: {wall_s / 60:.1f} min (this run); the stages and evaluations "
              f"took {stages_s / 60:.1f} min when they ran.", ""]
    return "\n".join(lines)


def write_png(tab: dict, tgts: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in HEADLINE if m in tab]
    fig = plt.figure(figsize=(13, 11))
    grid = fig.add_gridspec(3, 3, height_ratios=(1, 1, 0.9))
    axes = [fig.add_subplot(grid[i // 3, i % 3]) for i in range(len(metrics))]
    colours = dict(zip(COLUMNS, ("#888888", "#bcbd22", "#c7c7c7", "#1f77b4", "#2ca02c", "#d62728", "#9467bd")))
    for ax, metric in zip(axes, metrics):
        cols = [c for c in COLUMNS if c in tab[metric]]
        for i, c in enumerate(cols):
            e = tab[metric][c]
            ax.errorbar([i], [e["value"]], yerr=[[e["value"] - e["ci_low"]], [e["ci_high"] - e["value"]]], fmt="o",
                        color=colours[c], capsize=4)
        ax.set_xticks(range(len(cols)), [c.replace("_", "\n") for c in cols], fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    ax = fig.add_subplot(grid[2, 1:])
    for i, t in enumerate(tgts):
        ax.errorbar([t["value"]], [i], xerr=[[t["value"] - t["ci_low"]], [t["ci_high"] - t["value"]]], fmt="o",
                    color="#2ca02c" if t["met"] else "#d62728", capsize=4)
        if t.get("threshold") is not None and t["threshold"] == t["threshold"]:
            ax.plot([t["threshold"]], [i], marker="|", color="black", markersize=14)
    ax.set_yticks(range(len(tgts)), [t["name"].replace("_", " ") for t in tgts], fontsize=8)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_title("targets: value and 95 % interval, | the threshold the rule compares a bound with\n"
                 "(green: met, red: not met)", fontsize=10)
    fig.suptitle("DeepMedix learning benchmark: held-out test split, bootstrap 95 % intervals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_walls(out: Path) -> dict[str, float]:
    """The wall time of each finished stage and evaluation in ``out`` (none yet: empty)."""
    return json.loads((out / WALLS).read_text()) if (out / WALLS).exists() else {}


def _adopt_global_marker(marker: Path) -> bool:
    """A folder from the bench before per-stage fingerprints holds one settings object for the whole run (every
    stage's config and the grounded run's overrides): each finished stage (one with a wall time) gets the
    fingerprint of the settings it ran with. A marker without those settings cannot be read stage by stage (False)."""
    if not marker.exists():
        return True
    old = json.loads(marker.read_text())
    if "stages" in old:
        return True
    if not isinstance(old.get("configs"), dict) or set(old["configs"]) != set(STAGES) or "grounded_run" not in old:
        return False
    ran, walls = fingerprints(old["configs"], old["grounded_run"]), read_walls(marker.parent)
    _write(marker, json.dumps({"stages": {k: v for k, v in ran.items() if k in walls}}, indent=2, sort_keys=True))
    return True


def _write(path: Path, text: str) -> None:
    """Write a result file whole or not at all (a temporary file beside it, then renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from deepmedix.errors import DeepMedixError

    try:
        return run(argv)
    except DeepMedixError as exc:  # a bad config, --set value or input: its message names it
        print(f"bench-learning: {exc}", file=sys.stderr)
        return 1


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench-learning", help="output folder (default runs/bench-learning)")
    ap.add_argument("--config", default="bench", help="config size: configs/<stage>/<size>.yaml (default bench)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--rounds", type=int, default=2000, help="bootstrap resamples (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="remove --out first (default: reuse finished stages)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override one config key of one stage (curate, model, sft, coldstart, grpo, eval); "
                         "repeatable, e.g. --set sft.max_steps=500")
    args = ap.parse_args(argv)
    sets = parse_sets(args.sets)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the stages pick cuda when they see one
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-learning: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 1
    from deepmedix.config import load_config
    from deepmedix.data.schema import load_records
    from deepmedix.eval import learning

    # every stage's config now: a missing or bad one fails before any work
    cfgs = {stage: load_config(stage, args.config, sets[stage]) for stage in STAGES}
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {k: v.__dict__ for k, v in cfgs.items()}
    # finished stages are reused only under the settings they ran with (and those of every stage upstream)
    current = fingerprints(configs, GROUNDED_RUN)
    if not _adopt_global_marker(out / SETTINGS):
        print(f"bench-learning: {out} holds a run whose settings file cannot be read stage by stage "
              f"({out / SETTINGS}); pass --fresh to start over there, or another --out", file=sys.stderr)
        return 2
    t0 = time.time()
    # a stage a rerun reuses keeps the wall time it took when it ran
    ledger = Ledger(out, current, read_walls(out))
    models = run_stages(out, args.config, ledger, sets)
    rows = evaluate_all(out, args.config, models, ledger, sets["eval"])
    values = {name: learning.record_values(r) for name, r in rows.items()}
    ids = {tuple(sorted(r["record_id"] for r in rs)) for rs in rows.values()}
    if len(ids) != 1:
        print("bench-learning: the models were evaluated on different test records", file=sys.stderr)
        return 1
    train = load_records(out / "data", "train")
    values["baseline"] = learning.baseline_values(rows["sft"], train)
    values["text_only"] = learning.text_only_values(rows["sft"], train)
    tab = learning.table({c: values[c] for c in COLUMNS}, args.rounds, args.seed)
    tgts = learning.targets(values, args.rounds, args.seed)
    n_test = {}
    for r in rows["sft"]:
        n_test[r["task"]] = n_test.get(r["task"], 0) + 1
    wall = time.time() - t0
    result = {"table": tab, "targets": tgts, "n_test": n_test, "wall_s": wall, "stage_wall_s": ledger.walls,
              "device": args.device, "rounds": args.rounds, "config_size": args.config, "sets": args.sets,
              "config": configs, "grounded_run": GROUNDED_RUN}
    _write(out / "learning.json", json.dumps(result, indent=2, default=str))
    md = markdown(tab, tgts, n_test, wall, sum(ledger.walls.values()))
    _write(out / "learning.md", md)
    write_png(tab, tgts, out / "learning.tmp.png")
    os.replace(out / "learning.tmp.png", out / "learning.png")
    print(md)
    met = sum(t["met"] for t in tgts)
    print(f"{met} of {len(tgts)} targets met. Wrote {out / 'learning.json'}, {out / 'learning.md'}, "
          f"{out / 'learning.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
