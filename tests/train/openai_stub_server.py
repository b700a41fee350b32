"""A stand-in OpenAI-compatible chat server for the cold-start teacher tests (FastAPI, run by uvicorn).

    python tests/train/openai_stub_server.py --port 8123

``POST /v1/chat/completions`` answers in the OpenAI response schema; the behaviour is picked by the model name:

``good``       a valid grounded trace built from the user message's reference regions and reference answer
``garbage``    text without the output grammar
``slow``       sleeps ``SLOW_S`` seconds (longer than the tests' client timeout), then answers like ``good``
``flaky``      500 on the first ``FLAKY_FAILS`` calls for each prompt, then answers like ``good``
``err400``     400 (a bad request; must not be retried)
``ratelimit``  429 with Retry-After on the first call for each prompt, then answers like ``good``

A user message is text or a list of ``text`` and ``image_url`` parts (OpenAI's vision format); each image must be a
``data:`` URL that decodes as an image (else 400). ``GET /stats`` returns the request counts (total and per model),
each model's request arrival times (the server's monotonic clock) and the [width, height] of the images of each
request; ``POST /reset`` zeroes them.
A request without ``Authorization: Bearer <key>`` gets 401.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import re
import time
import uuid
from collections import Counter, defaultdict

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

SLOW_S = 3.0
FLAKY_FAILS = 2

app = FastAPI()
STATE: dict = {"total": 0, "by_model": Counter(), "per_prompt": Counter(), "arrivals": defaultdict(list),
               "images": []}

_BOX = r"\[\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*,\s*-?\d+(?:\.\d+)?\s*\]"
_REGION_RE = re.compile(rf"^- ([^:\n]+): ({_BOX})\s*$", re.M)


def _section(text: str, title: str) -> str:
    m = re.search(rf"^### {re.escape(title)}[^\n]*\n(.*?)(?=\n### |\Z)", text, re.S | re.M)
    return m.group(1).strip() if m else ""


def good_trace(user: str) -> str:
    """A grounded trace from the prompt: one step per reference region, then the reference answer, boxed."""
    answer = _section(user, "Reference answer")
    regions = _REGION_RE.findall(_section(user, "Reference regions"))
    steps = [f"an opacity consistent with {label.strip()} is seen here with {box}" for label, box in regions]
    if not steps:
        steps = ["the lung fields are clear without focal consolidation",
                 "the cardiomediastinal silhouette is within normal limits"]
    return "<think> " + "; ".join(steps) + " </think> The answer is: \\boxed{" + answer + "}"


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}},
                        status_code=status, headers=headers)


def _completion(model: str, content: str, finish_reason: str = "stop") -> JSONResponse:
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 100, "completion_tokens": len(content.split()),
                  "total_tokens": 100 + len(content.split())},
    })


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    model = str(body.get("model", ""))
    STATE["total"] += 1
    STATE["by_model"][model] += 1
    STATE["arrivals"][model].append(time.monotonic())
    auth = request.headers.get("authorization", "")
    if not auth.startswith("Bearer ") or not auth[len("Bearer "):].strip():
        return _error(401, "missing API key", "invalid_request_error")
    messages = body.get("messages") or []
    user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    if isinstance(user, list):  # vision format: text parts and image_url parts
        sizes = []
        for part in user:
            if part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                try:
                    from PIL import Image

                    head, b64 = url.split(",", 1)
                    assert head.startswith("data:image/")
                    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
                        sizes.append(list(im.size))
                except Exception:  # noqa: BLE001 - any undecodable image is the client's error
                    return _error(400, "invalid image in 'image_url'", "invalid_request_error")
            elif part.get("type") != "text":
                return _error(400, f"unsupported content part {part.get('type')!r}", "invalid_request_error")
        STATE["images"].append(sizes)
        user = "\n".join(p.get("text", "") for p in user if p.get("type") == "text")
    if not isinstance(user, str):
        return _error(400, "expected a text user message", "invalid_request_error")
    key = (model, hashlib.sha256(user.encode()).hexdigest())
    STATE["per_prompt"][key] += 1
    n = STATE["per_prompt"][key]

    if model == "good":
        return _completion(model, good_trace(user))
    if model == "garbage":
        return _completion(model, "Sure! Looking at this image I think the answer is probably fine.")
    if model == "slow":
        await asyncio.sleep(SLOW_S)
        return _completion(model, good_trace(user))
    if model == "flaky":
        if n <= FLAKY_FAILS:
            return _error(500, "the server had an error while processing your request", "server_error")
        return _completion(model, good_trace(user))
    if model == "err400":
        return _error(400, "invalid value for 'messages'", "invalid_request_error")
    if model == "ratelimit":
        if n == 1:
            return _error(429, "rate limit reached", "requests", {"Retry-After": "0", "retry-after-ms": "20"})
        return _completion(model, good_trace(user))
    if model == "truncated":  # cut at max_tokens, mid-trace
        return _completion(model, good_trace(user)[:40], finish_reason="length")
    return _error(404, f"the model {model!r} does not exist", "invalid_request_error")


@app.get("/stats")
async def stats():
    return {"total": STATE["total"], "by_model": dict(STATE["by_model"]), "arrivals": dict(STATE["arrivals"]),
            "images": STATE["images"]}


@app.post("/reset")
async def reset():
    STATE["total"] = 0
    STATE["by_model"].clear()
    STATE["per_prompt"].clear()
    STATE["arrivals"].clear()
    STATE["images"].clear()
    return {"ok": True}


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
