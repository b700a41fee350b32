"""The Report Arena: LLM judges compare several models' answers on the same records, two at a time.

Inputs are evaluation prediction files (``predictions.jsonl`` as ``deepmedix eval run`` writes it, or that run's
output folder), one per model, joined by record id. For every record that all models answered (the configured
tasks; a seeded sample of ``max_records``), every unordered model pair goes to every judge twice, A/B swapped.
The judge sees the question, the reference and the two final (boxed) answers, optionally with their reasoning,
as "Answer A" and "Answer B" (never the model names), and replies ``{"verdict": "A" | "B" | "tie", "reason":
"..."}``.

- A reply without such an object (it may sit in a code fence or among other text) is answered with a correction
  and asked again, up to ``malformed_retries`` times; then the judgment is ``failed`` and its raw reply kept.
  HTTP failures are retried by the shared LLM client (:mod:`deepmedix.llm.client`: timeouts, connection errors,
  429 after the server's Retry-After, 5xx; backoff with jitter), then the judgment is ``failed``. Failures never stop
  the run; a refused request (401/403/404) and an endpoint that cannot be reached at all do, naming the judge.
- A pair's outcome for one judge needs both orders: the same verdict on the models in both → that verdict; any
  disagreement → a tie (counted as inconsistent); a failed order → incomplete, left out of the ratings. Answers
  identical as shown are a tie without asking; identical prompts to one judge share one verdict.
- Replies are cached on disk outside the output folder (the LLM client's reply cache, keyed by endpoint, judge
  model, messages, temperature and max tokens; ``cache``, default ``$DEEPMEDIX_CACHE/arena``): a rerun, or a run
  after a kill, asks only for what is missing. HTTP failures are not cached; malformed replies are, so a rerun
  replays them.
- Ratings: Bradley–Terry log-strengths fitted by maximum likelihood, a tie counting half a win for each side,
  with ``prior_ties`` virtual ties between every model pair (finite ratings when one model wins every game); shown
  on an Elo-like scale, ``elo_anchor + elo_scale * log10(odds)``, with the mean (or ``anchor_model``) at
  ``elo_anchor``. 95 % intervals: percentile bootstrap over records (a record's games move together), seeded.

The judging is in :mod:`deepmedix.eval.arena_judging`, the ratings and reports in
:mod:`deepmedix.eval.arena_ratings`. Output folder: ``arena.json``, ``judgments.jsonl``, ``leaderboard.md``,
``leaderboard.png``, ``lineage.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import ArenaConfig, ConfigError
from deepmedix.errors import InputError
from deepmedix.eval.arena_judging import Judge, judge_all
from deepmedix.eval.arena_ratings import leaderboard, markdown, outcomes, plot, ratings, win_rates
from deepmedix.eval.predictions import read_predictions
from deepmedix.llm.client import redact_url

Progress = Callable[[int, int], None]

ORDERS = ("AB", "BA")  # AB: the pair's first model is Answer A; BA: swapped
JUDGE_KEYS = ("name", "model", "base_url", "api_key_env")
NO_ANSWER = "(no final answer)"

# ---------------------------------------------------------------- config and inputs

def check_config(cfg: ArenaConfig) -> list[Judge]:
    """The judges, and the config's values checked; a bad one is a ConfigError naming its key."""
    if not cfg.judges:
        raise ConfigError("arena config: key 'judges' needs at least one judge (model, base_url, api_key_env)")
    judges: list[Judge] = []
    for i, j in enumerate(cfg.judges):
        where = f"judges[{i}]"
        unknown = sorted(set(j) - set(JUDGE_KEYS))
        if unknown:
            raise ConfigError(f"arena config: {where}: unknown key(s) {unknown}; known: {', '.join(JUDGE_KEYS)}")
        if not j.get("model"):
            raise ConfigError(f"arena config: {where}.model is required (the judge model the endpoint serves)")
        base_url = j.get("base_url") or os.environ.get("OPENAI_BASE_URL", "")
        if not base_url:
            raise ConfigError(f"arena config: {where}.base_url is empty and the env var OPENAI_BASE_URL is not set")
        key_env = j.get("api_key_env") or "OPENAI_API_KEY"
        if not os.environ.get(key_env):
            raise ConfigError(f"arena config: {where} reads its API key from the env var {key_env} "
                              f"({where}.api_key_env), which is not set")
        judges.append(Judge(j.get("name") or j["model"], j["model"], base_url, key_env, where))
    names = [j.name for j in judges]
    for j in judges:
        if names.count(j.name) > 1:
            raise ConfigError(f"arena config: {j.where}: the judge name {j.name!r} is used twice; give each its "
                              f"own 'name'")
    checks = {"tasks": (bool(cfg.tasks), "a non-empty list"), "max_records": (cfg.max_records >= 0, ">= 0"),
              "concurrency": (cfg.concurrency >= 1, ">= 1"), "max_retries": (cfg.max_retries >= 0, ">= 0"),
              "malformed_retries": (cfg.malformed_retries >= 0, ">= 0"), "timeout_s": (cfg.timeout_s > 0, "> 0"),
              "backoff_s": (cfg.backoff_s >= 0, ">= 0"), "max_tokens": (cfg.max_tokens >= 1, ">= 1"),
              "bootstrap_rounds": (cfg.bootstrap_rounds >= 0, ">= 0"), "prior_ties": (cfg.prior_ties >= 0, ">= 0"),
              "elo_scale": (cfg.elo_scale > 0, "> 0")}
    for key, (ok, rule) in checks.items():
        if not ok:
            raise ConfigError(f"arena config: key '{key}' must be {rule}, got {getattr(cfg, key)!r}")
    return judges


