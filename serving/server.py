"""Run the DeepMedix predictor behind KServe's ModelServer (v1 + v2 REST routes, gRPC off by default).

    python -m serving.server --model PATH_OR_S3_URI [--port 8080] [--host 127.0.0.1] [--name deepmedix]

Then ``GET /v1/models/<name>`` (ready check) and ``POST /v1/models/<name>:predict``.

Notes on kserve 0.21:
* ``kserve.model_server`` parses ``sys.argv`` at import time (``parse_known_args``, abbreviations on: our
  ``--model`` would be read as its ``--model_name``), so kserve is imported here with a bare argv and every setting
  is passed to ``ModelServer`` explicitly.
* ``RESTServer`` hard-codes uvicorn's ``host="0.0.0.0"`` and ``ModelServer`` has no host argument. ``ModelServer.start``
  builds the RESTServer and then calls ``setup_event_loop()`` before serving; :class:`HostModelServer` overrides that
  hook to set the uvicorn config's host (the config is read when the server binds).
* gRPC (``GRPCServer``) always listens on ``[::]:<grpc_port>``, all interfaces, default 8081 — a second server on the
  same machine would collide, so it is disabled unless ``--grpc-port N`` is given.
"""

from __future__ import annotations

import argparse
import sys
import time


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

from kserve import ModelServer  # noqa: E402
from kserve.logging import logger as log  # noqa: E402

from serving.predictor import DeepMedixModel  # noqa: E402


class HostModelServer(ModelServer):
    """``kserve.ModelServer`` whose REST server binds ``host`` instead of the hard-coded 0.0.0.0."""

    def __init__(self, host: str = "127.0.0.1", **kwargs):
        super().__init__(**kwargs)
        self.host = host

    def setup_event_loop(self):
        # Called by ModelServer.start() after it has built self._rest_server and before anything binds.
        if self._rest_server is not None:
            self._rest_server.config.host = self.host
        else:
            log.warning("kserve built no single-process REST server; host %s not applied (binds 0.0.0.0)", self.host)
        super().setup_event_loop()


def serve(model_uri: str, name: str = "deepmedix", host: str = "127.0.0.1", port: int = 8080,
          max_new_tokens: int = 256, frame: int = 512, grpc_port: int = 0, max_image_bytes: int = 20_000_000,
          max_pixels: int = 40_000_000) -> None:
    """Load the model and serve it until SIGINT/SIGTERM. ``grpc_port=0`` disables gRPC."""
    t0 = time.time()
    model = DeepMedixModel(name, model_uri, max_new_tokens=max_new_tokens, frame=frame,
                           max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    server = HostModelServer(host=host, http_port=port, grpc_port=grpc_port or 8081, enable_grpc=bool(grpc_port),
                             workers=1, enable_docs_url=False)  # also configures kserve's logging
    model.load()
    log.info("deepmedix: loaded %s as %r in %.1f s; serving on http://%s:%d (gRPC %s)", model_uri, name,
             time.time() - t0, host, port, f"on [::]:{grpc_port}" if grpc_port else "disabled")
    server.start([model])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model folder or s3:// URI (a Qwen2.5-VL / DeepMedix-R1 folder)")
    p.add_argument("--name", default="deepmedix", help="model name in the URL: /v1/models/<name>:predict")
    p.add_argument("--host", default="127.0.0.1", help="REST bind address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080, help="REST port")
    p.add_argument("--grpc-port", type=int, default=0, help="enable KServe's gRPC server on this port (0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--frame", type=int, default=512, help="the model's box frame (frame x frame square)")
    p.add_argument("--max-image-bytes", type=int, default=20_000_000)
    p.add_argument("--max-pixels", type=int, default=40_000_000)
    a = p.parse_args(argv)
    serve(a.model, name=a.name, host=a.host, port=a.port, max_new_tokens=a.max_new_tokens, frame=a.frame,
          grpc_port=a.grpc_port, max_image_bytes=a.max_image_bytes, max_pixels=a.max_pixels)


if __name__ == "__main__":
    main()
