"""Run the DeepMedix predictor behind KServe's ModelServer.

    python -m serving.server --model PATH_OR_S3_URI [--name deepmedix] [--host 127.0.0.1] [--port 8080]
    deepmedix serve --model PATH_OR_S3_URI ...            (the same)

Routes (one port): v1 ``POST /v1/models/<name>:predict``, v2 ``POST /v2/models/<name>/infer``, OpenAI-compatible
``POST /openai/v1/chat/completions`` and ``GET /openai/v1/models``, readiness ``GET /v1/models/<name>``,
liveness ``GET /``, Prometheus ``GET /metrics``, the OpenAPI document ``GET /openapi.json``.

In front of every route sits :class:`Guard`, an ASGI middleware: request counts and latency per route, the
optional bearer token (``--api-token-file`` or ``DEEPMEDIX_API_TOKEN``; liveness, readiness, metrics and the
OpenAPI document stay open for probes and scrapers), the request body limit (413), and two refusals: KServe's
model-repository routes (``/v2/repository/...``: unloading the model is not a client's call; 403) and the v2
binary tensor extension (``Inference-Header-Content-Length``; BYTES go as base64 strings in JSON; 400).

Notes on kserve 0.21:
* ``kserve.model_server`` parses ``sys.argv`` at import time (``parse_known_args``, abbreviations on: our
  ``--model`` would be read as its ``--model_name``), so kserve is imported here with a bare argv and every setting
  is passed to ``ModelServer`` explicitly.
* ``RESTServer`` hard-codes uvicorn's ``host="0.0.0.0"``; :class:`HostModelServer` sets the uvicorn config's host
  in ``setup_event_loop()``, which ``ModelServer.start`` calls after building the REST server, before binding.
* The REST app is the module-level ``kserve.model_server.app``: routes, middleware and exception handlers added to
  it before ``start`` are served alongside KServe's own.
* gRPC always listens on ``[::]:<grpc_port>`` (all interfaces), so it is off unless ``--grpc-port N`` is given.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import time
from pathlib import Path

from deepmedix.errors import DeepMedixError
from deepmedix.grounding import PAPER_PIXELS, Frame


def _import_kserve_with_bare_argv() -> None:
    if "kserve.model_server" in sys.modules:
        return
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import kserve  # noqa: F401
    finally:
        sys.argv = saved


_import_kserve_with_bare_argv()

from fastapi import Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from kserve import ModelServer  # noqa: E402
from kserve.logging import logger as log  # noqa: E402

from serving import prometheus  # noqa: E402
from serving.batcher import Overloaded, Unavailable  # noqa: E402
from serving.inputs import Limits  # noqa: E402
from serving.openai_api import mount_model  # noqa: E402
from serving.openapi import build_openapi  # noqa: E402
from serving.predictor import DeepMedixModel  # noqa: E402

OPEN_PATHS = ("/", "/metrics", "/v2/health/live", "/v2/health/ready", "/openapi.json")
DISCONNECTED = "499"  # the status label of a request whose client left before any response


class HostModelServer(ModelServer):
    """``kserve.ModelServer`` whose REST server binds ``host`` instead of the hard-coded 0.0.0.0."""

    def __init__(self, host: str = "127.0.0.1", **kwargs):
        super().__init__(**kwargs)
        self.host = host

    def setup_event_loop(self):
        if self._rest_server is not None:
            self._rest_server.config.host = self.host
        else:
            log.warning("kserve built no single-process REST server; host %s not applied (binds 0.0.0.0)", self.host)
        super().setup_event_loop()


class _TooLarge(DeepMedixError):
    pass


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: per-route metrics, bearer token, body-size limit (pure ASGI, so streams pass through)."""

    def __init__(self, app, token: str | None = None, max_body_bytes: int = 64 << 20):
        self.app, self.token, self.max_body = app, token, int(max_body_bytes)

    def _open(self, method: str, path: str) -> bool:
        if path in OPEN_PATHS:
            return True
        # Readiness (GET /v1/models/<name>, /v2/models/<name>/ready) carries no data: probes reach it.
        parts = path.split("/")
        return method == "GET" and (
            (len(parts) == 4 and parts[1:3] == ["v1", "models"])
            or (len(parts) == 5 and parts[1:3] == ["v2", "models"] and parts[4] == "ready"))

    def _authorized(self, headers: dict) -> bool:
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        route = prometheus.route_of(scope["path"])
        status = [0]

        async def send_tracked(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            headers = dict(scope.get("headers") or [])
            if self.token and not self._open(scope["method"], scope["path"]) and not self._authorized(headers):
                prometheus.REJECTED.labels(reason="unauthorized").inc()
                return await _send_json(send_tracked, 401, {"error": "missing or wrong bearer token "
                                                           "(Authorization: Bearer <token>)"},
                                        {"WWW-Authenticate": "Bearer"})
            if scope["path"].startswith("/v2/repository"):
                return await _send_json(send_tracked, 403, {"error": "the model repository extension (load/unload) "
                                                           "is disabled on this server"})
            if b"inference-header-content-length" in headers:
                return await _send_json(send_tracked, 400, {"error": "Inference-Header-Content-Length: the binary "
                                                           "tensor extension is not supported; send BYTES tensors "
                                                           "as base64 strings in the JSON body"})
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    return await _send_json(send_tracked, 400, {"error": "Content-Length: not an integer"})
                if n > self.max_body:
                    prometheus.REJECTED.labels(reason="too_large").inc()
                    return await _send_json(send_tracked, 413, {"error": f"request body: {n} bytes, over the "
                                                               f"limit of {self.max_body}"})
            seen = [0]

            async def receive_counted():
                msg = await receive()
                if msg["type"] == "http.request":
                    seen[0] += len(msg.get("body", b""))
                    if seen[0] > self.max_body:
                        raise _TooLarge()
                return msg

            try:
                await self.app(scope, receive_counted, send_tracked)
            except _TooLarge:
                prometheus.REJECTED.labels(reason="too_large").inc()
                if not status[0]:
                    await _send_json(send_tracked, 413, {"error": f"request body over the limit of "
                                                         f"{self.max_body} bytes"})
        finally:
            prometheus.REQUESTS.labels(route=route, code=str(status[0]) if status[0] else DISCONNECTED).inc()
            prometheus.LATENCY.labels(route=route).observe(time.perf_counter() - t0)


async def _retry_later(request: Request, exc: Overloaded | Unavailable):
    """429 (queue full) or 503 (timed out, not ready), both with Retry-After."""
    return JSONResponse({"error": str(exc)}, status_code=429 if isinstance(exc, Overloaded) else 503,
                        headers={"Retry-After": str(exc.retry_after)})


def read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise SystemExit(f"{path}: cannot read the token file ({exc.strerror})") from None
    if not token:
        raise SystemExit(f"{path}: the token file is empty")
    return token


def read_token(token_file: str | None) -> str | None:
    """The API token: from ``--api-token-file``, else ``DEEPMEDIX_API_TOKEN``, else none (no auth)."""
    return read_token_file(token_file) or os.environ.get("DEEPMEDIX_API_TOKEN") or None


def install(mount, name: str, limits: Limits, token: str | None, max_body_bytes: int, v2: bool = True):
    """Put ``mount(app)``'s routes, the Guard middleware, the 429/503 handlers and the OpenAPI document on
    KServe's app; return the app."""
    from kserve.model_server import app

    mount(app)
    app.add_exception_handler(Overloaded, _retry_later)
    app.add_exception_handler(Unavailable, _retry_later)
    app.add_middleware(Guard, token=token, max_body_bytes=max_body_bytes)
    schema = build_openapi(name, limits, v2=v2)
    app.openapi = lambda: schema  # FastAPI drops a cached openapi_schema when KServe adds its routes later
    return app


def serve(model_uri: str, name: str = "deepmedix", host: str = "127.0.0.1", port: int = 8080,
          grpc_port: int = 0, frame: str = "auto", limits: Limits | None = None, max_batch_size: int = 8,
          max_wait_ms: float = 20.0, max_queue: int = 64, request_timeout_s: float = 120.0,
          token: str | None = None, max_body_bytes: int = 64 << 20) -> None:
    """Load the model and serve it until SIGINT/SIGTERM. ``grpc_port=0`` disables gRPC."""
    t0 = time.time()
    model = DeepMedixModel(name, model_uri, limits=limits, frame=frame, max_batch_size=max_batch_size,
                           max_wait_ms=max_wait_ms, max_queue=max_queue, request_timeout_s=request_timeout_s)
    server = HostModelServer(host=host, http_port=port, grpc_port=grpc_port or 8081, enable_grpc=bool(grpc_port),
                             workers=1, enable_docs_url=False)  # also configures kserve's logging
    install(lambda app: mount_model(app, model), name, model.limits, token, max_body_bytes)
    model.load()
    log.info("deepmedix: loaded %s as %r in %.1f s; serving on http://%s:%d (gRPC %s, batch <= %d, wait <= %g ms, "
             "queue <= %d, bearer token %s)", model_uri, name, time.time() - t0, host, port,
             f"on [::]:{grpc_port}" if grpc_port else "off", max_batch_size, max_wait_ms, max_queue,
             "required" if token else "off")
    server.start([model])


def add_limit_args(p: argparse.ArgumentParser) -> None:
    """The request limits and access options the predictor and the transformer share."""
    d = Limits()
    p.add_argument("--frame", default="auto",
                   help="the box frame: auto (the one the model folder was trained in, as its lineage.json says; "
                        "native if it says none, and always native in the transformer), native (Qwen2.5-VL's: "
                        "pixels of the processor's grid for each image) or squareN, e.g. square512 (the image "
                        "squashed to N x N and boxes in that square)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="default budget per query")
    p.add_argument("--max-new-tokens-limit", type=int, default=d.max_new_tokens_limit, help="most a query may ask")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes)
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="decompression-bomb guard")
    p.add_argument("--max-instances", type=int, default=d.max_instances, help="queries per v1/v2 request")
    p.add_argument("--max-views", type=int, default=d.max_views, help="images per query (the views of one study)")
    p.add_argument("--max-request-bytes", type=int, default=64 << 20, help="request body limit (413 past it)")
    p.add_argument("--api-token-file", default=None,
                   help="require 'Authorization: Bearer <token>' (token read from this file; or DEEPMEDIX_API_TOKEN)")


