"""A stand-in Kubernetes API server (stdlib HTTP, one process) for the code that talks to a cluster: ``deploy``,
the TrainJob launcher, ``wait_for`` and ``deepmedix doctor``, the way ``tests/eval/judge_stub_server.py`` stands in
for a remote LLM.

    python tests/cluster/kube_stub.py --port P --world world.yaml [--token T]

It speaks the real REST paths (``/api/v1/...``, ``/apis/<group>/<version>/[namespaces/<ns>/]<plural>[/<name>]``,
``pods/<name>/log``, ``?labelSelector=``, ``?watch=true`` as a stream of watch events), the real error shape (a
``Status`` object with ``reason`` and ``code``), creates (409 AlreadyExists), merge patches
(``application/merge-patch+json``, RFC 7386), replaces (409 Conflict on a stale ``resourceVersion``) and deletes.
A custom resource is served only while its CustomResourceDefinition exists, and what its CRD's schema does not
declare is pruned on write, as the API server does with structural schemas (so an old Trainer CRD drops
``spec.runtimePatches``). With ``--token``, a request without ``Authorization: Bearer T`` is a 401.

The world file holds the objects present at start (``objects: [...]``) and what the controllers do
(``controllers:``), each step driven by GETs of the object, so a test needs no clock:

``InferenceService: {ready_after: N, failure: {reason, message}, url: ..., reconcile_updates: false}``  after N
    reads of a new spec (until then the status the previous spec left, as KServe's lags): Ready with
    ``observedGeneration`` (Knative: a new revision per generation; Standard: the ``<name>-predictor`` Deployment
    running the predictor's containers, rolled out), or a ``modelStatus.lastFailureInfo``.
    ``reconcile_updates: false``: a controller that never gets to a replaced spec.
``TrainJob: {finish_after: N, outcome: Complete|Failed|never, reason, message, logs: [lines]}``  on create, the
    first node's pod (JobSet labels) with those log lines; the condition after N reads.
``fail: [{method, path (regex), status, times, after}]``  answers ``times`` matching requests (after the first
    ``after``) with ``status``.

``rbac: {TOKEN: {user, rules}}``: requests with that bearer token are allowed only what the Role ``rules`` allow
(403 Forbidden, in the API server's words, otherwise); the ``--token`` is an unrestricted admin.

``GET /_stub/requests``: every request so far (method, path, query, content type, body); ``GET /_stub/objects``:
the stored objects.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import yaml

# kind -> (group, version, plural, namespaced) of the built-in kinds the code reads
BUILTIN = {
    "Namespace": ("", "v1", "namespaces", False), "Node": ("", "v1", "nodes", False),
    "Pod": ("", "v1", "pods", True), "ConfigMap": ("", "v1", "configmaps", True),
    "Secret": ("", "v1", "secrets", True), "ServiceAccount": ("", "v1", "serviceaccounts", True),
    "Deployment": ("apps", "v1", "deployments", True),
    "CustomResourceDefinition": ("apiextensions.k8s.io", "v1", "customresourcedefinitions", False),
}
KEEP = ("apiVersion", "kind", "metadata")


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def prune(obj, schema: dict | None):
    """Drop what a structural schema does not declare (``x-kubernetes-preserve-unknown-fields`` keeps all)."""
    if schema is None or schema.get("x-kubernetes-preserve-unknown-fields"):
        return obj
    if isinstance(obj, dict) and "properties" in schema:
        return {k: prune(v, schema["properties"][k]) for k, v in obj.items() if k in schema["properties"]}
    if isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: prune(v, schema["additionalProperties"]) for k, v in obj.items()}
    if isinstance(obj, list) and isinstance(schema.get("items"), dict):
        return [prune(v, schema["items"]) for v in obj]
    return obj


class World:
    def __init__(self, spec: dict):
        self.lock = threading.Condition()
        self.objects: dict[tuple, dict] = {}  # (plural, namespace, name) -> object
        self.reads: dict[tuple, int] = {}
        self.events: list[tuple[str, str, dict]] = []  # (plural, type, object)
        self.requests: list[dict] = []
        self.controllers = spec.get("controllers") or {}
        self.failures = [dict(f, left=f.get("times", 1), skip=f.get("after", 0))
                         for f in self.controllers.get("fail") or []]
        self.version = 1
        self.logs: dict[tuple, list[str]] = {}
        self.rbac: dict[str, dict] = spec.get("rbac") or {}  # token -> {"user", "rules"}
        with self.lock:
            for obj in spec.get("objects") or []:
                self.put(copy.deepcopy(obj), event="ADDED")

    # ------------------------------------------------------------------------------------------- the resources
    def resource(self, group: str, version: str, plural: str) -> tuple[str, bool, dict | None] | None:
        """(kind, namespaced, schema) of a served resource, or None (404)."""
        for kind, (g, v, p, ns) in BUILTIN.items():
            if (g, v, p) == (group, version, plural):
                return kind, ns, None
        for (p, _, _), crd in list(self.objects.items()):
            if p != "customresourcedefinitions":
                continue
            s = crd["spec"]
            if s["group"] == group and s["names"]["plural"] == plural:
                for ver in s.get("versions") or []:
                    if ver["name"] == version and ver.get("served", True):
                        schema = (ver.get("schema") or {}).get("openAPIV3Schema")
                        return s["names"]["kind"], s.get("scope", "Namespaced") == "Namespaced", schema
        return None

    def plural_of(self, obj: dict) -> str:
        kind = obj["kind"]
        if kind in BUILTIN:
            return BUILTIN[kind][2]
        for (p, _, _), crd in self.objects.items():
            if p == "customresourcedefinitions" and crd["spec"]["names"]["kind"] == kind:
                return crd["spec"]["names"]["plural"]
        raise KeyError(kind)

    def put(self, obj: dict, event: str) -> dict:
        meta = obj.setdefault("metadata", {})
        key = (self.plural_of(obj), meta.get("namespace", ""), meta["name"])
        self.version += 1
        meta["resourceVersion"] = str(self.version)
        meta.setdefault("uid", f"uid-{self.version}")
        meta.setdefault("generation", 1)
        meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.objects[key] = obj
        self.events.append((key[0], event, copy.deepcopy(obj)))
        self.lock.notify_all()
        return obj

    # ------------------------------------------------------------------------------------------- the controllers
    def on_write(self, plural: str, obj: dict, created: bool) -> None:
        ns, name = obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
        self.reads[(plural, ns, name)] = 0  # the controller starts over on the new spec; the status stays stale
        if plural == "inferenceservices" and created:  # KServe's controller adds its finalizer
            obj["metadata"]["finalizers"] = ["inferenceservice.finalizers"]
        if plural == "trainjobs" and created:
            c = self.controllers.get("TrainJob") or {}
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{name}-node-0-0-abcde", "namespace": ns,
                                "labels": {"jobset.sigs.k8s.io/jobset-name": name,
                                           "batch.kubernetes.io/job-completion-index": "0"}},
                   "spec": {"containers": [{"name": "node"}]}, "status": {"phase": "Running"}}
            self.put(pod, "ADDED")
            self.logs[(ns, pod["metadata"]["name"], "node")] = list(c.get("logs") or [])

    def on_read(self, key: tuple, obj: dict) -> None:
        self.reads[key] = self.reads.get(key, 0) + 1
        n = self.reads[key]
        plural, ns, name = key
        if plural == "inferenceservices":
            c = self.controllers.get("InferenceService") or {}
            gen = obj["metadata"]["generation"]
            if n < c.get("ready_after", 1) or (gen > 1 and c.get("reconcile_updates") is False):
                return  # not reconciled yet: whatever status the previous spec left
            st = obj.setdefault("status", {})
            st["observedGeneration"] = gen
            if c.get("failure"):
                st.setdefault("modelStatus", {})["lastFailureInfo"] = dict(c["failure"])
                st["conditions"] = [{"type": "Ready", "status": "False", "reason": c["failure"]["reason"]}]
            else:
                mode = obj["metadata"].get("annotations", {}).get("serving.kserve.io/deploymentMode", "Knative")
                st["conditions"] = [{"type": "Ready", "status": "True"}]
                st["url"] = c.get("url", f"http://{name}.{ns}.example.com")
                if mode in ("Knative", "Serverless"):
                    rev = f"{name}-predictor-{gen:05d}"
                    st["components"] = {"predictor": {"latestCreatedRevision": rev, "latestReadyRevision": rev}}
                else:
                    self.rolled_out(ns, f"{name}-predictor", obj["spec"]["predictor"].get("containers") or [])
            self.put(obj, "MODIFIED")
        elif plural == "trainjobs":
            c = self.controllers.get("TrainJob") or {}
            outcome = c.get("outcome", "Complete")
            if outcome == "never" or n < c.get("finish_after", 1):
                return
            cond = {"type": outcome, "status": "True", "reason": c.get("reason", outcome),
                    "message": c.get("message", f"jobset {outcome.lower()}")}
            obj.setdefault("status", {})["conditions"] = [cond]
            self.put(obj, "MODIFIED")

    def rolled_out(self, ns: str, name: str, containers: list) -> None:
        """KServe's Standard-mode Deployment for the predictor's containers, rolled out (a new generation when the
        pod template changed)."""
        old = self.objects.get(("deployments", ns, name))
        template = {"metadata": {"labels": {"app": name}}, "spec": {"containers": copy.deepcopy(containers)}}
        generation = (old["metadata"]["generation"] + (old["spec"]["template"] != template)) if old else 1
        dep = {"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": name, "namespace": ns, "generation": generation},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}, "template": template},
               "status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1,
                          "availableReplicas": 1, "readyReplicas": 1}}
        self.put(dep, "MODIFIED")


WORLD: World


def selected(obj: dict, selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        k, _, v = term.partition("=")
        if labels.get(k) != v:
            return False
    return True


def allowed(rules: list[dict], group: str, resource: str, verb: str, name: str | None) -> bool:
    """Kubernetes RBAC's rule match (no wildcards needed here): group, resource, verb, and resourceNames when the
    rule has them (never for list, watch or create, which name no object)."""
    for r in rules:
        if group in r.get("apiGroups", []) and resource in r.get("resources", []) and verb in r.get("verbs", []):
            names = r.get("resourceNames")
            if not names or (name and name in names):
                return True
    return False


def fields(obj: dict, selector: str) -> bool:
    """``metadata.name=`` / ``metadata.namespace=`` field selectors (what every kind supports)."""
    for term in filter(None, (selector or "").split(",")):
        k, _, v = term.partition("=")
        if k in ("metadata.name", "metadata.namespace") and obj["metadata"].get(k.split(".")[1], "") != v:
            return False
    return True


PATH = re.compile(r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
                  r"(?:/namespaces/(?P<ns>[^/]+)(?=/))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>log))?$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    token: str = ""

    def log_message(self, *args):  # quiet
        pass

    def reply(self, code: int, body) -> None:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("Content-Type", "application/json" if not isinstance(body, bytes) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else None

    def handle_any(self, method: str) -> None:
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self.body()
        w = WORLD
        if url.path == "/_stub/requests":
            return self.reply(200, w.requests)
        if url.path == "/_stub/objects":
            return self.reply(200, list(w.objects.values()))
        with w.lock:
            w.requests.append({"method": method, "path": url.path, "query": q, "body": copy.deepcopy(body),
                               "content_type": self.headers.get("Content-Type")})
        bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if self.token and bearer != self.token and bearer not in w.rbac:
            return self.reply(401, status(401, "Unauthorized", "Unauthorized"))
        for f in w.failures:
            if f["left"] > 0 and f.get("method", method) == method and re.search(f["path"], url.path):
                if f["skip"] > 0:
                    f["skip"] -= 1
                    continue
                f["left"] -= 1
                return self.reply(f["status"], status(f["status"], f.get("reason", "InternalError"),
                                                      f.get("message", "injected failure")))
        if url.path == "/version":
            return self.reply(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0"})
        m = PATH.match(url.path)
        if not m:
            return self.reply(404, status(404, "NotFound", "the server could not find the requested resource"))
        group, version = (m["g"], m["v"]) if m["g"] else ("", m["cv"])
        served = w.resource(group, version, m["plural"])
        if served is None:
            return self.reply(404, status(404, "NotFound", "the server could not find the requested resource"))
        kind, namespaced, schema = served
        ns, name, plural = m["ns"] or "", m["name"], m["plural"]
        if bearer in w.rbac:  # a ServiceAccount's token: its Role decides
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method) or (
                "get" if name else "watch" if q.get("watch", "").lower() in ("true", "1") else "list")
            resource = f"{plural}/{m['sub']}" if m["sub"] else plural
            if not allowed(w.rbac[bearer]["rules"], group, resource, verb, name):
                user = w.rbac[bearer].get("user", "system:serviceaccount:" + ns + ":runner")
                return self.reply(403, status(403, "Forbidden", f'{resource} is forbidden: User "{user}" cannot '
                                              f'{verb} resource "{resource}" in API group "{group}" in the namespace '
                                              f'"{ns}"'))
        if m["sub"] == "log":
            return self.pod_log(ns, name, q)
        with w.lock:
            return self.dispatch(method, w, kind, plural, ns, name, q, body, schema, group, version)

    def dispatch(self, method, w, kind, plural, ns, name, q, body, schema, group, version):
        key = (plural, ns, name)
        what = f'{plural}.{group or "core"} "{name}"'
        if method == "GET" and name:
            obj = w.objects.get(key)
            if obj is None:
                return self.reply(404, status(404, "NotFound", f"{what} not found"))
            w.on_read(key, obj)
            return self.reply(200, obj)
        if method == "GET":
            if q.get("watch", "").lower() in ("true", "1"):
                return self.watch(w, plural, ns, q)
            items = [o for (p, n, _), o in w.objects.items()
                     if p == plural and (not ns or n == ns) and selected(o, q.get("labelSelector", ""))
                     and fields(o, q.get("fieldSelector", ""))]
            return self.reply(200, {"kind": f"{kind}List", "apiVersion": f"{group}/{version}".lstrip("/"),
                                    "metadata": {"resourceVersion": str(w.version)}, "items": items})
        if method == "POST":
            if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
                return self.reply(422, status(422, "Invalid", f"{plural}: metadata.name: Required value"))
            key = (plural, ns, body["metadata"]["name"])
            if key in w.objects:
                return self.reply(409, status(409, "AlreadyExists", f'{plural} "{key[2]}" already exists'))
            obj = {k: v for k, v in body.items() if k in KEEP}
            obj.update(prune({k: v for k, v in body.items() if k not in KEEP}, schema) if schema else
                       {k: v for k, v in body.items() if k not in KEEP})
            obj["metadata"].pop("resourceVersion", None)
            obj["metadata"]["namespace"] = ns or obj["metadata"].get("namespace", "")
            obj = w.put(obj, "ADDED")
            w.on_write(plural, obj, created=True)
            return self.reply(201, obj)
        live = w.objects.get(key)
        if live is None:
            return self.reply(404, status(404, "NotFound", f"{what} not found"))
        if method == "DELETE":
            del w.objects[key]
            w.events.append((plural, "DELETED", copy.deepcopy(live)))
            w.lock.notify_all()
            return self.reply(200, status(200, "", "deleted") | {"status": "Success"})
        if method == "PATCH":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0]
            if ctype != "application/merge-patch+json":
                return self.reply(415, status(415, "UnsupportedMediaType", f"{ctype}: not served for {plural}"))
            new = merge_patch(live, body)
        else:  # PUT: a replace; a stale resourceVersion is a conflict
            rv = (body.get("metadata") or {}).get("resourceVersion")
            if rv != live["metadata"]["resourceVersion"]:
                return self.reply(409, status(409, "Conflict", f"Operation cannot be fulfilled on {what}: the "
                                                               "object has been modified"))
            new = dict(body)
        new = {k: v for k, v in new.items() if k in KEEP} | (
            prune({k: v for k, v in new.items() if k not in KEEP}, schema) if schema else
            {k: v for k, v in new.items() if k not in KEEP})
        for keep in ("uid", "creationTimestamp", "namespace", "name"):
            new["metadata"][keep] = live["metadata"][keep]
        if new.get("spec") != live.get("spec"):
            new["metadata"]["generation"] = live["metadata"]["generation"] + 1
        else:
            new["metadata"]["generation"] = live["metadata"]["generation"]
        if "status" in live and "status" not in body:
            new["status"] = live["status"]
        obj = w.put(new, "MODIFIED")
        w.on_write(plural, obj, created=False)
        return self.reply(200, obj)

    def watch(self, w: World, plural: str, ns: str, q: dict) -> None:
        """Watch events, one JSON object a line: the current objects as ADDED, then changes until
        ``timeoutSeconds`` (default 5)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sel, deadline = q.get("labelSelector", ""), time.monotonic() + float(q.get("timeoutSeconds", 5))
        field = q.get("fieldSelector", "")
        name = field.split("=", 1)[1] if field.startswith("metadata.name=") else None

        def wanted(o):
            m = o["metadata"]
            return (not ns or m.get("namespace") == ns) and (not name or m["name"] == name) and selected(o, sel)

        def send(event: dict) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        for (p, _, _), o in list(w.objects.items()):
            if p == plural and wanted(o):
                send({"type": "ADDED", "object": o})
        seen = len(w.events)
        while time.monotonic() < deadline:
            w.lock.wait(0.2)
            for p, kind, o in w.events[seen:]:
                if p == plural and wanted(o):
                    send({"type": kind, "object": o})
            seen = len(w.events)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def pod_log(self, ns: str, name: str, q: dict) -> None:
        lines = WORLD.logs.get((ns, name, q.get("container", "")))
        if lines is None:
            return self.reply(404, status(404, "NotFound", f'container {q.get("container")} in pod {name}: no log'))
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for line in lines:
            data = (line + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    def do_PUT(self):
        self.handle_any("PUT")

    def do_PATCH(self):
        self.handle_any("PATCH")

    def do_DELETE(self):
        self.handle_any("DELETE")


def main() -> None:
    global WORLD
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--world", required=True)
    ap.add_argument("--token", default="")
    a = ap.parse_args()
    with open(a.world) as f:
        WORLD = World(yaml.safe_load(f) or {})
    Handler.token = a.token
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
