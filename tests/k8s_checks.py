"""Checks shared by the Kubernetes rendering tests (``tests/serving/test_manifests.py`` for the kustomize
manifests, ``tests/cluster/test_helm.py`` for the Helm chart): render with the real tools, then judge the objects.

* ``render_kustomize(path)``: ``kubectl kustomize`` parsed into a list of objects; ``helm_run(...)``: a real
  ``helm`` process (``helm template`` / ``helm lint``), its output and errors as they are.
* Core objects are validated strictly with ``kubernetes-validate`` against the Kubernetes 1.32 OpenAPI schema
  (``core_validate``).
* Every InferenceService is walked field by field against the models generated from KServe's OpenAPI spec that the
  ``kserve`` SDK ships (``kserve.models.V1beta1InferenceService`` -> ``openapi_types`` / ``attribute_map``), with
  the embedded Kubernetes types (``V1Container``, ``V1Probe``, ...) from ``kubernetes.client``: an unknown field is
  reported with its exact path, leaves are type-checked (``isvc_schema_errors``). The pod parts of each component
  are assembled into a Pod (``pods``) and validated strictly too.
* The admission rules of KServe's validating webhook that a manifest can break on its own (autoscaler class vs.
  deployment mode vs. metrics, one implementation per component, blocked env vars), as read in kserve/kserve
  ``pkg/apis/serving/v1beta1/inference_service_validation.go`` (``kserve_admission_errors``).
* Pod Security "restricted" for every pod a render makes: InferenceService components and the pod templates of
  Deployments, StatefulSets, DaemonSets, Jobs, CronJobs (``assert_restricted``, ``workload_pods``).
* Images pinned to a tag other than ``latest`` (``image_errors``); no credential material (``secret_errors``).

``render_errors(docs)`` runs them all and returns one line per problem (empty = clean).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import kubernetes.client as k8s_models
import kubernetes_validate
import yaml
from k8s_tools import helm, kubectl
from kserve import models as kserve_models

K8S_VERSION = "1.32"
GPU = "nvidia.com/gpu"
ISVC_API = "serving.kserve.io/v1beta1"
MODE = "serving.kserve.io/deploymentMode"
AUTOSCALER = "serving.kserve.io/autoscalerClass"
S3_ANNOTATIONS = ("serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region",
                  "serving.kserve.io/s3-useanoncredential")


# ------------------------------------------------------------------------------------------------ rendering

def render_kustomize(path: str | os.PathLike, kubectl_bin: str | None = None) -> list[dict]:
    """``kubectl kustomize PATH`` parsed into a list of objects."""
    proc = subprocess.run([kubectl_bin or kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def helm_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``helm ARGS...`` (the binary from k8s_tools), without the caller's ``HELM_*`` settings; not checked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def isvcs(docs: list[dict]) -> dict[str, dict]:
    return objects(docs, "InferenceService")


def where(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# ------------------------------------------------------------------------------------------------ schema: KServe models

# KServe's generated models name two Kubernetes types by their Go package path.
_ALIASES = {"K8sIoApiAppsV1DeploymentStrategy": "V1DeploymentStrategy",
            "K8sIoApiAutoscalingV2HorizontalPodAutoscalerBehavior": "V2HorizontalPodAutoscalerBehavior"}
_QUANTITIES = {"ResourceQuantity", "V1beta1MetricQuantity"}  # resource.Quantity: "500m", "16Gi", 1, 0.5
_LIST = re.compile(r"list\[(.+)\]")
_DICT = re.compile(r"dict\(([^,]+), (.+)\)")


def _model(type_name: str):
    name = _ALIASES.get(type_name, type_name)
    cls = getattr(kserve_models, name, None) or getattr(k8s_models, name, None)
    return cls if cls is not None and hasattr(cls, "openapi_types") else None


def _type_ok(value, type_name: str) -> bool:
    if type_name == "str" or type_name == "datetime":
        return isinstance(value, str)
    if type_name == "bool":
        return isinstance(value, bool)
    if type_name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_name == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name in _QUANTITIES:
        return isinstance(value, (str, int, float)) and not isinstance(value, bool)
    if type_name == "object":  # IntOrString in the pod types we use (probe / container ports)
        return isinstance(value, (str, int)) and not isinstance(value, bool)
    raise KeyError(type_name)


def schema_errors(value, type_name: str = "V1beta1InferenceService", path: str = "") -> list[str]:
    """Every field of ``value`` that the KServe / Kubernetes model ``type_name`` does not define, and every leaf of
    the wrong type, as ``"<path>: <problem>"``."""
    here = path or "<root>"
    if (m := _LIST.fullmatch(type_name)) is not None:
        if not isinstance(value, list):
            return [f"{here}: expected a list ({type_name}), got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, m.group(1), f"{path}[{i}]")]
    if (m := _DICT.fullmatch(type_name)) is not None:
        if not isinstance(value, dict):
            return [f"{here}: expected a map ({type_name}), got {type(value).__name__}"]
        out = [f"{path}[{k!r}]: map key must be a string" for k in value if not isinstance(k, str)]
        return out + [e for k, v in value.items() for e in schema_errors(v, m.group(2), f"{path}[{k!r}]")]
    cls = _model(type_name)
    if cls is None:
        try:
            ok = _type_ok(value, type_name)
        except KeyError:
            return [f"{here}: type {type_name} is not in the kserve / kubernetes models: cannot check it"]
        return [] if ok else [f"{here}: expected {type_name}, got {type(value).__name__} {value!r}"]
    if not isinstance(value, dict):
        return [f"{here}: expected an object ({cls.__name__}), got {type(value).__name__}"]
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    out = []
    for key, item in value.items():
        sub = f"{path}.{key}" if path else key
        if key not in by_json:
            out.append(f"{sub}: unknown field (not in {cls.__name__})")
        elif item is not None:
            out.extend(schema_errors(item, cls.openapi_types[by_json[key]], sub))
    return out


def isvc_schema_errors(isvc: dict) -> list[str]:
    out = [] if isvc.get("apiVersion") == ISVC_API else [f"apiVersion: {isvc.get('apiVersion')!r} != {ISVC_API!r}"]
    if "status" in isvc:
        out.append("status: a manifest must not carry status")
    return out + schema_errors(isvc)


# ------------------------------------------------------------------------------------------------ schema: core objects

def core_validate(obj: dict) -> None:
    """Strict Kubernetes OpenAPI validation (raises ``kubernetes_validate.ValidationError``)."""
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


_POD_FIELDS = set(k8s_models.V1PodSpec.attribute_map.values())
_CONTAINER_FIELDS = set(k8s_models.V1Container.attribute_map.values())
_FRAMEWORKS = ("model", "huggingface", "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "pmml",
               "lightgbm", "paddle")


def components(isvc: dict) -> dict[str, dict]:
    spec = isvc.get("spec", {})
    return {name: spec[name] for name in ("predictor", "transformer", "explainer") if spec.get(name)}


def pod_spec(component: dict) -> dict:
    """The PodSpec KServe builds a component's pods from: its PodSpec fields, plus the framework container
    (``predictor.model`` etc.) as ``kserve-container`` when there is one."""
    pod = {k: copy.deepcopy(v) for k, v in component.items() if k in _POD_FIELDS}
    containers = pod.setdefault("containers", [])
    for fw in _FRAMEWORKS:
        if fw in component:
            container = {k: copy.deepcopy(v) for k, v in component[fw].items() if k in _CONTAINER_FIELDS}
            container.setdefault("name", "kserve-container")
            containers.insert(0, container)
    return pod


def all_containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


def pods(isvc: dict) -> dict[str, dict]:
    return {f"{where(isvc)}.spec.{name}": pod_spec(comp) for name, comp in components(isvc).items()}


RESTRICTED_STORAGE_CONTAINER = yaml.safe_load(
    (Path(__file__).resolve().parents[1] / "manifests" / "cluster" / "storage-initializer.yaml").read_text())


def downloads_a_model(component: dict) -> bool:
    """KServe injects its storage-initializer for a ``storageUri`` (framework ``model``) or a ``STORAGE_URI`` env."""
    if any((component.get(fw) or {}).get("storageUri") for fw in _FRAMEWORKS):
        return True
    return any(e.get("name") == "STORAGE_URI" for c in component.get("containers") or [] for e in c.get("env") or [])


def with_storage_initializer(pod: dict, storage_container: dict | None = None) -> dict:
    """``pod`` with the init container KServe's webhook injects for a ``storageUri``/``STORAGE_URI``: built bare
    (name, image, args, resources, mounts; kserve pkg/webhook/admission/pod/storage_initializer_injector.go, 0.16+
    pkg/utils/storage.go CreateInitContainerWithConfig: no securityContext), then the matching
    ClusterStorageContainer's ``spec.container`` merged over it (mergeContainerSpecs / MergeContainerWithPatch)."""
    pod = copy.deepcopy(pod)
    init = {"name": "storage-initializer", "image": "kserve/storage-initializer:v0.20.0",
            "args": ["s3://b/m/", "/mnt/models"], "terminationMessagePolicy": "FallbackToLogsOnError",
            "volumeMounts": [{"name": "kserve-provision-location", "mountPath": "/mnt/models"}]}
    for key, value in ((storage_container or {}).get("spec", {}).get("container") or {}).items():
        init[key] = copy.deepcopy(value)
    pod.setdefault("initContainers", []).append(init)
    pod.setdefault("volumes", []).append({"name": "kserve-provision-location", "emptyDir": {}})
    return pod