def frame_from_args(a: argparse.Namespace) -> Frame:
    """``--frame`` for a processor of ``--frame-factor`` and ``--frame-min-pixels``/``--frame-max-pixels`` (the
    transformer's: the predictor's processor is not here to ask; the predictor binds it to its own on load)."""
    spec = "native" if str(a.frame).strip().lower() == "auto" else a.frame
    try:
        return Frame.parse(spec, getattr(a, "frame_factor", 28), getattr(a, "frame_min_pixels", PAPER_PIXELS),
                           getattr(a, "frame_max_pixels", PAPER_PIXELS))
    except ValueError as exc:
        raise SystemExit(f"--frame: {exc}") from None


def limits_from_args(a: argparse.Namespace) -> Limits:
    for flag in ("max_instances", "max_views"):
        if getattr(a, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}")
    return Limits(max_image_bytes=a.max_image_bytes, max_pixels=a.max_pixels, max_new_tokens=a.max_new_tokens,
                  max_new_tokens_limit=max(a.max_new_tokens_limit, a.max_new_tokens), max_instances=a.max_instances,
                  max_views=a.max_views, frame=frame_from_args(a))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder or s3:// URI (a Qwen2.5-VL / DeepMedix-R1 folder)")
    p.add_argument("--name", default="deepmedix", help="model name in the URL: /v1/models/<name>:predict")
    p.add_argument("--host", default="127.0.0.1", help="REST bind address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080, help="REST port")
    p.add_argument("--grpc-port", type=int, default=0, help="enable KServe's gRPC server on this port (0 = off)")
    p.add_argument("--max-batch-size", type=int, default=8, help="queries per batched generate")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="longest a batch is held open for more queries (a lone caller never waits)")
    p.add_argument("--max-queue", type=int, default=64, help="queries waiting; past it: 429 + Retry-After")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="past it: 503 + Retry-After")
    add_limit_args(p)
    a = p.parse_args(argv)
    frame_from_args(a)  # a bad --frame stops here
    serve(a.model, name=a.name, host=a.host, port=a.port, grpc_port=a.grpc_port, frame=a.frame,
          limits=limits_from_args(a), max_batch_size=a.max_batch_size, max_wait_ms=a.max_wait_ms,
          max_queue=a.max_queue, request_timeout_s=a.request_timeout_s, token=read_token(a.api_token_file),
          max_body_bytes=a.max_request_bytes)


if __name__ == "__main__":
    main()
