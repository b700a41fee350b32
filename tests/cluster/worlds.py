"""Clusters for the stand-in API server (``kube_stub.py``): the objects a standard install holds, in the shapes
the released controllers write, and ``KubeStub`` to run one as a process with a kubeconfig pointing at it."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
NS = "team-a"
TOKEN = "stub-token"


def crd(group: str, kind: str, plural: str, versions=("v1",), scope="Namespaced", schema: dict | None = None,
        labels: dict | None = None) -> dict:
    schema = schema or {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}", "labels": labels or {}},
            "spec": {"group": group, "scope": scope, "names": {"kind": kind, "plural": plural},
                     "versions": [{"name": v, "served": True, "storage": i == 0,
                                   "schema": {"openAPIV3Schema": schema}} for i, v in enumerate(versions)]}}


def trainjob_crd(runtime_patches: bool = True) -> dict:
    """Kubeflow Trainer's TrainJob CRD, its spec's fields only as deep as pruning needs: 2.3 added
    ``spec.runtimePatches``; an older CRD prunes it."""
    free = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    spec = {"runtimeRef": free, "trainer": free, "initializer": free, "labels": free, "annotations": free,
            "managedBy": {"type": "string"}, "suspend": {"type": "boolean"}}
    if runtime_patches:
        spec["runtimePatches"] = {"type": "array", "items": free}
    else:
        spec["podTemplateOverrides"] = {"type": "array", "items": free}
    schema = {"type": "object", "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                               "metadata": {"type": "object"},
                                               "spec": {"type": "object", "properties": spec},
                                               "status": free}}
    return crd("trainer.kubeflow.org", "TrainJob", "trainjobs", ("v1alpha1",), schema=schema)


def deployment(name: str, ns: str, image: str) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "manager", "image": image}]}}},
            "status": {"replicas": 1, "availableReplicas": 1}}


def configmap(name: str, ns: str, data: dict, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns,
                                                                 "labels": labels or {}}, "data": data}


def launcher_providers(endpoint: str, secret: str = "deepmedix-s3", bucket: str = "deepmedix") -> str:
    return yaml.safe_dump({"s3": {"default": {"endpoint": endpoint, "disableSSL": True, "region": "us-east-1",
                                              "credentials": {"fromEnv": False, "secretRef": {
                                                  "secretName": secret, "accessKeyKey": "AWS_ACCESS_KEY_ID",
                                                  "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}}}}})


def gpu_node(name: str, labels: dict | None = None, taints: list | None = None, gpus: str = "8") -> dict:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.present": "true", **(labels or {})}},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
                     if taints is None else taints},
            "status": {"allocatable": {"cpu": "64", "memory": "1Ti", "nvidia.com/gpu": gpus}}}


def standard_install(s3_endpoint: str = "seaweedfs.kubeflow:8333", ns: str = NS) -> dict:
    """A well-configured cluster: Kubeflow multi-user with KFP 2.17, Trainer 2.3 with ``torch-distributed``,
    KServe 0.21 (Standard by default) with a restricted storage-initializer, Knative with the podspec flags,
    KEDA + Prometheus Operator, a restricted profile namespace with the S3 Secret and a complete ``kfp-launcher``,
    two GPU nodes."""
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "app.kubernetes.io/part-of": "kubeflow-profile"}}},
        deployment("ml-pipeline", "kubeflow", "ghcr.io/kubeflow/kfp-api-server:2.17.0"),
        configmap("kfp-launcher", ns, {"defaultPipelineRoot": "s3://deepmedix/pipeline-root",
                                       "providers": launcher_providers(s3_endpoint)}),
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "deepmedix-s3", "namespace": ns},
         "type": "Opaque", "data": {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}},
        trainjob_crd(),
        crd("trainer.kubeflow.org", "ClusterTrainingRuntime", "clustertrainingruntimes", ("v1alpha1",),
            scope="Cluster"),
        {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
         "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
         "spec": {"mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}}}},
        deployment("kubeflow-trainer-controller-manager", "kubeflow-system",
                   "ghcr.io/kubeflow/trainer/trainer-controller-manager:v2.3.0"),
        crd("serving.kserve.io", "InferenceService", "inferenceservices", ("v1beta1",)),
        crd("serving.kserve.io", "ClusterStorageContainer", "clusterstoragecontainers", ("v1alpha1",),
            scope="Cluster"),
        {"apiVersion": "serving.kserve.io/v1alpha1", "kind": "ClusterStorageContainer",
         "metadata": {"name": "default"},
         "spec": {"container": {"name": "storage-initializer", "image": "kserve/storage-initializer:v0.21.0",
                                "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                                    "capabilities": {"drop": ["ALL"]},
                                                    "seccompProfile": {"type": "RuntimeDefault"}}},
                  "supportedUriFormats": [{"prefix": "s3://"}, {"prefix": "gs://"}]}},
        deployment("kserve-controller-manager", "kserve", "kserve/kserve-controller:v0.21.0"),
        configmap("inferenceservice-config", "kserve", {"deploy": json.dumps({"defaultDeploymentMode": "Standard"})}),
        crd("serving.knative.dev", "Service", "services", ("v1",)),
        configmap("config-features", "knative-serving", {"kubernetes.podspec-nodeselector": "enabled",
                                                         "kubernetes.podspec-tolerations": "enabled"}),
        crd("keda.sh", "ScaledObject", "scaledobjects", ("v1alpha1",)),
        crd("monitoring.coreos.com", "PodMonitor", "podmonitors", ("v1",)),
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
         "metadata": {"name": "deepmedix-serving", "namespace": ns},
         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/part-of": "deepmedix"}},
                  "podMetricsEndpoints": [{"port": "http1", "path": "/metrics"}]}},
        gpu_node("gpu-a"), gpu_node("gpu-b"),
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "cpu-a", "labels": {}}, "spec": {},
         "status": {"allocatable": {"cpu": "16", "memory": "64Gi"}}},
    ]
    return {"objects": objects, "controllers": {"InferenceService": {"ready_after": 2},
                                                "TrainJob": {"finish_after": 2, "outcome": "Complete"}}}


RUNNER_TOKEN = "runner-token"


@functools.lru_cache(maxsize=None)
def chart_role(role: str = "deepmedix-pipeline-runner") -> tuple:
    """The rules of a Role the Helm chart renders (its default values), as the stand-in server enforces them."""
    from k8s_checks import helm_run

    out = helm_run("template", "deepmedix", str(HERE.parents[1] / "helm" / "deepmedix"), "-n", NS, "--set",
                   "s3.accessKey=a", "--set", "s3.secretKey=b", "--set", "s3.endpoint=s3.example:9000")
    assert out.returncode == 0, out.stderr
    (r,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Role" and d["metadata"]["name"] == role]
    return tuple(json.dumps(rule, sort_keys=True) for rule in r["rules"])


def as_runner(world: dict, role: str = "deepmedix-pipeline-runner") -> dict:
    """``world`` where the kubeconfig's identity is the pipeline runner with only the chart's Role ``role``."""
    w = copy.deepcopy(world)
    w["rbac"] = {RUNNER_TOKEN: {"user": f"system:serviceaccount:{NS}:default-editor",
                                "rules": [json.loads(r) for r in chart_role(role)]}}
    w["kubeconfig_token"] = RUNNER_TOKEN
    return w


def without(world: dict, kind: str, name: str | None = None, namespace: str | None = None) -> dict:
    w = copy.deepcopy(world)
    w["objects"] = [o for o in w["objects"] if not (
        o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
        and (namespace is None or o["metadata"].get("namespace") == namespace))]
    return w


def edit(world: dict, kind: str, name: str, fn) -> dict:
    """A copy of ``world`` with ``fn(obj)`` applied to the object ``kind``/``name``."""
    w = copy.deepcopy(world)
    for o in w["objects"]:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            fn(o)
    return w


class KubeStub:
    """The stand-in API server as a process; ``kubeconfig`` points a client at it (with ``TOKEN``)."""

    def __init__(self, url: str, kubeconfig: Path):
        self.url, self.kubeconfig = url, kubeconfig

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.load(r)

    def requests(self, method: str | None = None, contains: str = "") -> list[dict]:
        return [r for r in self.get("/_stub/requests") if (method is None or r["method"] == method)
                and contains in r["path"]]

    def objects(self, kind: str) -> list[dict]:
        return [o for o in self.get("/_stub/objects") if o["kind"] == kind]


@contextlib.contextmanager
def kube_stub(world: dict, tmp_path: Path, monkeypatch=None):
    """Run the stand-in API server with ``world``; yield a ``KubeStub``. With ``monkeypatch``, ``KUBECONFIG``
    points at it for this test (and no in-cluster config is seen)."""
    from conftest import server_process

    tmp_path.mkdir(parents=True, exist_ok=True)
    wf = tmp_path / "world.yaml"
    wf.write_text(yaml.safe_dump(world))
    with server_process(HERE / "kube_stub.py", ["--world", str(wf), "--token", TOKEN], tmp_path,
                        ready_path="/_stub/objects") as url:
        kc = tmp_path / "kubeconfig"
        kc.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "stub",
            "clusters": [{"name": "stub", "cluster": {"server": url}}],
            "users": [{"name": "stub", "user": {"token": world.get("kubeconfig_token", TOKEN)}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub", "namespace": NS}}]}))
        if monkeypatch is not None:
            monkeypatch.setenv("KUBECONFIG", str(kc))
            monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            monkeypatch.setenv("POD_NAMESPACE", NS)
        yield KubeStub(url, kc)


def env_with(kc: Path, **extra) -> dict:
    env = dict(os.environ, KUBECONFIG=str(kc), POD_NAMESPACE=NS, **extra)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env