# ------------------------------------------------------------------------------------------- Pod Security "restricted"

_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}


def assert_restricted(pod_spec: dict, where: str) -> None:
    """Fail unless ``pod_spec`` meets the Pod Security Standards "restricted" profile (baseline included)."""
    psc = pod_spec.get("securityContext") or {}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod_spec.get(host), f"{where}: {host} is set"
    for vol in pod_spec.get("volumes") or []:
        kinds = set(vol) - {"name"}
        assert "hostPath" not in kinds, f"{where}: volume {vol.get('name')} is a hostPath"
        assert kinds <= _RESTRICTED_VOLUMES, f"{where}: volume {vol.get('name')} has type {kinds - _RESTRICTED_VOLUMES}"
    assert psc.get("runAsUser") != 0, f"{where}: pod runAsUser 0"
    assert (psc.get("seccompProfile") or {}).get("type") in (None, "RuntimeDefault", "Localhost"), \
        f"{where}: pod seccompProfile {psc.get('seccompProfile')}"
    containers = all_containers(pod_spec)
    assert containers, f"{where}: no containers"
    for c in containers:
        at = f"{where} container {c.get('name')}"
        sc = c.get("securityContext") or {}
        assert not sc.get("privileged"), f"{at}: privileged"
        assert sc.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation must be false"
        caps = sc.get("capabilities") or {}
        assert "ALL" in (caps.get("drop") or []), f"{at}: capabilities must drop ALL"
        assert set(caps.get("add") or []) <= {"NET_BIND_SERVICE"}, f"{at}: adds capabilities {caps.get('add')}"
        non_root = sc["runAsNonRoot"] if "runAsNonRoot" in sc else psc.get("runAsNonRoot")
        assert non_root is True, f"{at}: runAsNonRoot must be true (pod or container)"
        assert sc.get("runAsUser", psc.get("runAsUser")) != 0, f"{at}: runs as uid 0"
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), f"{at}: seccompProfile {seccomp!r} (pod or container)"
        assert not any(p.get("hostPort") for p in c.get("ports") or []), f"{at}: hostPort"


