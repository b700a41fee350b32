"""The Report Arena: LLM judges compare several models' answers on the same records, two at a time.

Inputs are evaluation prediction files (``predictions.jsonl`` as ``deepmedix eval run`` writes it, or that run's
output folder), one per model, joined by record id. For every record that all models answered (the configured
tasks; a seeded sample of ``max_records``), every unordered model pair goes to every judge twice, A/B swapped.
The judge sees the question, the reference and the two final (boxed) answers, optionally with their reasoning,
as "Answer A" and "Answer B" (never the model names), and replies ``{"verdict": "A" | "B" | "tie", "reason":
"..."}``.

- A reply without such an object (it may sit in a code fence or among other text) is answered with a correction
  and asked again, up to ``malformed_retries`` times; then the judgment is ``failed`` and its raw reply kept.
  HTTP failures are retried by the cold-start teacher's client (timeouts, connection errors, 429 after the
  server's Retry-After, 5xx; backoff with jitter), then the judgment is ``failed``. Failures never stop the run;
  a refused request (401/403/404) and an endpoint that cannot be reached at all do, naming the judge.
- A pair's outcome for one judge needs both orders: the same verdict on the models in both → that verdict; any
  disagreement → a tie (counted as inconsistent); a failed order → incomplete, left out of the ratings. Answers
  identical as shown are a tie without asking; identical prompts to one judge share one verdict.
- Replies are cached on disk outside the output folder (the teacher's response cache, keyed by endpoint, judge
  model, messages, temperature and max tokens; ``cache``, default ``$DEEPMEDIX_CACHE/arena``): a rerun, or a run
  after a kill, asks only for what is missing. HTTP failures are not cached; malformed replies are, so a rerun
  replays them.
- Ratings: Bradley–Terry log-strengths fitted by maximum likelihood, a tie counting half a win for each side,
  with ``prior_ties`` virtual ties between every model pair (finite ratings when one model wins every game); shown
  on an Elo-like scale, ``elo_anchor + elo_scale * log10(odds)``, with the mean (or ``anchor_model``) at
  ``elo_anchor``. 95 % intervals: percentile bootstrap over records (a record's games move together), seeded.

Output folder: ``arena.json``, ``judgments.jsonl``, ``leaderboard.md``, ``leaderboard.png``, ``lineage.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepmedix import store
from deepmedix.config import ArenaConfig, ColdStartConfig, ConfigError
from deepmedix.eval.predictions import read_predictions
from deepmedix.grounding import THINK_RE
from deepmedix.train.teacher import OpenAITeacher, cache_key, redact_url

Progress = Callable[[int, int], None]

ORDERS = ("AB", "BA")  # AB: the pair's first model is Answer A; BA: swapped
JUDGE_KEYS = ("name", "model", "base_url", "api_key_env")
NO_ANSWER = "(no final answer)"

SYSTEM_PROMPT = (
    "You are an experienced radiologist who grades answers written by AI systems about chest X-rays. You receive "
    "a question about one study, the reference written by the reading radiologist, and two candidate answers, "
    "Answer A and Answer B. Decide which candidate agrees better with the reference. What counts is clinical "
    "content: the findings present and absent, their location and severity, and the overall impression. A "
    "finding the reference does not support, or one it reports that is missing, makes a candidate worse. "
    "Wording, style and length do not count, and neither does the order in which the candidates are shown. When "
    "they are equally good or equally bad, the verdict is a tie.\n"
    "Reply with only a JSON object and nothing else (no markdown): "
    '{"verdict": "A" | "B" | "tie", "reason": "<one sentence>"}'
)
CORRECTION = ('Your reply could not be used: {problem}. Reply again with only the JSON object '
              '{{"verdict": "A" | "B" | "tie", "reason": "<one sentence>"}}.')


class JudgeUnavailable(ValueError):
    """A judge endpoint refused the request (401/403/404) or could not be reached: the run stops."""


@dataclass(frozen=True)
class Judge:
    name: str
    model: str
    base_url: str
    api_key_env: str
    where: str  # the config key, e.g. judges[0]

    @property
    def endpoint(self) -> str:
        return redact_url(self.base_url)


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
        raise ValueError(f"arena: no record of tasks {cfg.tasks} was answered by every model ({sizes} records)")
    for rid in common:
        for m in models[1:]:
            if preds[m][rid]["reference"] != first[rid]["reference"]:
                raise ValueError(f"arena: record {rid!r} has another reference in {m}'s predictions than in "
                                 f"{models[0]}'s: were they evaluated on the same data?")
    if cfg.max_records and len(common) > cfg.max_records:
        common = sorted(random.Random(cfg.seed).sample(common, cfg.max_records))
    return common


# ---------------------------------------------------------------- the prompt and the verdict

def shown_answer(row: dict[str, Any], include_reasoning: bool) -> str:
    """What the judge reads of one model's answer: the boxed answer (for a report without one, the output with
    its reasoning block removed, as the metrics score it), optionally after the reasoning."""
    answer = (row.get("answer") or "").strip()
    if not answer and str(row.get("task") or "").startswith("report_"):
        answer = THINK_RE.sub("", row.get("raw_output") or "").strip()
    answer = answer or NO_ANSWER
    if not include_reasoning:
        return answer
    m = THINK_RE.search(row.get("raw_output") or "")
    reasoning = m.group(1).strip() if m and m.group(1).strip() else "(none)"
    return f"Reasoning: {reasoning}\nFinal answer: {answer}"


def build_messages(task: str, question: str, reference: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The judge's system and user messages for one ordered pair (anonymous: no model names)."""
    title = "Reference report" if task.startswith("report_") else "Reference answer"
    user = (f"### Question\n{question.strip()}\n\n### {title}\n{reference.strip()}\n\n"
            f"### Answer A\n{answer_a}\n\n### Answer B\n{answer_b}\n\n"
            "### Task\nWhich answer agrees better with the reference? Reply with only the JSON object "
            '{"verdict": "A" | "B" | "tie", "reason": "<one sentence>"}')
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_DECODER = json.JSONDecoder()


