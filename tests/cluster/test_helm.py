"""The Helm chart ``helm/deepmedix``, linted and rendered by a real ``helm`` (tests/k8s_tools.py), judged with the
checkers of tests/k8s_checks.py (shared with the kustomize manifests' tests).

Every scenario (default values + the files under tests/cluster/values/) must pass ``helm lint --strict`` and
render into objects that validate strictly against Kubernetes 1.32 (core objects) and KServe's SDK models
(InferenceServices), with every pod at Pod Security "restricted", images pinned, least-privilege RBAC, and the
throwaway credentials the test passes at install nowhere but in the one Secret. The chart's refusals (no
credentials, a typo in values, ...) are checked too.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import pytest
import yaml
from k8s_checks import (
    AUTOSCALER,
    GPU,
    K8S_VERSION,
    MODE,
    S3_ANNOTATIONS,
    all_containers,
    args_of,
    core_validate,
    env_of,
    flag,
    helm_run,
    isvcs,
    main_container,
    objects,
    pods,
    render_errors,
    render_kustomize,
    where,
    workload_pods,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "deepmedix"
VALUES_DIR = Path(__file__).resolve().parent / "values"
RELEASE, NAMESPACE = "deepmedix", "dmx-lab"

# Throwaway credentials: only ever passed with --set, never in a file.
ACCESS_KEY, SECRET_KEY = "dmx-test-access-4b1e", "dmx-test-secret-9f3c27d1"
CREDS = (f"s3.accessKey={ACCESS_KEY}", f"s3.secretKey={SECRET_KEY}")
ENDPOINT = "s3.dmx-test.example:9000"

# name -> (values files, --set values)
SCENARIOS = {
    "default": ((), (*CREDS, f"s3.endpoint={ENDPOINT}")),  # the README's install: S3 wiring, no model yet
    "serving": ((), (*CREDS, f"s3.endpoint={ENDPOINT}", "serving.storageUri=s3://deepmedix/models/deepmedix-r1")),
    "minio-on": (("minio-on.yaml",), CREDS),
    "external-s3-existing-secret": (("external-s3-existing-secret.yaml",), ()),
    "vllm-gpu-standard-keda": (("vllm-gpu-standard-keda.yaml",), CREDS),
    "knative-scale-to-zero": (("knative-scale-to-zero.yaml",), CREDS),
    "hpa": (("hpa.yaml",), CREDS),
}
NAMES = list(SCENARIOS)

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())


def _args(scenario: str) -> list[str]:
    files, sets = SCENARIOS[scenario]
    out = []
    for f in files:
        out += ["--values", str(VALUES_DIR / f)]
    for s in sets:
        out += ["--set", s]
    return out


def values_of(scenario: str) -> dict:
    """The values a scenario renders with (defaults, then its files, then its --set), merged like Helm does."""
    merged = json.loads(json.dumps(VALUES))
    files, sets = SCENARIOS[scenario]
    layers = [yaml.safe_load((VALUES_DIR / f).read_text()) for f in files]
    for s in sets:
        key, _, value = s.partition("=")
        layer: dict = {}
        node = layer
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
        layers.append(layer)

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v
    for layer in layers:
        merge(merged, layer)
    return merged


def template(*args: str):
    return helm_run("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSION, *args)


@functools.lru_cache(maxsize=None)
def _rendered(scenario: str) -> str:
    proc = template(*_args(scenario))
    assert proc.returncode == 0, f"helm template ({scenario}) failed:\n{proc.stderr}"
    return proc.stdout


def raw(scenario: str) -> str:
    return _rendered(scenario)


def render(scenario: str) -> list[dict]:
    """A fresh copy of the scenario's objects (rendered once per session)."""
    return [d for d in yaml.safe_load_all(_rendered(scenario)) if d is not None]


def s3_secret_name(v: dict) -> str:
    return v["s3"]["existingSecret"] or v["s3"]["secretName"]


def s3_endpoint(v: dict) -> str:
    return v["s3"]["endpoint"] or f"{RELEASE}-minio.{NAMESPACE}.svc.cluster.local:9000"