# ---------------------------------------------------------------------------------------------- KServe admission rules

_ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def kserve_admission_errors(isvc: dict) -> list[str]:
    """What KServe's validating webhook would refuse in this InferenceService, as far as the object alone tells."""
    out = []
    meta = isvc.get("metadata", {})
    ann = meta.get("annotations") or {}
    if not _ISVC_NAME.fullmatch(meta.get("name", "")):
        out.append(f"metadata.name {meta.get('name')!r} is not a DNS-1035 label")
    mode, klass = ann.get(MODE), ann.get(AUTOSCALER)
    if mode not in (None, "Knative", "Standard", "Serverless", "RawDeployment", "ModelMesh"):
        out.append(f"{MODE}: unknown mode {mode!r}")
    if klass is not None and klass not in ("hpa", "external", "keda"):
        out.append(f"{AUTOSCALER}: unsupported class {klass!r}")
    for name, comp in components(isvc).items():
        at = f"spec.{name}"
        impls = [fw for fw in _FRAMEWORKS if fw in comp] + (["containers"] if comp.get("containers") else [])
        if len(impls) != 1:
            out.append(f"{at}: exactly one implementation expected, found {impls}")
        for c in all_containers(pod_spec(comp)):
            if any(e.get("name") == "PYTHONPATH" for e in c.get("env") or []):
                out.append(f"{at}: container {c.get('name')} sets PYTHONPATH (blocked by KServe)")
        lo, hi = comp.get("minReplicas"), comp.get("maxReplicas")
        if lo is not None and lo < 0:
            out.append(f"{at}.minReplicas < 0")
        if lo is not None and hi is not None and hi != 0 and hi < lo:
            out.append(f"{at}.maxReplicas {hi} < minReplicas {lo}")
        metric, target, auto = comp.get("scaleMetric"), comp.get("scaleTarget"), comp.get("autoScaling") or {}
        metrics = auto.get("metrics") or []
        if mode == "Standard" and klass == "keda":
            if metric is not None:
                out.append(f"{at}.scaleMetric: not supported with KEDA (use autoScaling.metrics)")
            for i, m in enumerate(metrics):
                out.extend(f"{at}.autoScaling.metrics[{i}]: {e}" for e in _keda_metric_errors(m))
        elif mode == "Standard" and klass == "hpa":
            if (metric or "cpu") not in ("cpu", "memory"):
                out.append(f"{at}.scaleMetric {metric!r}: HPA supports cpu, memory")
            if (metric or "cpu") == "cpu" and target is not None and not 1 <= target <= 100:
                out.append(f"{at}.scaleTarget {target}: a cpu utilization percentage is 1..100")
            if any(m.get("type") != "Resource" for m in metrics):
                out.append(f"{at}.autoScaling.metrics: HPA takes Resource metrics only")
        elif mode != "Standard":  # Knative (KPA)
            if (metric or "concurrency") not in ("concurrency", "rps"):
                out.append(f"{at}.scaleMetric {metric!r}: the Knative KPA supports concurrency, rps")
            if metric == "rps" and target is not None and target < 1:
                out.append(f"{at}.scaleTarget: rps target must be >= 1")
            if comp.get("deploymentStrategy"):
                out.append(f"{at}.deploymentStrategy: only for Standard mode")
    return out


