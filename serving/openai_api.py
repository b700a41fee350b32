"""OpenAI-compatible routes on the KServe model server's app, at the paths of KServe's vLLM runtime:
``POST /openai/v1/chat/completions`` and ``GET /openai/v1/models``.

KServe 0.21's own OpenAI routes need vLLM, so these are mounted here. A chat request is one user turn (after
optional system turns) with one chest X-ray as an ``image_url`` data URL (PNG, JPEG or DICOM) and text parts.
Greedy decoding unless ``temperature`` > 0. The reply is a standard ``chat.completion`` whose choice also carries
``grounding`` (steps with boxes in the original image's pixels, the answer; ``overlay_png`` when the request
says ``"overlay": true``, e.g. through the ``openai`` client's ``extra_body``). ``"stream": true`` streams
``chat.completion.chunk`` events as the tokens are generated (server-sent events), the last chunk carrying
``finish_reason`` and ``grounding``. Errors use OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from kserve.errors import InvalidInput
from kserve.logging import logger as log

from serving.batcher import Overloaded, Unavailable
from serving.inputs import UnknownModel, parse_chat

_PARAM_RE = re.compile(r"^([A-Za-z_][\w.\[\]]*)")


def openai_error(status: int, message: str, kind: str, code: str | None = None, headers: dict | None = None):
    param = m.group(1) if (m := _PARAM_RE.match(message)) and ":" in message else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _error_response(exc: Exception):
    if isinstance(exc, UnknownModel):
        return openai_error(404, str(exc), "invalid_request_error", "model_not_found")
    if isinstance(exc, InvalidInput):
        return openai_error(400, str(exc), "invalid_request_error")
    if isinstance(exc, Overloaded):
        return openai_error(429, str(exc), "rate_limit_exceeded", "queue_full",
                            {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, Unavailable):
        return openai_error(503, str(exc), "server_error", "unavailable", {"Retry-After": str(exc.retry_after)})
    raise exc


def read_json(raw: bytes):
    """A request body -> JSON, or InvalidInput (orjson: no recursion blow-up, integers beyond 64 bits refused)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body: not valid JSON ({exc})") from None


def mount_openai(app: FastAPI, name: str, limits, answer, stream=None, admit=None) -> None:
    """Add the two routes. ``answer(query)`` is a coroutine giving one answer dict (``text``, ``grounding``,
    ``finish_reason``, ``usage``[, ``overlay_png``]); ``stream(query, opts, rid, ts)`` serves ``"stream": true``
    (None: refused with 400); ``admit()`` may refuse (429) before the image is decoded."""

    created = int(time.time())

    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "deepmedix"}]}

    async def chat_completions(request: Request):
        try:
            body = read_json(await request.body())
            if admit is not None:
                admit()
            query, opts = await asyncio.to_thread(parse_chat, body, limits, name)  # decoding stays off the loop
            if opts["stream"] and stream is None:
                raise InvalidInput("stream: streaming is not supported by this server")
            rid, ts = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            if opts["stream"]:
                return await stream(query, opts, rid, ts)
            ans = await answer(query)
        except (InvalidInput, Overloaded, Unavailable) as exc:
            return _error_response(exc)
        return {
            "id": rid, "object": "chat.completion", "created": ts, "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ans["text"]},
                         "finish_reason": ans["finish_reason"], "logprobs": None,
                         "grounding": _grounding(ans)}],
            "usage": ans["usage"],
        }

    app.add_api_route("/openai/v1/models", list_models, methods=["GET"])
    app.add_api_route("/openai/v1/chat/completions", chat_completions, methods=["POST"])


def mount_model(app: FastAPI, model) -> None:
    """The routes for a :class:`serving.predictor.DeepMedixModel`, streaming included."""

    async def answer(query):
        (ans,) = await model.answer([query])
        return ans

    mount_openai(app, model.name, model.limits, answer,
                 stream=lambda query, opts, rid, ts: _stream(model, query, opts, rid, ts),
                 admit=lambda: model.batcher.admit(1))


def _grounding(ans: dict) -> dict:
    g = dict(ans["grounding"])
    if "overlay_png" in ans:
        g["overlay_png"] = ans["overlay_png"]
    return g


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(model, query, opts, rid: str, ts: int):
    """Server-sent events fed by the batcher's per-row token callback (called on the generation thread)."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    tokenizer = model.loaded.processor.tokenizer
    task = asyncio.ensure_future(model.answer([query], on_token=lambda t: loop.call_soon_threadsafe(
        tokens.put_nowait, t)))
    # Admission (queue full) is known at once: refuse with a status code rather than an event.
    await asyncio.sleep(0)
    if task.done() and task.exception() is not None:
        return _error_response(task.exception())

    def chunk(delta: dict, finish=None, **extra) -> str:
        return _sse({"id": rid, "object": "chat.completion.chunk", "created": ts, "model": model.name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}]})

    async def events():
        ids, sent = [], ""  # sent: exactly what the client has received
        yield chunk({"role": "assistant", "content": ""})
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(tokens.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                ids.append(getter.result())
                text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
                # hold back a partial UTF-8 character and trailing whitespace (the final text is stripped)
                text = text.rstrip()
                if not text.endswith("\ufffd") and len(text) > len(sent) and text.startswith(sent):
                    delta, sent = text[len(sent):], text
                    yield chunk({"content": delta})
            try:
                (ans,) = task.result()
            except Exception as exc:  # noqa: BLE001 - the status line has gone: report in the stream
                log.error("streamed generation failed: %s: %s", type(exc).__name__, exc)
                kind = "server_error" if not isinstance(exc, (Overloaded, Unavailable)) else "unavailable"
                yield _sse({"error": {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": kind}})
                return
            final = ans["text"]
            rest = final[len(sent):] if final.startswith(sent) else ""
            yield chunk({"content": rest} if rest else {}, ans["finish_reason"], grounding=_grounding(ans))
            if opts["include_usage"]:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": ts, "model": model.name,
                            "choices": [], "usage": ans["usage"]})
            yield "data: [DONE]\n\n"
        finally:
            if getter is not None:
                getter.cancel()
            if not task.done():
                task.cancel()  # the client went away: the batcher drops the query and stops its row

    return StreamingResponse(events(), media_type="text/event-stream")
