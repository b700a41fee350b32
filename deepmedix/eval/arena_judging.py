"""The Report Arena's judging (:mod:`deepmedix.eval.arena`): the prompt, reading a verdict, asking each judge through
the shared LLM client, and every judgment of a run."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import ArenaConfig
from deepmedix.errors import DeepMedixError
from deepmedix.grounding import THINK_RE
from deepmedix.llm.client import ChatClient, Endpoint, redact_url

Progress = Callable[[int, int], None]
ORDERS = ("AB", "BA")  # AB: the pair's first model is Answer A; BA: swapped
NO_ANSWER = "(no final answer)"

class JudgeUnavailable(DeepMedixError, ValueError):
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
    """One judge endpoint, through the shared LLM client (:mod:`deepmedix.llm.client`: retries, backoff,
    Retry-After, the reply cache)."""

    def __init__(self, judge: Judge, cfg: ArenaConfig, cache: Path, log: Callable[[str], None]):
        self.judge = judge
        self.cfg = cfg
        self.chat = ChatClient(Endpoint(
            base_url=judge.base_url, model=judge.model, api_key_env=judge.api_key_env, temperature=cfg.temperature,
            max_tokens=cfg.max_tokens, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s, cache=str(cache)), log)

    def ask(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """``(reply, from_cache)``; raises JudgeUnavailable when the endpoint refuses or cannot be reached at all,
        and the client's last error when the retries ran out on anything else."""
        j, cfg, oa = self.judge, self.cfg, self.chat.openai
        key = self.chat.key(messages)
        text = self.chat.cached(key)
        if text is not None:
            return text, True
        try:
            text = self.chat.request(messages)
        except self.chat.fatal as exc:  # a wrong key, model or URL fails every judgment alike
            raise JudgeUnavailable(
                f"arena: judge {j.name!r} at {j.endpoint} refused the request ({type(exc).__name__}: "
                f"{str(exc)[:200]}); check {j.where}.base_url, {j.where}.model and the key in ${j.api_key_env}"
            ) from None
        except oa.APIConnectionError as exc:
            if isinstance(exc, oa.APITimeoutError):
                raise
            raise JudgeUnavailable(
                f"arena: cannot reach judge {j.name!r} at {j.endpoint} ({type(exc).__name__}: {exc}, "
                f"{cfg.max_retries} retries); is the server up? ({j.where}.base_url)") from None
        try:
            self.chat.cache.put(key, text, {"judge": j.model})
        except OSError as exc:  # a full or read-only cache costs a rerun its savings, not this reply
            self.chat.log(f"arena: judge reply not cached ({exc})")
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
    stats = {"prompts": len(prompts), **{k: sum(c.chat.stats[k] for c in clients)
                                         for k in ("requests", "retries", "cache_hits")}}
    return rows, stats