def s3_https(v: dict) -> bool:
    if isinstance(v["s3"]["useHttps"], bool):
        return v["s3"]["useHttps"]
    return not (v["minio"]["enabled"] and not v["s3"]["endpoint"])


def split_secret(docs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the chart's S3 Secrets, everything else)."""
    mine = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == VALUES["s3"]["secretName"]]
    return mine, [d for d in docs if d not in mine]


# ================================================================================================= lint, render

@pytest.mark.parametrize("scenario", NAMES)
def test_lint_strict(scenario):
    proc = helm_run("lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--kube-version", K8S_VERSION,
                    *_args(scenario))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("scenario", NAMES)
def test_render_is_clean(scenario):
    """Strict Kubernetes 1.32 validation of core objects, KServe SDK models + admission rules for
    InferenceServices, Pod Security "restricted" for every pod, pinned images, no credential material (the chart's
    own S3 Secret is checked on its own in test_credentials_only_in_their_secret)."""
    docs = render(scenario)
    assert docs
    secrets, rest = split_secret(docs)
    for s in secrets:
        core_validate(s)
    errors = render_errors(rest)
    assert not errors, "\n".join(errors)
    for d in docs:
        assert d["metadata"].get("namespace") in (None, NAMESPACE), where(d)  # namespaced by `helm -n` only
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, where(d)


def test_renders_what_each_scenario_asks_for():
    def kinds(scenario):
        docs = render(scenario)
        return {(d["kind"], d["metadata"]["name"]) for d in docs}

    common = {("ServiceAccount", "deepmedix-serving"), ("ConfigMap", "deepmedix-s3-env"),
              ("Role", "deepmedix-pipeline-runner"), ("RoleBinding", "deepmedix-pipeline-runner"),
              *{(k, "deepmedix-kfp-launcher") for k in ("ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job")}}
    reader = {("Deployment", "deepmedix-reader"), ("Service", "deepmedix-reader"),
              ("PersistentVolumeClaim", "deepmedix-reader")}
    minio = {("Deployment", "deepmedix-minio"), ("Service", "deepmedix-minio"),
             ("PersistentVolumeClaim", "deepmedix-minio"), ("Job", "deepmedix-create-bucket")}
    secret = ("Secret", "deepmedix-s3")
    isvc, vllm = ("InferenceService", "deepmedix-r1"), ("InferenceService", "deepmedix-r1-vllm")
    # no InferenceService without a model to serve (serving.storageUri), and no ServiceAccount of KFP's own
    # (pipelineRunner.create=false: default-editor / pipeline-runner exist)
    assert kinds("default") == common | reader | {secret}
    assert kinds("serving") == common | reader | {secret, isvc}
    assert kinds("minio-on") == common | reader | minio | {secret, isvc}
    assert kinds("external-s3-existing-secret") == common
    assert kinds("vllm-gpu-standard-keda") == common | reader | {secret, isvc, vllm,
                                                                 ("PodMonitor", "deepmedix-serving")}
    assert kinds("knative-scale-to-zero") == common | {secret, isvc}
    assert kinds("hpa") == common | reader | {secret, isvc, vllm}


# ================================================================================================= credentials

