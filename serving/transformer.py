"""The grounding transformer: DeepMedix's pre- and post-processing in front of any OpenAI-compatible predictor,
such as KServe's Hugging Face runtime with the vLLM backend on GPUs.

    python -m serving.transformer --model_name deepmedix-r1 --predictor_host HOST[:PORT] [--port 8080]

KServe starts a transformer container with ``--model_name``, ``--predictor_host`` and ``--http_port`` appended;
those (and other KServe transformer flags) are accepted. For each query it

1. checks the request as the predictor does (:mod:`serving.inputs`: limits, PNG/JPEG/DICOM, clear 400s);
2. resizes the image as training did (:func:`deepmedix.data.records.open_image` with the ``--frame``: for
   ``native``, aspect kept to the predictor's pixel budget, ``--frame-min-pixels``/``--frame-max-pixels``) and
   re-encodes it as PNG, and puts the grounded-reasoning instruction after the question — the same prompt the HF
   backend builds, so the model's boxes are in the frame;
3. calls the predictor's ``/openai/v1/chat/completions`` and maps the boxes of its answer back to the ORIGINAL
   image's pixels, adding the ``grounding`` object (and on request an overlay PNG).

Routes: ``POST /openai/v1/chat/completions`` (not streamed), ``GET /openai/v1/models``, v1
``POST /v1/models/<name>:predict`` (instances fan out as concurrent chat calls), ``/metrics``, readiness.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import time

from serving import server as _server  # imports kserve with a bare argv first

# isort: split

import httpx  # noqa: E402
import kserve  # noqa: E402
from kserve.errors import InvalidInput  # noqa: E402
from kserve.logging import logger as log  # noqa: E402

from deepmedix import grounding  # noqa: E402
from deepmedix.grounding import PAPER_PIXELS, grounding_object  # noqa: E402
from deepmedix.viz import overlay_png  # noqa: E402
from serving import prometheus  # noqa: E402
from serving.batcher import Overloaded, Unavailable  # noqa: E402
from serving.inputs import Limits, Query, parse_v1  # noqa: E402
from serving.openai_api import mount_openai  # noqa: E402


class GroundingTransformer(kserve.Model):
    def __init__(self, name: str, predictor_host: str, limits: Limits | None = None,
                 frame: grounding.Frame = grounding.DEFAULT_FRAME, predictor_model: str | None = None,
                 use_ssl: bool = False,
                 timeout_s: float = 300.0, max_concurrency: int = 64, max_queue: int = 256,
                 predictor_token: str | None = None):
        super().__init__(name)
        host = predictor_host.strip().rstrip("/")
        if "://" not in host:
            host = f"{'https' if use_ssl else 'http'}://{host}"
        self.base = f"{host}/openai/v1"
        self.limits = limits or Limits(frame=frame)
        self.frame = self.limits.frame = frame
        self.predictor_model = predictor_model or name
        self.timeout_s = float(timeout_s)
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(max_concurrency)  # calls in flight to the predictor
        self.max_queue = int(max_queue)  # requests waiting for a slot; past it: 429
        self._waiting = 0
        self._headers = {"Authorization": f"Bearer {predictor_token}"} if predictor_token else {}
        self.ready = True

    def load(self) -> bool:
        self.ready = True
        return True

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout_s)
        return self._client

    def upstream_request(self, q: Query) -> dict:
        """The chat request the predictor sees: the images sized by the frame (several views named ``Picture N``),
        the instruction added — :func:`deepmedix.grounding.user_content`, the prompt the HF backend builds."""
        urls = []
        for img in q.images:  # already sized by the frame (serving.inputs.make_query)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        content = grounding.user_content(q.question, len(urls),
                                         image_part=lambda i: {"type": "image_url", "image_url": {"url": urls[i]}})
        body = {"model": self.predictor_model, "max_tokens": q.max_new_tokens, "temperature": q.temperature,
                "top_p": q.top_p, "stream": False,
                "messages": ([{"role": "system", "content": q.system}] if q.system else []) + [
                    {"role": "user", "content": content}]}
        return body

    def admit(self) -> None:
        if self._waiting >= self.max_queue:
            prometheus.REJECTED.labels(reason="queue_full").inc()
            raise Overloaded(f"transformer busy: {self._waiting} requests waiting (limit {self.max_queue}); "
                             "retry later", 2)

    async def answer(self, q: Query) -> dict:
        """One query through the predictor; the answer dict the predictor itself would give."""
        self.admit()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            body = await asyncio.to_thread(self.upstream_request, q)
            r = await self._http().post(f"{self.base}/chat/completions", json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise Unavailable(f"predictor {self.base}: {type(exc).__name__}: {exc}", 5) from None
        finally:
            self._slots.release()
        return await asyncio.to_thread(self._answer_from, q, r)

    def _answer_from(self, q: Query, r: httpx.Response) -> dict:
        if r.status_code in (401, 403):
            raise Unavailable(f"predictor {self.base} refused the transformer ({r.status_code}): check "
                              "--predictor-token-file", 30)
        if r.status_code == 429 or r.status_code >= 500:
            raise Unavailable(f"predictor {self.base} answered {r.status_code}: {r.text[:300]}",
                              _retry_after(r.headers.get("Retry-After")))
        try:
            out = r.json()
        except ValueError:
            raise Unavailable(f"predictor {self.base} answered {r.status_code} with a body that is not JSON", 5) \
                from None
        if r.status_code >= 400:
            err = out.get("error") if isinstance(out, dict) else None
            msg = err.get("message") if isinstance(err, dict) else (err or r.text[:300])
            raise InvalidInput(f"predictor refused the request ({r.status_code}): {msg}")
        try:
            choice = out["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise Unavailable(f"predictor {self.base} answered without choices[0].message", 5) from None
        ground = grounding_object(text, q.sizes, self.frame)
        usage = out.get("usage") or {}
        ans = {"text": text, "grounding": ground, "finish_reason": choice.get("finish_reason"),
               "usage": {k: usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
        if q.overlay:
            ans["overlay_png"] = overlay_png(q.originals, ground, q.sizes)
        return ans

    async def predict(self, payload, headers=None, response_headers=None):
        self.admit()
        queries = await asyncio.to_thread(parse_v1, payload, self.limits)
        return {"predictions": list(await asyncio.gather(*(self.answer(q) for q in queries)))}


def _retry_after(value: str | None) -> int:
    try:
        return max(1, int(value or 5))
    except ValueError:  # an HTTP date
        return 5


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serving.transformer", description=__doc__.split("\n")[0])
    p.add_argument("--model_name", "--name", dest="name", default="deepmedix")
    p.add_argument("--predictor_host", "--predictor-host", dest="predictor_host", required=True,
                   help="host[:port] of the OpenAI-compatible predictor (KServe passes it)")
    p.add_argument("--predictor_use_ssl", dest="use_ssl", default="false")
    p.add_argument("--predictor_model", default=None, help="model name at the predictor (default: --model_name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", "--http_port", dest="port", type=int, default=8080)
    p.add_argument("--predictor-token-file", default=None, help="bearer token the predictor requires")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--max-concurrency", type=int, default=64, help="calls in flight to the predictor")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a call; past it: 429")
    _server.add_limit_args(p)
    p.add_argument("--frame-min-pixels", type=int, default=PAPER_PIXELS,
                   help="the predictor's processor pixel budget (min_pixels of its preprocessor_config.json)")
    p.add_argument("--frame-max-pixels", type=int, default=PAPER_PIXELS, help="... and its max_pixels")
    p.add_argument("--frame-factor", type=int, default=28, help="the predictor's patch size x merge size")
    a, unknown = p.parse_known_args(argv)
    if unknown:
        log.info("deepmedix transformer: ignoring KServe flags %s", unknown)
    limits = _server.limits_from_args(a)
    model = GroundingTransformer(a.name, a.predictor_host, limits, limits.frame, a.predictor_model,
                                 use_ssl=str(a.use_ssl).lower() in ("1", "true", "yes"), timeout_s=a.request_timeout_s,
                                 max_concurrency=a.max_concurrency, max_queue=a.max_queue,
                                 predictor_token=_server.read_token_file(a.predictor_token_file))
    srv = _server.HostModelServer(host=a.host, http_port=a.port, grpc_port=8081, enable_grpc=False, workers=1,
                                  enable_docs_url=False)
    _server.install(lambda app: mount_openai(app, model.name, model.limits, model.answer, admit=model.admit),
                    model.name, limits,
                    _server.read_token(a.api_token_file), a.max_request_bytes, v2=False)
    log.info("deepmedix transformer %r -> %s on http://%s:%d", model.name, model.base, a.host, a.port)
    t0 = time.time()
    srv.start([model])
    log.info("deepmedix transformer stopped after %.0f s", time.time() - t0)


if __name__ == "__main__":
    main()