def select_records(cfg: ArenaConfig, preds: dict[str, dict[str, dict]]) -> list[str]:
    """Ids of the records every model answered, in the configured tasks (a seeded sample of max_records)."""
    models = list(preds)
    first = preds[models[0]]
    common = sorted(rid for rid, row in first.items()
                    if row["task"] in cfg.tasks and all(rid in preds[m] for m in models[1:]))
    if not common:
        sizes = ", ".join(f"{m}: {len(rows)}" for m, rows in preds.items())
        raise InputError(f"arena: no record of tasks {cfg.tasks} was answered by every model ({sizes} records)")
    for rid in common:
        for m in models[1:]:
            if preds[m][rid]["reference"] != first[rid]["reference"]:
                raise InputError(f"arena: record {rid!r} has another reference in {m}'s predictions than in "
                                 f"{models[0]}'s: were they evaluated on the same data?")
    if cfg.max_records and len(common) > cfg.max_records:
        common = sorted(random.Random(cfg.seed).sample(common, cfg.max_records))
    return common


# ---------------------------------------------------------------- the stage

def public_config(cfg: ArenaConfig) -> dict[str, Any]:
    """The config for reports and lineage: judge URLs without credentials."""
    d = dataclasses.asdict(cfg)
    d["judges"] = [{**j, **({"base_url": redact_url(j["base_url"])} if j.get("base_url") else {})}
                   for j in cfg.judges]
    return d


def run_arena(cfg: ArenaConfig, predictions: dict[str, str], out: str, progress: Progress | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Judge the models' predictions (model name -> predictions file or evaluation output) pairwise and write the
    leaderboard to ``out`` (a folder or s3:// URI, written atomically). Returns the stage's metrics."""
    t0 = time.time()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    judges = check_config(cfg)
    models = list(predictions)
    if len(models) < 2 or not all(models):
        raise InputError(f"arena: needs at least two models with non-empty names, got {models}")
    if cfg.anchor_model and cfg.anchor_model not in predictions:
        raise ConfigError(f"arena config: key 'anchor_model' is {cfg.anchor_model!r}, not one of the models "
                          f"{models}")
    preds = {m: read_predictions(uri) for m, uri in predictions.items()}
    records = select_records(cfg, preds)
    judgments, stats = judge_all(cfg, judges, models, preds, records, progress, log)
    games, counts, per_judge = outcomes(judgments, models, judges)
    elo, ci = ratings(games, models, cfg)
    counts = {"judgments": len(judgments), "identical": sum(r["status"] == "identical" for r in judgments),
              **counts, **stats}
    anchor = f"{cfg.anchor_model} at {cfg.elo_anchor:g}" if cfg.anchor_model else f"mean {cfg.elo_anchor:g}"
    report = {
        "models": models, "records": len(records), "tasks": cfg.tasks,
        "judges": [{"name": j.name, "model": j.model, "endpoint": j.endpoint} for j in judges],
        "leaderboard": leaderboard(games, models, elo, ci),
        "win_rate": {"models": models, "matrix": win_rates(games, len(models))},
        "counts": counts, "per_judge": per_judge,
        "failed_examples": [{k: r.get(k) for k in ("record_id", "judge", "order", "error", "raw")}
                            for r in judgments if r["status"] == "failed"][:5],
        "scale": {"elo_scale": cfg.elo_scale, "elo_anchor": cfg.elo_anchor, "anchor": anchor,
                  "prior_ties": cfg.prior_ties, "bootstrap_rounds": cfg.bootstrap_rounds, "resampled": "records",
                  "ties": "half a win each"},
        "config": public_config(cfg),
        "predictions": predictions,
    }
    with store.atomic_dir(out) as folder:
        with (folder / "judgments.jsonl").open("w") as f:
            for r in judgments:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (folder / "leaderboard.md").write_text(markdown(report))
        plot(report, folder / "leaderboard.png")
        report["wall_s"] = round(time.time() - t0, 2)
        (folder / "arena.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        store.write_lineage(folder, "arena", public_config(cfg), inputs=predictions,
                            extra={"leaderboard": report["leaderboard"], "counts": counts})
    top = report["leaderboard"][0]
    log(f"arena: {top['model']} leads with {top['rating']:.0f} ({counts['games']} games, {counts['failed']} failed "
        f"judgments, {counts['requests']} requests, {counts['cache_hits']} from cache)")
    return {"stage": "arena", "metric": "leader_rating", "before": None, "after": top["rating"],
            "leader": top["model"], "leaderboard": report["leaderboard"], "counts": counts,
            "wall_s": time.time() - t0}
