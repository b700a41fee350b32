"""A stand-in OpenAI-compatible judge for the Report Arena tests (FastAPI, run by uvicorn).

    python tests/eval/judge_stub_server.py --port 8124 [--key SECRET]

``POST /v1/chat/completions`` answers in the OpenAI response schema. The behaviour is the judge model's name,
unless the arena prompt (an answer's text) carries a marker ``JUDGE:<behaviour>``, which wins:

``good``        ``{"verdict", "reason"}`` for the answer whose words overlap the reference more (Jaccard; tie if
                equal): deterministic, so both orders of a pair agree
``fenced``      like ``good``, inside a ```json fence after a line of prose
``positional``  always ``A`` (so the two orders of a pair disagree)
``malformed``   prose without JSON, every time
``badverdict``  valid JSON whose verdict is ``C``
``fixonce``     prose without JSON on the first ask, like ``good`` once the conversation holds a correction
``flaky``       500 on the first ``FLAKY_FAILS`` calls for each conversation, then like ``good``
``ratelimit``   429 with Retry-After on the first call for each conversation, then like ``good``
``slow``        sleeps ``SLOW_S`` seconds (longer than the tests' client timeout), then like ``good``
``sleepy``      sleeps ``SLEEPY_S`` seconds (within the timeout), then like ``good``

Any other model is a 404. With ``--key``, a request without ``Authorization: Bearer <key>`` gets 401.
``GET /stats``: request counts (total and per model) and the last user prompts; ``POST /reset`` clears them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import time
import uuid
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

SLOW_S = 3.0
SLEEPY_S = 0.2
FLAKY_FAILS = 2
MODES = ("good", "fenced", "positional", "malformed", "badverdict", "fixonce", "flaky", "ratelimit", "slow", "sleepy")

app = FastAPI()
STATE: dict = {"total": 0, "by_model": Counter(), "per_conversation": Counter(), "prompts": [], "key": ""}


def _section(text: str, title: str) -> str:
    m = re.search(rf"^### {re.escape(title)}[^\n]*\n(.*?)(?=\n### |\Z)", text, re.S | re.M)
    return m.group(1).strip() if m else ""


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def overlap_verdict(prompt: str) -> dict[str, str]:
    """Prefer the answer that shares more words with the reference (Jaccard); a tie when they share as much."""
    ref = _words(_section(prompt, "Reference"))
    scores = {}
    for label in ("A", "B"):
        ans = _words(_section(prompt, f"Answer {label}"))
        scores[label] = len(ans & ref) / max(1, len(ans | ref))
    if scores["A"] == scores["B"]:
        return {"verdict": "tie", "reason": "both answers overlap the reference equally"}
    best = max(scores, key=scores.get)
    return {"verdict": best, "reason": f"answer {best} shares more findings with the reference"}


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def _completion(model: str, content: str) -> JSONResponse:
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    })


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    model = str(body.get("model", ""))
    STATE["total"] += 1
    STATE["by_model"][model] += 1
    auth = request.headers.get("authorization", "")
    given = auth[len("Bearer "):].strip() if auth.startswith("Bearer ") else ""
    if not given or (STATE["key"] and given != STATE["key"]):
        return _error(401, "incorrect API key provided", "invalid_request_error")
    messages = body.get("messages") or []
    prompt = next((m.get("content", "") for m in messages if m.get("role") == "user"), "")
    STATE["prompts"] = (STATE["prompts"] + [prompt])[-200:]
    conversation = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
    STATE["per_conversation"][(model, conversation)] += 1
    n = STATE["per_conversation"][(model, conversation)]
    marker = re.search(r"JUDGE:(\w+)", prompt)
    mode = marker.group(1) if marker else model
    if mode not in MODES:
        return _error(404, f"the model {model!r} does not exist", "invalid_request_error")
    good = json.dumps(overlap_verdict(prompt))
    corrected = any(m.get("role") == "assistant" for m in messages)

    if mode == "fenced":
        return _completion(model, f"Here is my judgment.\n```json\n{good}\n```\nI hope this helps.")
    if mode == "positional":
        return _completion(model, json.dumps({"verdict": "A", "reason": "the first answer reads better"}))
    if mode == "malformed" or (mode == "fixonce" and not corrected):
        return _completion(model, "Answer A is clearly the better report, in my view.")
    if mode == "badverdict":
        return _completion(model, json.dumps({"verdict": "C", "reason": "neither"}))
    if mode == "flaky" and n <= FLAKY_FAILS:
        return _error(500, "the server had an error while processing your request", "server_error")
    if mode == "ratelimit" and n == 1:
        return _error(429, "rate limit reached", "requests", {"Retry-After": "0", "retry-after-ms": "20"})
    if mode in ("slow", "sleepy"):
        await asyncio.sleep(SLOW_S if mode == "slow" else SLEEPY_S)
    return _completion(model, good)


@app.get("/stats")
async def stats():
    return {"total": STATE["total"], "by_model": dict(STATE["by_model"]), "prompts": STATE["prompts"]}


@app.post("/reset")
async def reset():
    STATE["total"] = 0
    STATE["by_model"].clear()
    STATE["per_conversation"].clear()
    STATE["prompts"] = []
    return {"ok": True}


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--key", default="", help="the only API key accepted (default: any non-empty key)")
    args = ap.parse_args()
    STATE["key"] = args.key
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