@pytest.mark.parametrize("scenario", NAMES)
def test_credentials_only_in_their_secret(scenario):
    """The throwaway credentials appear in the rendered stream exactly once each, base64 in the one Secret's
    data, and nowhere else in any form; no other Secret carries data."""
    v = values_of(scenario)
    text = raw(scenario)
    docs = render(scenario)
    secrets, rest = split_secret(docs)
    other = [d for d in rest if d["kind"] == "Secret"]
    assert not other, [where(d) for d in other]
    forms = [(k, base64.b64encode(k.encode()).decode()) for k in (ACCESS_KEY, SECRET_KEY)]
    rest_text = yaml.safe_dump_all(rest)
    for literal, b64 in forms:
        assert literal not in text and literal not in rest_text
        assert b64 not in rest_text
    if v["s3"]["existingSecret"]:
        assert secrets == [] and "accessKey=" not in " ".join(SCENARIOS[scenario][1])
        return
    (secret,) = secrets
    assert secret["type"] == "Opaque" and "stringData" not in secret
    assert {k: base64.b64decode(x).decode() for k, x in secret["data"].items()} == {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    for _, b64 in forms:
        assert text.count(b64) == 1
    ann = secret["metadata"]["annotations"]
    assert set(S3_ANNOTATIONS) <= set(ann)
    assert ann["serving.kserve.io/s3-endpoint"] == s3_endpoint(v) and "://" not in s3_endpoint(v)
    assert ann["serving.kserve.io/s3-usehttps"] == ("1" if s3_https(v) else "0")
    assert ann["serving.kserve.io/s3-region"] == v["s3"]["region"]
    assert ann["serving.kserve.io/s3-useanoncredential"] == "false"


def test_values_files_hold_no_credentials():
    for f in [CHART / "values.yaml", *VALUES_DIR.glob("*.yaml")]:
        s3 = (yaml.safe_load(f.read_text()) or {}).get("s3", {})
        assert not s3.get("accessKey") and not s3.get("secretKey"), f


# ================================================================================================= pods

@pytest.mark.parametrize("scenario", NAMES)
def test_every_pod_hardened(scenario):
    """Beyond "restricted" (render_errors checks that): read-only root filesystems with an emptyDir /tmp, memory
    limits, no API token in pods that never call the API, only the chart's pinned images."""
    v = values_of(scenario)
    pinned = set(v["images"].values())
    docs = render(scenario)
    all_pods = workload_pods(docs)
    assert all_pods
    for at, pod in all_pods.items():
        volumes = {vol["name"]: vol for vol in pod.get("volumes", [])}
        if at == "Job/deepmedix-kfp-launcher":  # merges into kfp-launcher through the API: its token, its Role
            assert pod["automountServiceAccountToken"] is True and pod["serviceAccountName"] == "deepmedix-kfp-launcher"
        elif not at.startswith("InferenceService/"):
            assert pod.get("automountServiceAccountToken") is False, at
            assert pod["securityContext"]["runAsNonRoot"] is True, at
        for c in all_containers(pod):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True, (at, c.get("name"))
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], (at, c.get("name"))
            assert c["resources"]["limits"]["memory"], (at, c.get("name"))
            if c.get("image"):  # the vLLM predictor's image comes from the ServingRuntime
                assert c["image"] in pinned, (at, c["image"])


def test_checker_judges_workload_pods():
    """render_errors looks into Deployments and Jobs as it does into InferenceServices (init containers too)."""
    docs = render("minio-on")
    assert render_errors(split_secret(docs)[1]) == []
    deps, jobs = objects(docs, "Deployment"), objects(docs, "Job")
    deps["deepmedix-minio"]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    deps["deepmedix-reader"]["spec"]["template"]["spec"]["initContainers"][0]["image"] = "busybox:latest"
    deps["deepmedix-reader"]["spec"]["template"]["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    jobs["deepmedix-create-bucket"]["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "capabilities"] = {"add": ["SYS_ADMIN"]}
    errors = "\n".join(render_errors(split_secret(docs)[1]))
    assert "Deployment/deepmedix-minio: pod runAsUser 0" in errors
    assert "Deployment/deepmedix-reader container wait-for-study: image 'busybox:latest' uses the mutable tag" in errors
    assert "Deployment/deepmedix-reader: volume h is a hostPath" in errors
    assert "Job/deepmedix-create-bucket container create-bucket: capabilities must drop ALL" in errors


def test_pinned_images():
    assert VALUES["images"] == {"serving": "ghcr.io/deepmedix/deepmedix-serving:0.1.0",
                                "data": "ghcr.io/deepmedix/deepmedix-data:0.1.0",
                                "minio": "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"}


# ================================================================================================= RBAC