def _keda_metric_errors(m: dict) -> list[str]:
    kind = m.get("type")
    if kind == "Resource":
        res = m.get("resource")
        if not res:
            return ["type Resource without resource"]
        target = res.get("target") or {}
        if res.get("name") == "cpu" and target.get("type") != "Utilization":
            return ["cpu target type must be Utilization"]
        if res.get("name") not in ("cpu", "memory"):
            return [f"resource {res.get('name')!r} not supported"]
        return _target_errors(target)
    if kind in ("External", "PodMetric"):
        src = m.get("external" if kind == "External" else "podmetric")
        if not src:
            return [f"type {kind} without its source"]
        errs = [] if (src.get("metric") or {}).get("query") else ["empty query"]
        if (src.get("target") or {}).get("value") is None:
            errs.append("target.value (the threshold) must be set")
        return errs + _target_errors(src.get("target") or {})
    return [f"unknown KEDA metric type {kind!r} (Resource, External, PodMetric)"]


def _target_errors(target: dict) -> list[str]:
    kind = target.get("type")
    if kind == "Utilization":
        u = target.get("averageUtilization")
        return [] if isinstance(u, int) and 1 <= u <= 100 else [f"averageUtilization {u!r} not in 1..100"]
    field = {"AverageValue": "averageValue", "Value": "value"}.get(kind)
    if field is None:
        return [f"target type {kind!r} (Utilization, AverageValue, Value)"]
    return [] if target.get(field) is not None else [f"target type {kind} without {field}"]


# ------------------------------------------------------------------------------------------------ images and secrets

def image_errors(image: str | None, at: str) -> list[str]:
    if not image:
        return []  # a framework predictor takes its image from the ServingRuntime
    if "@sha256:" in image:
        return []
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return [f"{at}: image {image!r} is untagged"]
    return [f"{at}: image {image!r} uses the mutable tag latest"] if last.rsplit(":", 1)[1] == "latest" else []


_CREDENTIAL_NAME_PARTS = {"SECRET", "PASSWORD", "PASSWD", "TOKEN", "KEY", "CREDENTIAL", "CREDENTIALS", "APIKEY",
                          "AUTH", "PRIVATE"}
_CREDENTIAL_TEXT = [re.compile(p) for p in (
    r"AKIA[0-9A-Z]{16}",                      # AWS access key id
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"\bhf_[A-Za-z0-9]{30,}",                 # Hugging Face token
    r"\bgh[pousr]_[A-Za-z0-9]{30,}",          # GitHub tokens
    r"\bsk-[A-Za-z0-9_-]{20,}",               # OpenAI-style keys
    r"(?i)aws_secret_access_key\s*[=:]\s*[A-Za-z0-9/+=]{20,}",
)]


