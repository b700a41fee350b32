"""A stand-in KFP API server (the v2beta1 REST API that ``kfp.Client`` calls; stdlib HTTP, one process).

    python tests/pipeline/kfp_stub.py --port P [--multi-user] [--token T] [--prefix /pipeline]

Served under ``--prefix`` (a Kubeflow install serves the API behind ``/pipeline``):
``GET /apis/v2beta1/healthz`` (``multi_user``, ``tag_name``); ``GET /apis/v2beta1/experiments`` (the display-name
``filter`` kfp.Client sends; ``namespace``); ``POST /apis/v2beta1/experiments``; ``POST /apis/v2beta1/runs``.
As the real API server: in multi-user mode an experiment needs a namespace (400 otherwise); a run needs an
existing experiment (404) and an inline ``pipeline_spec`` (alone, or with its ``platform_spec``) whose root
declares every runtime parameter given (400 naming the unknown one). With ``--token``, a request without
``Authorization: Bearer T`` is a 401 (with ``--login-page``: an auth proxy's HTML sign-in page, status 200).
``GET /_stub/state``: the experiments and runs created.
"""

from __future__ import annotations

import argparse
import json
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

STATE = {"experiments": [], "runs": []}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    multi_user = False
    token = ""
    login_page = False
    prefix = ""

    def log_message(self, *args):
        pass

    def reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, code: int, message: str) -> None:
        self.reply(code, {"error": message, "code": {400: 3, 401: 16, 404: 5}.get(code, 2), "message": message})

    def route(self, method: str) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        if url.path == "/_stub/state":
            return self.reply(200, STATE)
        if not url.path.startswith(self.prefix + "/apis/"):
            return self.error(404, "Not Found")
        path = url.path[len(self.prefix):]
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            if self.login_page:  # an auth proxy in front (Dex / oauth2-proxy): its sign-in page, with a 200
                page = b"<!DOCTYPE html><html><body>Log in to Kubeflow</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return None
            return self.error(401, "Unauthorized: no valid bearer token")
        if method == "GET" and path == "/apis/v2beta1/healthz":
            return self.reply(200, {"commit_sha": "stub", "tag_name": "2.17.0", "multi_user": self.multi_user})
        if path == "/apis/v2beta1/experiments" and method == "GET":
            ns = q.get("namespace", "")
            if self.multi_user and not ns:
                return self.error(400, "Invalid input error: In multi-user mode, ListExperiment requires a namespace")
            name = None
            if q.get("filter"):
                preds = json.loads(q["filter"]).get("predicates") or []
                name = next((p.get("stringValue") or p.get("string_value") for p in preds
                             if p.get("key") == "display_name"), None)
            found = [e for e in STATE["experiments"] if (name is None or e["display_name"] == name)
                     and (not self.multi_user or e["namespace"] == ns)]
            return self.reply(200, {"experiments": found, "total_size": len(found)})
        if path == "/apis/v2beta1/experiments" and method == "POST":
            if self.multi_user and not body.get("namespace"):
                return self.error(400, "Invalid input error: In multi-user mode, CreateExperiment requires a "
                                       "namespace")
            exp = {"experiment_id": str(uuid.uuid4()), "display_name": body.get("display_name"),
                   "description": body.get("description") or "", "namespace": body.get("namespace") or "",
                   "created_at": "2026-12-06T00:00:00Z", "storage_state": "AVAILABLE"}
            STATE["experiments"].append(exp)
            return self.reply(200, exp)
        if path == "/apis/v2beta1/runs" and method == "POST":
            exp = next((e for e in STATE["experiments"] if e["experiment_id"] == body.get("experiment_id")), None)
            if exp is None:
                return self.error(404, f"Experiment {body.get('experiment_id')} not found")
            spec = body.get("pipeline_spec") or {}
            platform = {}
            if "pipeline_spec" in spec:  # kfp.Client's form for a package with a platform (Kubernetes) spec
                spec, platform = spec["pipeline_spec"], spec.get("platform_spec") or {}
            if "root" not in spec or "pipelineInfo" not in spec:
                return self.error(400, "Invalid input error: a run needs a pipeline_spec or a pipeline version")
            declared = ((spec["root"].get("inputDefinitions") or {}).get("parameters") or {})
            params = (body.get("runtime_config") or {}).get("parameters") or {}
            unknown = sorted(set(params) - set(declared))
            if unknown:
                return self.error(400, f"Invalid input error: parameter(s) {unknown} not in the pipeline spec")
            run = {"run_id": str(uuid.uuid4()), "display_name": body.get("display_name"),
                   "experiment_id": exp["experiment_id"], "state": "PENDING", "created_at": "2026-12-06T00:00:00Z",
                   "runtime_config": body.get("runtime_config"), "pipeline_spec": spec,
                   "platform_spec": platform,
                   "service_account": body.get("service_account") or ""}
            STATE["runs"].append(run)
            return self.reply(200, run)
        return self.error(404, f"Not Found: {method} {path}")

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--multi-user", action="store_true")
    ap.add_argument("--token", default="")
    ap.add_argument("--prefix", default="")
    ap.add_argument("--login-page", action="store_true", help="unauthenticated calls get an HTML sign-in page")
    a = ap.parse_args()
    Handler.multi_user, Handler.token, Handler.prefix = a.multi_user, a.token, a.prefix.rstrip("/")
    Handler.login_page = a.login_page
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