def _rules(secret: str, argo: bool = False) -> list[dict]:
    """Exactly what deepmedix.cluster uses (deploy: get/create/update (replace) the InferenceService, read its
    Deployment; trainjob: get/create/delete the TrainJob, list its pods, read their logs) plus what KFP's driver
    and launcher read; with pipelineRunner.argo, the Argo executor's task results."""
    rules = [
        {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"], "verbs": ["get", "create", "update"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"]},
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["get", "create", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get"]},
    ]
    if argo:
        rules.append({"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]})
    return rules


@pytest.mark.parametrize("scenario", NAMES)
def test_pipeline_runner_rbac_is_least_privilege(scenario):
    v = values_of(scenario)
    docs = render(scenario)
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles, bindings = objects(docs, "Role"), objects(docs, "RoleBinding")
    assert list(roles) == list(bindings) == ["deepmedix-pipeline-runner", "deepmedix-kfp-launcher"]
    # the launcher merge hook: read both ConfigMaps, update KFP's, create it only when KFP made none
    assert roles["deepmedix-kfp-launcher"]["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher", "deepmedix-kfp-launcher"],
         "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"], "verbs": ["update"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}]
    rules = roles["deepmedix-pipeline-runner"]["rules"]
    assert rules == _rules(s3_secret_name(v), bool(v.get("pipelineRunner", {}).get("argo")))
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), rule
        assert not ({"escalate", "bind", "impersonate", "deletecollection"} & set(rule["verbs"])), rule
    binding = bindings["deepmedix-pipeline-runner"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "deepmedix-pipeline-runner"}
    runner = v["pipelineRunner"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": runner, "namespace": NAMESPACE}]
    assert (runner in objects(docs, "ServiceAccount")) == v["pipelineRunner"]["create"]


# ================================================================================================= S3 + KFP wiring

# The fields KFP's launcher reads from `providers` (kubeflow/pipelines backend/src/v2/config/s3.go:
# S3ProviderConfig / S3ProviderDefault / S3Credentials / S3SecretRef).
KFP_S3_DEFAULT = {"endpoint", "credentials", "region", "disableSSL", "forcePathStyle", "maxRetries"}
KFP_S3_CREDENTIALS = {"fromEnv", "secretRef"}
KFP_S3_SECRET_REF = {"secretName", "accessKeyKey", "secretKeyKey"}


@pytest.mark.parametrize("scenario", NAMES)
def test_kfp_launcher_configmap(scenario):
    v = values_of(scenario)
    cm = objects(render(scenario), "ConfigMap")["deepmedix-kfp-launcher"]  # merged into KFP's by the hook Job
    root = cm["data"]["defaultPipelineRoot"]
    assert root.startswith("s3://")
    assert root == (v["kfp"]["pipelineRoot"] or f"s3://{v['s3']['bucket']}/pipeline-root")
    providers = yaml.safe_load(cm["data"]["providers"])
    assert set(providers) == {"s3"} and set(providers["s3"]) == {"default"}
    default = providers["s3"]["default"]
    assert set(default) <= KFP_S3_DEFAULT
    assert set(default["credentials"]) <= KFP_S3_CREDENTIALS and set(default["credentials"]["secretRef"]) <= \
        KFP_S3_SECRET_REF
    assert default["endpoint"] == s3_endpoint(v)
    assert default["disableSSL"] is (not s3_https(v))
    assert default["region"] == v["s3"]["region"]
    assert default["credentials"] == {"fromEnv": False, "secretRef": {
        "secretName": s3_secret_name(v), "accessKeyKey": "AWS_ACCESS_KEY_ID", "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}}
    env = objects(render(scenario), "ConfigMap")["deepmedix-s3-env"]["data"]
    assert env == {"S3_ENDPOINT": s3_endpoint(v), "S3_USE_HTTPS": "1" if s3_https(v) else "0",
                   "AWS_REGION": v["s3"]["region"], "DEEPMEDIX_BUCKET": v["s3"]["bucket"],
                   "DEEPMEDIX_S3_SECRET": s3_secret_name(v)}


def test_kfp_launcher_is_merged_into_kfps_own_by_default():
    """Default (merge): the wanted data in deepmedix-kfp-launcher and a post-install/upgrade hook Job that merges it
    into the namespace's kfp-launcher (the profile controller's or KFP standalone's; the chart never owns it).
    create: the chart owns kfp-launcher; none: nothing."""
    docs = render("default")
    (job,) = [d for d in docs if d["kind"] == "Job"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["deepmedix", "kfp-launcher", "--from", "deepmedix-kfp-launcher", "--namespace", NAMESPACE]
    assert "kfp-launcher" not in objects(docs, "ConfigMap")
    for mode, names in (("create", {"kfp-launcher"}), ("none", set())):
        proc = template(*_args("default"), "--set", f"kfp.launcherConfigMap.mode={mode}")
        assert proc.returncode == 0, proc.stderr
        out = [d for d in yaml.safe_load_all(proc.stdout) if d]
        assert {n for n in objects(out, "ConfigMap") if "launcher" in n} == names
        assert not [d for d in out if d["kind"] == "Job"]


@pytest.mark.parametrize("scenario", NAMES)
def test_serving_service_account(scenario):
    v = values_of(scenario)
    docs = render(scenario)
    sa = objects(docs, "ServiceAccount")["deepmedix-serving"]
    assert sa["automountServiceAccountToken"] is False
    assert sa["secrets"] == [{"name": s3_secret_name(v)}]
    assert set(S3_ANNOTATIONS) <= set(sa["metadata"]["annotations"])
    for isvc in isvcs(docs).values():
        for name, pod in pods(isvc).items():
            assert pod["serviceAccountName"] == "deepmedix-serving", name


# ================================================================================================= serving

def test_no_model_no_inferenceservice():
    """The README's install serves nothing until a model exists (the pipeline's deploy step serves its own);
    NOTES says so."""
    assert not isvcs(render("default"))
    assert "Model: none served by this release" in helm_run("install", "--dry-run=client", RELEASE, str(CHART), "-n",
                                                            NAMESPACE, *_args("default")).stdout


def test_default_predictor_is_the_manifests_predictor():
    """The chart's InferenceService runs the very container of manifests/ (dev overlay), its model URI as a folder."""
    chart = isvcs(render("serving"))["deepmedix-r1"]["spec"]["predictor"]
    kust = isvcs(render_kustomize(ROOT / "manifests" / "overlays" / "dev"))["deepmedix-r1"]["spec"]["predictor"]
    c, k = chart["containers"][0], kust["containers"][0]
    assert set(c) == set(k)
    for field in k:
        if field == "env":  # only STORAGE_URI differs (the chart's default bucket layout is the same)
            assert env_of(c) == env_of(k)
        else:
            assert c[field] == k[field], field
    assert chart["volumes"] == kust["volumes"] and chart["timeout"] == kust["timeout"]
    assert chart["serviceAccountName"] == kust["serviceAccountName"]


def test_default_serving_is_standard_with_hpa_on_cpu():
    """Standard mode (no Knative needed; Knative refuses GPU placement without its podspec feature flags) with
    KServe's own HPA (no KEDA needed)."""
    isvc = isvcs(render("serving"))["deepmedix-r1"]
    assert isvc["metadata"]["annotations"][MODE] == "Standard" and isvc["metadata"]["annotations"][AUTOSCALER] == "hpa"
    pred = isvc["spec"]["predictor"]
    c = pred["containers"][0]
    assert args_of(c)[:3] == ["python", "-m", "serving.server"]
    assert flag(args_of(c), "--name") == "deepmedix-r1" and flag(args_of(c), "--model") == "/mnt/models"
    assert env_of(c)["STORAGE_URI"] == "s3://deepmedix/models/deepmedix-r1/" and c["env"][0]["name"] == "STORAGE_URI"
    assert pred["scaleMetric"] == "cpu" and pred["minReplicas"] == 1
    assert GPU not in c["resources"]["limits"] and "nodeSelector" not in pred and "tolerations" not in pred
    assert pred["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}  # Standard: pod level too


def test_knative_scale_to_zero():
    isvc = isvcs(render("knative-scale-to-zero"))["deepmedix-r1"]
    pred = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"][MODE] == "Knative"
    assert (pred["minReplicas"], pred["maxReplicas"], pred["scaleMetric"], pred["scaleTarget"]) == (
        0, 2, "concurrency", 8)
    assert "autoScaling" not in pred


def test_standard_keda_vllm_on_the_gpu_pool():
    v = values_of("vllm-gpu-standard-keda")
    all_isvcs = isvcs(render("vllm-gpu-standard-keda"))
    assert set(all_isvcs) == {"deepmedix-r1", "deepmedix-r1-vllm"}
    for name, isvc in all_isvcs.items():
        ann = isvc["metadata"]["annotations"]
        assert (ann[MODE], ann[AUTOSCALER]) == ("Standard", "keda"), name
        pred = isvc["spec"]["predictor"]
        assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 4)
        assert "scaleMetric" not in pred and "scaleTarget" not in pred
        res = main_container(pred)["resources"]
        assert res["limits"][GPU] == res["requests"][GPU] == "1", name
        assert pred["nodeSelector"] == v["gpuPool"]["nodeSelector"]
        assert pred["tolerations"] == v["gpuPool"]["tolerations"]
        assert pred["securityContext"]["runAsNonRoot"] is True and pred["securityContext"]["fsGroup"] == 1000
        external = [m["external"]["metric"] for m in pred["autoScaling"]["metrics"] if m["type"] == "External"]
        assert external and external[0]["serverAddress"] == v["serving"]["keda"]["prometheusAddress"]
        assert f'namespace="{NAMESPACE}"' in external[0]["query"] and f"{name}-predictor-" in external[0]["query"]
    vllm = all_isvcs["deepmedix-r1-vllm"]["spec"]
    model = vllm["predictor"]["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and "--backend=vllm" in model["args"]
    assert model["storageUri"] == "s3://deepmedix/models/deepmedix-r1/"
    assert "vllm:num_requests_waiting" in vllm["predictor"]["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
    tr = vllm["transformer"]
    assert args_of(tr["containers"][0])[:3] == ["python", "-m", "serving.transformer"]
    assert "nodeSelector" not in tr and GPU not in tr["containers"][0]["resources"]["limits"]
    assert [m["type"] for m in tr["autoScaling"]["metrics"]] == ["Resource"]


def test_standard_hpa():
    for name, isvc in isvcs(render("hpa")).items():
        assert isvc["metadata"]["annotations"][AUTOSCALER] == "hpa"
        for comp in ("predictor", "transformer"):
            spec = isvc["spec"].get(comp)
            if spec:
                assert (spec["scaleMetric"], spec["scaleTarget"]) == ("cpu", 70), (name, comp)
                assert "autoScaling" not in spec


# ================================================================================================= MinIO, reader

def test_minio():
    v = values_of("minio-on")
    docs = render("minio-on")
    dep = objects(docs, "Deployment")["deepmedix-minio"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
    assert args_of(c)[:3] == ["minio", "server", "/data"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    assert refs == {"MINIO_ROOT_USER": {"name": "deepmedix-s3", "key": "AWS_ACCESS_KEY_ID"},
                    "MINIO_ROOT_PASSWORD": {"name": "deepmedix-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data", "/tmp"}
    assert dep["spec"]["strategy"]["type"] == "Recreate" and dep["spec"]["replicas"] == 1
    pvc = objects(docs, "PersistentVolumeClaim")["deepmedix-minio"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "20Gi" and pvc["spec"]["storageClassName"] == "standard"
    svc = objects(docs, "Service")["deepmedix-minio"]
    assert svc["spec"]["ports"][0]["port"] == 9000
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # every client points at it, over plain HTTP
    assert s3_endpoint(v) == f"deepmedix-minio.{NAMESPACE}.svc.cluster.local:9000" and not s3_https(v)
    job = objects(docs, "Job")["deepmedix-create-bucket"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    jc = job["spec"]["template"]["spec"]["containers"][0]
    assert env_of(jc)["DEEPMEDIX_BUCKET"] == "deepmedix-lab" and env_of(jc)["S3_USE_HTTPS"] == "0"
    assert "deepmedix.store import s3_client" in args_of(jc)[2]
    compile(args_of(jc)[2], "create-bucket", "exec")  # the inline program is valid Python


def test_reader_app():
    docs = render("default")
    dep = objects(docs, "Deployment")["deepmedix-reader"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] == VALUES["images"]["data"]
    assert args_of(c) == ["deepmedix", "reader", "serve", "--db", "/data/study.db", "--host", "0.0.0.0",
                          "--port", "8000"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/static/reader.css"
    (init,) = spec["initContainers"]
    assert init["name"] == "wait-for-study" and args_of(init)[-1] == "/data/study.db"
    compile(args_of(init)[2], "wait-for-study", "exec")
    # `deepmedix reader create`, exec'd in the init container, reaches the store with the chart's settings
    assert {"S3_ENDPOINT", "S3_USE_HTTPS", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= \
        set(env_of(init))
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    claim = {vol["name"]: vol for vol in spec["volumes"]}["data"]["persistentVolumeClaim"]["claimName"]
    assert claim in objects(docs, "PersistentVolumeClaim")
    svc = objects(docs, "Service")["deepmedix-reader"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http" and svc["spec"]["type"] == "ClusterIP"


def test_reader_cli_matches_the_chart():
    """The flags the chart passes exist on the real CLI."""
    from typer.testing import CliRunner

    from deepmedix.cli import app

    out = CliRunner().invoke(app, ["reader", "serve", "--help"], terminal_width=200).output
    for opt in ("--db", "--host", "--port", "--secure-cookie"):
        assert opt in out, opt
    out = CliRunner().invoke(app, ["reader", "create", "--help"], terminal_width=200).output
    for opt in ("--db", "--data", "--predictions", "--reader"):
        assert opt in out, opt


# ================================================================================================= refusals

def _fails(*args: str) -> str:
    proc = template(*args)
    assert proc.returncode != 0, f"rendered although it should not:\n{proc.stdout[:400]}"
    return proc.stderr


def test_refuses_to_install_without_credentials():
    err = _fails("--set", f"s3.endpoint={ENDPOINT}")
    assert "S3 credentials are required and the chart ships none" in err
    assert "s3.existingSecret" in err
    err = _fails("--set", f"s3.endpoint={ENDPOINT}", "--set", f"s3.accessKey={ACCESS_KEY}")  # half is not enough
    assert "S3 credentials are required" in err
    # `helm lint` renders in lint mode, where Helm turns `fail` into a logged message rather than an error (so that
    # a chart with required values can be linted at all): it reports the refusal without failing on it.
    proc = helm_run("lint", "--strict", str(CHART), "--set", f"s3.endpoint={ENDPOINT}")
    assert "S3 credentials are required" in proc.stdout + proc.stderr


def test_refuses_contradictions():
    assert "not both" in _fails(*_args("default"), "--set", "s3.existingSecret=mine")
    assert "s3.endpoint is required" in _fails("--set", CREDS[0], "--set", CREDS[1])
    assert "needs serving.deploymentMode=Knative" in _fails(*_args("hpa"), "--set", "serving.minReplicas=0")
    assert "maxReplicas must be >=" in _fails(*_args("default"), "--set", "serving.minReplicas=3")
    assert "at least 8" in _fails(*_args("minio-on"), "--set", "s3.secretKey=short")


@pytest.mark.parametrize("bad, message", [
    ("serving.replcas=2", "additional properties 'replcas' not allowed"),
    ("sevring.gpus=1", "additional properties 'sevring' not allowed"),
    ("images.serving=ghcr.io/deepmedix/deepmedix-serving:latest", "/images/serving"),
    ("images.data=ghcr.io/deepmedix/deepmedix-data", "/images/data"),
    ("serving.deploymentMode=Serverless", "/serving/deploymentMode"),
    ("serving.autoscaler=kpa", "/serving/autoscaler"),
    ("s3.endpoint=https://s3.example.org", "/s3/endpoint"),
    ("podSecurity.runAsUser=0", "/podSecurity/runAsUser"),
    ("serving.hpa.scaleTarget=150", "/serving/hpa/scaleTarget"),
])
def test_schema_rejects_bad_values(bad, message):
    err = _fails(*_args("default"), "--set", bad)
    assert "don't meet the specifications of the schema" in err and message in err, err


def test_schema_covers_every_value():
    """Every key of values.yaml is declared in values.schema.json, and every declared object is closed."""
    def closed(node, path="$"):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                assert node.get("additionalProperties") is False, path
            for k, sub in node.items():
                closed(sub, f"{path}.{k}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                closed(sub, f"{path}[{i}]")

    def resolve(node):
        while "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        return node

    def declared(values, node, path):
        node = resolve(node)
        if isinstance(values, dict) and "properties" in node:
            for k, sub in values.items():
                assert k in node["properties"], f"{path}.{k} is not in values.schema.json"
                declared(sub, node["properties"][k], f"{path}.{k}")

    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    closed(SCHEMA)
    declared(VALUES, SCHEMA, "values")


# ================================================================================================= docs

def test_readme_documents_install():
    readme = (CHART / "README.md").read_text()
    assert "helm install" in readme and "s3.existingSecret" in readme and "minio.enabled=true" in readme
    assert "kubectl -n" in readme and "create secret generic" in readme
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", *S3_ANNOTATIONS):
        assert key in readme, key
    for key in _leaf_paths(VALUES):
        assert f"`{key}`" in readme, f"values table lacks {key}"


def _leaf_paths(values: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("nodeSelector", "resources", "requests", "limits"):
            out += _leaf_paths(v, path + ".")
        else:
            out.append(path)
    return out


def readme_install_flags() -> list[str]:
    """The `--set` flags of the README's first `helm install` (the documented Kubeflow-profile install)."""
    import re
    import shlex

    readme = (CHART / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "helm install deepmedix" in b)
    command = block.split("\n\n")[0].split("deepmedix doctor")[0].replace("\\\n", " ")
    words = shlex.split(command)
    return [w for i, w in enumerate(words) if words[i - 1] in ("--set", "--set-string") or w.startswith("--set")]


def test_the_documented_install_sends_artifacts_to_the_clusters_s3():
    """`helm template` with the README's flags: the launcher data it merges carries the S3 provider and the
    documented endpoint (KFP's launcher would otherwise send s3:// artifacts to AWS), and the README's providers
    block is that data."""
    flags = readme_install_flags()
    assert "s3.existingSecret=deepmedix-s3" in flags
    proc = template(*flags)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    cm = objects(docs, "ConfigMap")["deepmedix-kfp-launcher"]["data"]
    s3 = yaml.safe_load(cm["providers"])["s3"]["default"]
    assert s3["endpoint"] == "seaweedfs.kubeflow.svc.cluster.local:8333" and s3["disableSSL"] is True
    assert s3["credentials"]["secretRef"]["secretName"] == "deepmedix-s3"
    assert cm["defaultPipelineRoot"] == "s3://deepmedix/pipeline-root"
    readme = (CHART / "README.md").read_text()
    shown = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert yaml.safe_load(shown["providers"]) == yaml.safe_load(cm["providers"])
    assert not isvcs(docs) and "ServiceAccount" not in {d["kind"] for d in docs if d["metadata"]["name"] ==
                                                          "default-editor"}


def test_readme_rbac_is_the_roles():
    """The README's RBAC paragraph names each rule of the rendered Role, resource and verbs, and nothing else."""
    import re

    readme = " ".join((CHART / "README.md").read_text().split())
    para = readme.split("**Pipeline runner RBAC**", 1)[1].split("The launcher merge hook", 1)[0]
    said = {(m.group(1), tuple(m.group(2).split(", "))) for m in re.finditer(r"`([a-z/]+)`[^(`]*\(([a-z, ]+)\)", para)}
    rules = objects(render("hpa"), "Role")["deepmedix-pipeline-runner"]["rules"]  # hpa: pipelineRunner.argo
    assert said == {(r["resources"][0], tuple(r["verbs"])) for r in rules}


def test_predictor_pods_are_restricted_with_the_storage_initializer_kserve_injects(monkeypatch):
    """render_errors judges each InferenceService pod as it runs, KServe's storage-initializer included: clean
    with manifests/cluster/storage-initializer.yaml applied, not with KServe's default ClusterStorageContainer
    (no securityContext: kserve config/storagecontainers/default.yaml)."""
    import k8s_checks

    docs = split_secret(render("vllm-gpu-standard-keda"))[1]
    assert render_errors(docs) == []
    monkeypatch.setattr(k8s_checks, "RESTRICTED_STORAGE_CONTAINER", None)
    errors = render_errors(docs)
    assert any("deepmedix-r1.spec.predictor + storage-initializer" in e for e in errors), errors
    assert any("deepmedix-r1-vllm.spec.predictor + storage-initializer" in e for e in errors), errors