def _walk(node, path=""):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def secret_errors(docs: list[dict]) -> list[str]:
    """Credential material anywhere in a render: Secret data, literal env values with credential-like names,
    or text that has the shape of a known key / token."""
    out = []
    for obj in docs:
        at = where(obj)
        if obj.get("kind") == "Secret":
            for field in ("data", "stringData"):
                filled = [k for k, v in (obj.get(field) or {}).items() if v not in (None, "")]
                if filled:
                    out.append(f"{at}: {field} carries values for {filled}")
        for path, node in _walk(obj):
            if path.endswith(".env") or path == "env":
                for i, env in enumerate(node if isinstance(node, list) else []):
                    parts = set(re.split(r"[^A-Z0-9]+", str(env.get("name", "")).upper()))
                    if parts & _CREDENTIAL_NAME_PARTS and env.get("value") not in (None, ""):
                        out.append(f"{at}: {path}[{i}] ({env.get('name')}) has a literal value: use valueFrom."
                                   "secretKeyRef")
    text = yaml.safe_dump_all(docs)
    out += [f"credential-shaped text matching {p.pattern!r}" for p in _CREDENTIAL_TEXT if p.search(text)]
    return out


# ------------------------------------------------------------------------------------------------ all checks at once

def render_errors(docs: list[dict]) -> list[str]:
    """Everything the checks above find in one render (empty = clean)."""
    out = []
    for obj in docs:
        if obj.get("kind") == "InferenceService":
            out += [f"{where(obj)}: {e}" for e in isvc_schema_errors(obj) + kserve_admission_errors(obj)]
            for name, comp in components(obj).items():
                if downloads_a_model(comp):  # the pod as it runs: with the storage-initializer KServe injects,
                    try:  # restricted by the ClusterStorageContainer the README has the admin apply
                        assert_restricted(with_storage_initializer(pod_spec(comp), RESTRICTED_STORAGE_CONTAINER),
                                          f"{where(obj)}.spec.{name} + storage-initializer")
                    except AssertionError as e:
                        out.append(str(e))
            for at, pod in pods(obj).items():
                try:
                    core_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod})
                except kubernetes_validate.ValidationError as e:
                    out.append(f"{at} as a Pod: {_short(e)}")
        elif obj.get("kind") == "PodMonitor":  # no OpenAPI schema offline: the fields the Operator reads
            spec = obj.get("spec") or {}
            eps = spec.get("podMetricsEndpoints") or []
            sel = spec.get("selector") or {}
            if not (sel.get("matchLabels") or sel.get("matchExpressions")) or not eps or \
                    not all(e.get("port") and e.get("path", "/metrics").startswith("/") for e in eps):
                out.append(f"{where(obj)}: needs spec.selector and podMetricsEndpoints with a port name and path")
        else:
            try:
                core_validate(obj)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
                out.append(f"{where(obj)}: {_short(e)}")
    for at, pod in workload_pods(docs).items():
        try:
            assert_restricted(pod, at)
        except AssertionError as e:
            out.append(str(e))
        for c in all_containers(pod):
            out += image_errors(c.get("image"), f"{at} container {c.get('name')}")
    return out + secret_errors(docs)


def _short(e: Exception) -> str:
    path = "/".join(str(p) for p in getattr(e, "path", []) or [])
    return f"{path}: {getattr(e, 'message', str(e)).splitlines()[0]}"


# ------------------------------------------------------------------------------------------------ workload pods

_WORKLOAD_TEMPLATE = {"Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
                      "DaemonSet": ("spec", "template", "spec"), "ReplicaSet": ("spec", "template", "spec"),
                      "Job": ("spec", "template", "spec"),
                      "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"), "Pod": ("spec",)}


def workload_pods(docs: list[dict]) -> dict[str, dict]:
    """``{"Kind/name": pod spec}`` for every pod a render makes: the pod templates of the core workload kinds and
    the components of every InferenceService."""
    out = {}
    for obj in docs:
        if obj.get("kind") == "InferenceService":
            out.update(pods(obj))
        elif obj.get("kind") in _WORKLOAD_TEMPLATE:
            node = obj
            for key in _WORKLOAD_TEMPLATE[obj["kind"]]:
                node = (node or {}).get(key)
            out[where(obj)] = node or {}
    return out


# ------------------------------------------------------------------------------------------------ small readers

def main_container(component: dict) -> dict:
    """The serving container of an InferenceService component (``model`` or the first custom container)."""
    return component["model"] if "model" in component else component["containers"][0]


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def args_of(container: dict) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def flag(args: list[str], name: str) -> str | None:
    """Value of ``--name value`` or ``--name=value``."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None