def parse_verdict(text: str) -> tuple[str | None, str, str | None]:
    """``(verdict, reason, problem)`` from a judge's reply: the first JSON object with a ``verdict`` key, wherever
    it sits (code fences, text around it); verdicts A, B, tie in any case. ``problem`` says why there is none."""
    obj = None
    for m in re.finditer(r"\{", text or ""):
        try:
            cand, _ = _DECODER.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(cand, dict) and "verdict" in cand:
            obj = cand
            break
    if obj is None:
        return None, "", 'no JSON object with a "verdict" key'
    raw = obj["verdict"]
    v = raw.strip().lower().removeprefix("answer ").strip() if isinstance(raw, str) else ""
    verdict = {"a": "A", "b": "B", "tie": "tie"}.get(v)
    if verdict is None:
        return None, "", f'the verdict {json.dumps(raw)} is not "A", "B" or "tie"'
    reason = obj.get("reason", "")
    return verdict, reason if isinstance(reason, str) else json.dumps(reason), None


# ---------------------------------------------------------------- the judges

class JudgeClient:
    """One judge endpoint, through the cold-start teacher's client (retries, backoff, Retry-After) and cache."""

    def __init__(self, judge: Judge, cfg: ArenaConfig, cache: Path, log: Callable[[str], None]):
        self.judge = judge
        self.cfg = cfg
        tcfg = ColdStartConfig(
            teacher="openai", teacher_base_url=judge.base_url, teacher_model=judge.model,
            teacher_api_key_env=judge.api_key_env, teacher_concurrency=cfg.concurrency,
            teacher_max_retries=cfg.max_retries, teacher_timeout_s=cfg.timeout_s, teacher_backoff_s=cfg.backoff_s,
            teacher_temperature=cfg.temperature, teacher_max_tokens=cfg.max_tokens, teacher_cache=str(cache))
        self.teacher = OpenAITeacher(tcfg, log=log)
        self._openai = self.teacher.openai
        self._lock = threading.Lock()
        self.cache_hits = 0

    def ask(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """``(reply, from_cache)``; raises JudgeUnavailable when the endpoint refuses or cannot be reached at all,
        and the client's last error when the retries ran out on anything else."""
        j, cfg = self.judge, self.cfg
        key = cache_key(j.base_url, j.model, messages, cfg.temperature, cfg.max_tokens)
        text = self.teacher.cache.get(key)
        if text is not None:
            with self._lock:
                self.cache_hits += 1
            return text, True
        try:
            text = self.teacher.request(messages)
        except self.teacher.fatal as exc:  # a wrong key, model or URL fails every judgment alike
            raise JudgeUnavailable(
                f"arena: judge {j.name!r} at {j.endpoint} refused the request ({type(exc).__name__}: "
                f"{str(exc)[:200]}); check {j.where}.base_url, {j.where}.model and the key in ${j.api_key_env}"
            ) from None
        except self._openai.APIConnectionError as exc:
            if isinstance(exc, self._openai.APITimeoutError):
                raise
            raise JudgeUnavailable(
                f"arena: cannot reach judge {j.name!r} at {j.endpoint} ({type(exc).__name__}: {exc}, "
                f"{cfg.max_retries} retries); is the server up? ({j.where}.base_url)") from None
        try:
            self.teacher.cache.put(key, text, {"judge": j.model})
        except OSError as exc:  # a full or read-only cache costs a rerun its savings, not this reply
            self.teacher.log(f"arena: judge reply not cached ({exc})")
        return text, False


@dataclass(frozen=True)
class Match:
    """One judgment to make: a record, an ordered model pair, a judge."""
    record_id: str
    pair: tuple[int, int]  # model indices, first < second
    judge: int
    order: str             # AB or BA

    def shown(self) -> tuple[int, int]:
        """The models shown as Answer A and Answer B."""
        return self.pair if self.order == "AB" else (self.pair[1], self.pair[0])


def ask_judge(client: JudgeClient, messages: list[dict[str, str]], malformed_retries: int) -> dict[str, Any]:
    """A verdict: asked, re-asked after malformed replies; a bad reply or an HTTP failure ends as ``failed``."""
    out: dict[str, Any] = {"status": "failed", "verdict": None, "reason": "", "asks": 0, "cached": True}
    t0 = time.time()
    for _ in range(malformed_retries + 1):
        try:
            text, cached = client.ask(messages)
        except JudgeUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - an HTTP failure after the retries is recorded, not fatal
            out.update(cached=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            break
        out["asks"] += 1
        out["cached"] = out["cached"] and cached
        verdict, reason, problem = parse_verdict(text)
        if problem is None:
            out = {**out, "status": "ok", "verdict": verdict, "reason": reason}
            out.pop("error", None)
            out.pop("raw", None)
            break
        out.update(error=problem, raw=text)
        messages = messages + [{"role": "assistant", "content": text},
                               {"role": "user", "content": CORRECTION.format(problem=problem)}]
    out["latency_s"] = round(time.time() - t0, 3)
    return out


IDENTICAL = {"status": "identical", "verdict": "tie", "reason": "identical answers (not asked)", "asks": 0,
             "cached": False, "latency_s": 0.0}


def judge_all(cfg: ArenaConfig, judges: list[Judge], models: list[str], preds: dict[str, dict[str, dict]],
              records: list[str], progress: Progress | None, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Every judgment, in a fixed order, and the request counts. Identical prompts to one judge (the same
    question, reference and answers, on any record or pair) share one verdict."""
    cache = Path(cfg.cache).expanduser() if cfg.cache else store.cache_root() / "arena"
    clients = [JudgeClient(j, cfg, cache, log) for j in judges]
    pairs = [(a, b) for a in range(len(models)) for b in range(a + 1, len(models))]
    matches = [Match(rid, p, k, o) for rid in records for p in pairs for k in range(len(judges)) for o in ORDERS]
    verdicts: list[dict | None] = [None] * len(matches)
    prompts: dict[str, tuple[int, list[dict[str, str]]]] = {}  # prompt key -> (judge, messages)
    keys: list[str | None] = [None] * len(matches)
    for n, m in enumerate(matches):
        row = preds[models[0]][m.record_id]
        a, b = (shown_answer(preds[models[x]][m.record_id], cfg.include_reasoning) for x in m.shown())
        if a == b:
            verdicts[n] = IDENTICAL
            continue
        messages = build_messages(row["task"], row["prompt"], row["reference"], a, b)
        keys[n] = json.dumps([m.judge, messages])
        prompts.setdefault(keys[n], (m.judge, messages))
    total = len(matches)
    log(f"arena: {len(records)} records, {len(models)} models, {len(judges)} judge(s): {total} judgments, "
        f"{len(prompts)} distinct prompts ({cfg.concurrency} in flight, cache {cache})")
    answered: dict[str, dict] = {}
    waiting = Counter(k for k in keys if k is not None)
    done = total - sum(waiting.values())
    if progress:
        progress(done, total)
    pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="arena-judge")
    try:
        futures = {pool.submit(ask_judge, clients[k], msgs, cfg.malformed_retries): key
                   for key, (k, msgs) in prompts.items()}
        for fut in as_completed(futures):
            answered[futures[fut]] = fut.result()
            done += waiting[futures[fut]]
            if progress:
                progress(done, total)
    finally:  # a fatal error or Ctrl-C: queued prompts are cancelled, not sent
        pool.shutdown(wait=True, cancel_futures=True)
    rows = []
    for m, key, verdict in zip(matches, keys, verdicts):
        v = verdict or answered[key]
        i, j = m.shown()
        winner = {"A": models[i], "B": models[j], "tie": "tie", None: None}[v["verdict"]]
        rows.append({"record_id": m.record_id, "task": preds[models[0]][m.record_id]["task"],
                     "judge": judges[m.judge].name, "order": m.order, "model_a": models[i], "model_b": models[j],
                     **v, "winner": winner})
    stats = {"prompts": len(prompts), "requests": sum(c.teacher.stats["requests"] for c in clients),
             "retries": sum(c.teacher.stats["retries"] for c in clients),
             "cache_hits": sum(c.cache_hits for c in clients)}
    return rows, stats


# ---------------------------------------------------------------- outcomes and ratings

def outcomes(judgments: list[dict], models: list[str], judges: list[Judge]) -> tuple[np.ndarray, dict, dict]:
    """The games (record index, model i, model j, i's score: 1, 0.5 or 0), overall counts and counts per judge."""
    index = {m: n for n, m in enumerate(models)}
    by_pair: dict[tuple[str, str, str, str], dict[str, dict]] = {}
    for r in judgments:
        a, b = sorted((r["model_a"], r["model_b"]), key=index.__getitem__)
        by_pair.setdefault((r["record_id"], a, b, r["judge"]), {})[r["order"]] = r
    rec_index: dict[str, int] = {}
    games: list[tuple[int, int, int, float]] = []
    zero = {"games": 0, "inconsistent": 0, "incomplete": 0, "failed": 0}
    per_judge = {j.name: dict(zero) for j in judges}
    for (rid, a, b, judge), orders in by_pair.items():
        c = per_judge[judge]
        c["failed"] += sum(r["status"] == "failed" for r in orders.values())
        winners = {r["winner"] for r in orders.values()}
        if len(orders) < 2 or None in winners:
            c["incomplete"] += 1
            continue
        c["games"] += 1
        if len(winners) > 1:
            c["inconsistent"] += 1
        winner = winners.pop() if len(winners) == 1 else "tie"
        score = 0.5 if winner == "tie" else float(winner == a)
        games.append((rec_index.setdefault(rid, len(rec_index)), index[a], index[b], score))
    counts = {k: sum(c[k] for c in per_judge.values()) for k in zero}
    return np.array(games, dtype=float).reshape(-1, 4), counts, per_judge


def win_matrix(games: np.ndarray, n_models: int, weights: np.ndarray | None = None) -> np.ndarray:
    """``W[a, b]``: a's wins over b, a tie counting half for each."""
    w = np.ones(len(games)) if weights is None else weights
    i, j, s = games[:, 1].astype(int), games[:, 2].astype(int), games[:, 3]
    out = np.zeros((n_models, n_models))
    np.add.at(out, (i, j), s * w)
    np.add.at(out, (j, i), (1 - s) * w)
    return out


def bradley_terry(wins: np.ndarray, prior_ties: float = 0.0, l2: float = 1e-6) -> np.ndarray:
    """Bradley–Terry log-strengths (mean 0) by maximum likelihood, ``P(a beats b) = sigmoid(t_a - t_b)``, from
    ``wins[a, b]`` (ties as half wins) plus ``prior_ties`` virtual ties per pair; Newton's method with step
    halving on the log-likelihood. The tiny ``l2`` term pins the mean and keeps the Hessian invertible."""
    m = len(wins)
    w = wins + prior_ties / 2 * (1 - np.eye(m))
    n = w + w.T

    def loss(t: np.ndarray) -> float:
        return float(np.sum(w * np.logaddexp(0.0, t[None, :] - t[:, None]))) + 0.5 * l2 * float(t @ t)

    t = np.zeros(m)
    current = loss(t)
    for _ in range(100):
        p = 0.5 * (1 + np.tanh((t[:, None] - t[None, :]) / 2))  # P(a beats b)
        grad = (n * p - w).sum(1) + l2 * t
        if np.abs(grad).max() < 1e-9 * (1 + n.sum()):
            break
        h = n * p * p.T
        hess = np.diag(h.sum(1) + l2) - h
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size > 1e-6 and loss(t - size * step) > current:
            size /= 2
        t = t - size * step
        current = loss(t)
    return t - t.mean()


def to_elo(theta: np.ndarray, cfg: ArenaConfig, models: list[str]) -> np.ndarray:
    elo = cfg.elo_scale * theta / math.log(10)
    shift = elo[models.index(cfg.anchor_model)] if cfg.anchor_model else elo.mean()
    return elo - shift + cfg.elo_anchor


def ratings(games: np.ndarray, models: list[str], cfg: ArenaConfig) -> tuple[np.ndarray, np.ndarray]:
    """Elo-scale ratings and their 95 % percentile-bootstrap intervals (shape (2, models)), records resampled."""
    m = len(models)
    elo = to_elo(bradley_terry(win_matrix(games, m), cfg.prior_ties), cfg, models)
    n_rec = int(games[:, 0].max()) + 1 if len(games) else 0
    if not n_rec or not cfg.bootstrap_rounds:
        return elo, np.vstack([elo, elo])
    rng = np.random.default_rng(cfg.seed)
    rec = games[:, 0].astype(int)
    boot = np.empty((cfg.bootstrap_rounds, m))
    for b in range(cfg.bootstrap_rounds):
        weights = np.bincount(rng.integers(0, n_rec, n_rec), minlength=n_rec)[rec]
        boot[b] = to_elo(bradley_terry(win_matrix(games, m, weights), cfg.prior_ties), cfg, models)
    return elo, np.percentile(boot, [2.5, 97.5], axis=0)


# ---------------------------------------------------------------- reports

def leaderboard(games: np.ndarray, models: list[str], elo: np.ndarray, ci: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for n, model in enumerate(models):
        as_i, as_j = games[games[:, 1] == n][:, 3], games[games[:, 2] == n][:, 3]
        wins = int(np.sum(as_i == 1) + np.sum(as_j == 0))
        losses = int(np.sum(as_i == 0) + np.sum(as_j == 1))
        ties = int(np.sum(as_i == 0.5) + np.sum(as_j == 0.5))
        rows.append({"model": model, "rating": round(float(elo[n]), 1), "ci_low": round(float(ci[0, n]), 1),
                     "ci_high": round(float(ci[1, n]), 1), "wins": wins, "ties": ties, "losses": losses,
                     "n": wins + ties + losses})
    rows.sort(key=lambda r: -r["rating"])
    for rank, r in enumerate(rows, start=1):
        r["rank"] = rank
    return rows


def _md(text: str) -> str:
    """A name as one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def win_rates(games: np.ndarray, n_models: int) -> list[list[float | None]]:
    """Row model against column model: (wins + half the ties) / games; None on the diagonal and without games."""
    w = win_matrix(games, n_models)
    n = w + w.T
    return [[round(float(w[a, b] / n[a, b]), 3) if a != b and n[a, b] else None for b in range(n_models)]
            for a in range(n_models)]


def markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    judges = ", ".join(f"{j['name']} ({j['endpoint']})" for j in report["judges"])
    lines = ["# Report Arena leaderboard", "",
             f"Judges: {judges}. Records: {report['records']} ({', '.join(report['tasks'])}). Games: {c['games']} "
             f"(one per record, model pair and judge; both orders judged).", "",
             f"Judgments: {c['judgments']} ({c['identical']} on identical answers: ties, not asked; {c['failed']} "
             f"failed). Inconsistent pairs (counted as ties): {c['inconsistent']}. Incomplete pairs (left out): "
             f"{c['incomplete']}.", "",
             f"Ratings: Bradley–Terry, ties as half wins, {report['scale']['elo_scale']:g} points per factor 10 in "
             f"the odds, {report['scale']['anchor']}; 95 % CI from {report['scale']['bootstrap_rounds']} bootstrap "
             f"resamples of the records.", "",
             "| Rank | Model | Rating | 95 % CI | W / T / L | n |", "|---:|---|---:|---|---|---:|"]
    for r in report["leaderboard"]:
        lines.append(f"| {r['rank']} | {_md(r['model'])} | {r['rating']:.0f} | {r['ci_low']:.0f} – {r['ci_high']:.0f} "
                     f"| {r['wins']} / {r['ties']} / {r['losses']} | {r['n']} |")
    models = report["win_rate"]["models"]
    lines += ["", "## Win rate (row against column: wins + ½ ties over games)", "",
              "| | " + " | ".join(map(_md, models)) + " |", "|---|" + "---:|" * len(models)]
    for model, row in zip(models, report["win_rate"]["matrix"]):
        lines.append(f"| {_md(model)} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Ratings with their 95 % intervals, and the win-rate heatmap, in one PNG."""
    from matplotlib.figure import Figure

    board = report["leaderboard"][::-1]  # best at the top
    models = report["win_rate"]["models"]
    rates = np.array([[np.nan if v is None else v for v in row] for row in report["win_rate"]["matrix"]])
    size = len(models)
    fig = Figure(figsize=(12, 2.5 + 0.5 * size), layout="constrained")
    ax, hm = fig.subplots(1, 2, width_ratios=[1.2, 1])
    y = np.arange(len(board))
    ratings_ = np.array([r["rating"] for r in board])
    err = np.array([[r["rating"] - r["ci_low"] for r in board], [r["ci_high"] - r["rating"] for r in board]])
    ax.errorbar(ratings_, y, xerr=err, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=4)
    ax.set_yticks(y, [r["model"] for r in board])
    ax.set_ylim(-0.6, len(board) - 0.4)
    ax.axvline(report["scale"]["elo_anchor"], color="lightgray", lw=1, zorder=0)
    ax.set_xlabel("rating (95 % CI)")
    ax.set_title("Report Arena: Bradley–Terry ratings")
    im = hm.imshow(rates, cmap="RdYlGn", vmin=0, vmax=1)
    hm.set_xticks(range(size), models, rotation=30, ha="right")
    hm.set_yticks(range(size), models)
    for a in range(size):
        for b in range(size):
            if not np.isnan(rates[a, b]):
                hm.text(b, a, f"{rates[a, b]:.2f}", ha="center", va="center", fontsize=9)
    hm.set_title("win rate, row against column")
    fig.colorbar(im, ax=hm, shrink=0.8)
    fig.savefig(path, dpi=120)


def public_config(cfg: ArenaConfig) -> dict[str, Any]:
    """The config for reports and lineage: judge URLs without credentials."""
    d = dataclasses.asdict(cfg)
    d["judges"] = [{**j, **({"base_url": redact_url(j["base_url"])} if j.get("base_url") else {})}
                   for j in cfg.judges]
    return d


# ---------------------------------------------------------------- the stage

def run_arena(cfg: ArenaConfig, predictions: dict[str, str], out: str, progress: Progress | None = None,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Judge the models' predictions (model name -> predictions file or evaluation output) pairwise and write the
    leaderboard to ``out`` (a folder or s3:// URI, written atomically). Returns the stage's metrics."""
    t0 = time.time()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    judges = check_config(cfg)
    models = list(predictions)
    if len(models) < 2 or not all(models):
        raise ValueError(f"arena: needs at least two models with non-empty names, got {models}")
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
