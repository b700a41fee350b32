"""The KServe predictor: a ``kserve.Model`` that answers v1 and v2 requests with grounded answers.

Every query of a request is checked and decoded first (:mod:`serving.inputs`; a bad one fails the whole request
with HTTP 400 naming the field). Then the queries join the dynamic batcher (:mod:`serving.batcher`), which runs
concurrent requests' queries through one :func:`deepmedix.model.generate.generate_batch`. Each answer is the raw
text plus a ``grounding`` object whose boxes are in the ORIGINAL image's pixels (with several views in one query,
each box in the pixels of the view it is drawn on, named by ``views``/``box_views``)
(:meth:`deepmedix.grounding.Frame.from_frame` undoes the model's frame: ``--frame auto``, the one the model folder
was trained in; ``native``, the processor's grid of each image; or ``squareN``), and on request an overlay PNG with
the boxes drawn.

v1 ``POST /v1/models/<name>:predict``::

    {"instances": [{"image": "<base64 PNG/JPEG/DICOM or data URL>" | [one per view], "question": "...",
                    "max_new_tokens": 64, "temperature": 0, "top_p": 1, "overlay": false}]}
    -> {"predictions": [{"text", "grounding": {...}, "usage": {...}, "finish_reason"[, "overlay_png"]}]}

v2 ``POST /v2/models/<name>/infer``: BYTES inputs ``image`` (shape ``[n]``, or ``[n, views]``) and ``text`` (one
element per query), optional
``max_new_tokens`` tensor, request ``parameters`` as in v1; outputs ``text``, ``grounding`` (JSON per query) and,
with ``overlay``, ``overlay_png`` (base64).
"""

from __future__ import annotations

import asyncio
import json
import uuid

import kserve
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from PIL import Image

from deepmedix import grounding
from deepmedix.grounding import grounding_object
from deepmedix.model.generate import Generation, generate_batch
from deepmedix.model.load import Loaded, load
from deepmedix.viz import overlay_png
from serving import prometheus
from serving.batcher import Batcher, Job, Unavailable
from serving.inputs import Limits, Query, parse_v1, parse_v2


class DeepMedixModel(kserve.Model):
    def __init__(self, name: str, model_uri: str, limits: Limits | None = None, frame: str = "auto",
                 max_batch_size: int = 8, max_wait_ms: float = 20.0, max_queue: int = 64,
                 request_timeout_s: float = 120.0):
        super().__init__(name)
        self.model_uri = str(model_uri)
        self.limits = limits or Limits()
        # the spec until the model is loaded; then the Frame of its processor (load). ``auto``: the frame the model
        # folder was trained in (its lineage.json), native for a folder that records none
        auto = str(frame).strip().lower() == "auto"
        self.frame_spec = "auto" if auto else grounding.Frame.parse(frame).spec
        self.frame = self.limits.frame = grounding.Frame.parse("native" if auto else frame)
        # Our own pixel limit is checked from the header; Pillow's must not fire first with a vaguer message.
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, self.limits.max_pixels)
        self.loaded: Loaded | None = None
        self.batcher = Batcher(self._run_batch, max_batch_size=max_batch_size, max_wait_s=max_wait_ms / 1000.0,
                               max_queue=max_queue, timeout_s=request_timeout_s)

    def load(self) -> bool:
        self.loaded = load(self.model_uri)
        self.frame = self.limits.frame = self.loaded.frame(self.frame_spec)  # requests are sized by it from now on
        self.ready = True
        return self.ready

    # ------------------------------------------------------------ generation (the batcher's thread)

    def _run_batch(self, jobs: list[Job]) -> list[Generation]:
        q0 = jobs[0].query

        def on_token(k: int, tok: int) -> None:
            if jobs[k].on_token is not None and not jobs[k].dead.is_set():
                try:
                    jobs[k].on_token(tok)
                except Exception:  # noqa: BLE001 - one stream's failure (its loop closed) must not end the batch
                    jobs[k].dead.set()

        gens = generate_batch(
            self.loaded, [j.query.images for j in jobs], [j.query.question for j in jobs],
            [j.query.max_new_tokens for j in jobs], do_sample=q0.temperature > 0, temperature=q0.temperature or 1.0,
            top_p=q0.top_p, frame=None, systems=[j.query.system for j in jobs], on_token=on_token,
            on_done=lambda k, g: jobs[k].deliver(g), stop_row=lambda k: jobs[k].dead.is_set())
        prometheus.GENERATED_TOKENS.inc(sum(g.completion_tokens for g in gens))
        prometheus.PROMPT_TOKENS.inc(sum(g.prompt_tokens for g in gens))
        return gens

    async def answer(self, queries: list[Query], on_token=None) -> list[dict]:
        """Queue ``queries`` (one request's) and return one answer dict each, in order."""
        if self.loaded is None:
            raise Unavailable(f"model {self.name} is not loaded yet", 5)
        gens = await self.batcher.submit([Job(q, on_token) for q in queries])
        return await asyncio.to_thread(lambda: [self.result(q, g) for q, g in zip(queries, gens)])

    async def parse(self, parser, payload) -> list[Query]:
        """Check the queue first (a request that would get 429 costs no decoding), then decode off the loop."""
        self.batcher.admit(1)
        return await asyncio.to_thread(parser, payload, self.limits)

    def result(self, q: Query, g: Generation) -> dict:
        ground = grounding_object(g.text, q.sizes, self.frame)
        out = {"text": g.text, "grounding": ground, "finish_reason": g.finish_reason,
               "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                         "total_tokens": g.prompt_tokens + g.completion_tokens}}
        if q.overlay:
            out["overlay_png"] = overlay_png(q.originals, ground, q.sizes)
        return out

    # ------------------------------------------------------------ protocols

    async def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):
            return await self._predict_v2(payload)
        answers = await self.answer(await self.parse(parse_v1, payload))
        return {"predictions": answers}

    async def _predict_v2(self, request: InferRequest) -> InferResponse:
        queries = await self.parse(parse_v2, request)
        answers = await self.answer(queries)
        n = len(answers)
        outputs = [InferOutput("text", [n], "BYTES", [a["text"] for a in answers]),
                   InferOutput("grounding", [n], "BYTES", [json.dumps(a["grounding"]) for a in answers]),
                   InferOutput("completion_tokens", [n], "INT32", [a["usage"]["completion_tokens"] for a in answers])]
        if any(q.overlay for q in queries):
            outputs.append(InferOutput("overlay_png", [n], "BYTES", [a.get("overlay_png", "") for a in answers]))
        return InferResponse(request.id or str(uuid.uuid4()), self.name, outputs)

    def stop(self):
        self.batcher.close()
