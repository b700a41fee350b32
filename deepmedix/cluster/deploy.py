"""Deploy: create or replace the InferenceService that serves a model folder from its ``s3://`` URI, and wait
until KServe says it is Ready.

The object is the one in ``manifests/base/inferenceservice.yaml`` (a test keeps the two in step): the DeepMedix
predictor (``python -m serving.server``) as a custom container, its model from ``STORAGE_URI`` (the
storage-initializer downloads it with the credentials of the ServiceAccount's S3 Secret), Pod Security
"restricted".
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from deepmedix.cluster.k8s import ClusterError, api, condition, current_namespace, wait_for

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
SERVING_IMAGE = "ghcr.io/deepmedix/deepmedix-serving:0.1.0"


@dataclass
class Serving:
    """How the predictor runs. ``deployment_mode``: ``Standard`` (a Deployment; autoscaling by the cluster's
    HPA/KEDA settings; needs no Knative, whatever mode the cluster's inferenceservice-config defaults to) or
    ``Knative`` (KPA on concurrency, can scale to zero; GPU
    placement needs Knative's ``kubernetes.podspec-nodeselector`` and ``-tolerations`` features, off by default:
    ``deepmedix doctor`` checks them)."""
    image: str = SERVING_IMAGE
    service_account: str = "deepmedix-serving"
    deployment_mode: str = "Standard"
    min_replicas: int = 1
    max_replicas: int = 2
    scale_target: int = 8  # concurrent requests per replica (Knative)
    gpus: int = 0
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    max_batch_size: int = 8
    max_wait_ms: int = 20
    max_queue: int = 64
    request_timeout_s: int = 120
    max_new_tokens: int = 512
    cpu: str = "4"
    memory: str = "16Gi"


def inferenceservice_manifest(name: str, namespace: str, storage_uri: str, s: Serving | None = None) -> dict:
    s = s or Serving()
    if not storage_uri.startswith(("s3://", "pvc://", "gs://", "hf://")):
        raise ClusterError(f"storage_uri: {storage_uri!r} is not a URI KServe's storage-initializer can fetch "
                           "(s3://, pvc://, gs://, hf://)")
    if s.deployment_mode not in ("Knative", "Standard"):
        raise ClusterError(f"deployment_mode: {s.deployment_mode!r} is not Knative or Standard")
    if storage_uri.startswith(("s3://", "gs://")) and not storage_uri.endswith("/"):
        # a model folder, as a folder: KServe's storage-initializer lists objects by raw key prefix
        # (kserve/storage/storage.py _download_s3: bucket.objects.filter(Prefix=bucket_path)), so ".../model" also
        # matches ".../model-checkpoints/**", the optimizer states the training stages publish beside the model
        storage_uri += "/"
    probe = lambda path, **kw: {"httpGet": {"path": path, "port": 8080}, "periodSeconds": 10,  # noqa: E731
                                "timeoutSeconds": 5, **kw}
    resources = {"requests": {"cpu": s.cpu, "memory": s.memory}, "limits": {"memory": s.memory}}
    if s.gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = str(s.gpus)
    container = {
        "name": "kserve-container",
        "image": s.image,
        "command": ["python", "-m", "serving.server"],
        "args": ["--model", "/mnt/models", "--name", name, "--host", "0.0.0.0", "--port", "8080",
                 "--max-batch-size", str(s.max_batch_size), "--max-wait-ms", str(s.max_wait_ms), "--max-queue",
                 str(s.max_queue), "--request-timeout-s", str(s.request_timeout_s), "--max-new-tokens",
                 str(s.max_new_tokens)],
        "env": [{"name": "STORAGE_URI", "value": storage_uri},
                {"name": "HF_HOME", "value": "/var/cache/deepmedix/huggingface"},
                {"name": "XDG_CACHE_HOME", "value": "/var/cache/deepmedix"},
                {"name": "HF_HUB_OFFLINE", "value": "1"},
                {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
                {"name": "OMP_NUM_THREADS", "value": s.cpu}],
        "ports": [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}],
        "resources": resources,
        "startupProbe": probe("/", failureThreshold=60),
        "readinessProbe": probe(f"/v1/models/{name}", failureThreshold=3),
        "livenessProbe": probe("/", failureThreshold=3),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": "/var/cache/deepmedix"}],
    }
    predictor = {"serviceAccountName": s.service_account, "minReplicas": s.min_replicas,
                 "maxReplicas": s.max_replicas, "containers": [container],
                 "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
                             {"name": "cache", "emptyDir": {"sizeLimit": "4Gi"}}]}
    if s.deployment_mode == "Knative":
        predictor.update(scaleMetric="concurrency", scaleTarget=s.scale_target)
    else:
        # Pod Security "restricted" is judged per container, init containers included; the pod level is what
        # a container without its own settings falls back to. KServe's storage-initializer gets no securityContext
        # from KServe (storage_initializer_injector.go builds it bare; only a ClusterStorageContainer's
        # spec.container is merged in), so its non-root and seccomp come from here, and its allowPrivilegeEscalation
        # and dropped capabilities (per-container only) from the ClusterStorageContainer the README has the admin
        # apply (manifests/cluster/storage-initializer.yaml). Knative mode sets none: Knative's webhook refuses
        # a pod-level securityContext unless kubernetes.podspec-securitycontext is enabled (fieldmask.go
        # PodSecurityContextMask), so there the ClusterStorageContainer carries it all.
        predictor["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                        "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}}
    if s.node_selector:
        predictor["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        predictor["tolerations"] = list(s.tolerations)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {"name": name, "namespace": namespace,
                     "annotations": {"serving.kserve.io/deploymentMode": s.deployment_mode},
                     "labels": {"app.kubernetes.io/part-of": "deepmedix"}},
        "spec": {"predictor": predictor},
    }


def ready_verdict(obj: dict, previous_revision: str | None = None, previous_failure: dict | None = None,
                  generation: int | None = None) -> tuple[bool, str | None]:
    """(done, failure) from an InferenceService's status. Done: ``Ready`` is True, the controller has seen
    ``generation`` (when the status reports ``observedGeneration``) and, in Knative mode, the latest created
    revision is the ready one and it is not ``previous_revision`` (the one serving before a replace: KServe keeps
    the old revision Ready while the new one starts). Failed: a ``lastFailureInfo`` that was not there before."""
    status = obj.get("status") or {}
    failure = (status.get("modelStatus") or {}).get("lastFailureInfo")
    if failure and failure.get("reason") and failure != previous_failure:
        return True, f"{failure.get('reason')}: {failure.get('message') or ''}".strip()
    ready = condition(obj, "Ready")
    if not (ready and ready.get("status") == "True"):
        return False, None
    seen = status.get("observedGeneration")
    if generation is not None and seen is not None and seen < generation:
        return False, None
    pred = (status.get("components") or {}).get("predictor") or {}
    created, latest = pred.get("latestCreatedRevision"), pred.get("latestReadyRevision")
    if created or latest:  # Knative: revisions
        return (created == latest and latest != previous_revision), None
    return True, None


def rollout_verdict(dep, container: dict | None = None) -> tuple[bool, str | None]:
    """Standard mode: the predictor's Deployment runs ``container`` (its image, args and STORAGE_URI: until
    KServe has reconciled the replace, the Deployment is the old one, fully rolled out) and has rolled it out."""
    if container is not None:
        live = next((c for c in dep.spec.template.spec.containers or [] if c.name == container["name"]), None)
        env = {e.name: e.value for e in (live.env or [])} if live else {}
        want = {e["name"]: e.get("value") for e in container.get("env") or []}
        if live is None or live.image != container["image"] or list(live.args or []) != container["args"] or \
                env.get("STORAGE_URI") != want.get("STORAGE_URI"):
            return False, None
    st, want_replicas = dep.status, dep.spec.replicas or 0
    current = (st.observed_generation or 0) >= (dep.metadata.generation or 0)
    return (current and (st.updated_replicas or 0) >= want_replicas and (st.available_replicas or 0) >= want_replicas
            and not (st.unavailable_replicas or 0)), None


def deploy(manifest: dict, timeout_s: float = 1800, poll_s: float = 10.0,
           log: Callable[[str], None] = print) -> dict:
    """Create the InferenceService, or replace it when it exists (a new model rolls out); wait until the NEW model
    is Ready. Returns ``{"name", "namespace", "url", "storage_uri"}``.

    A replace (PUT with the live ``resourceVersion``), not a merge patch: a JSON merge patch keeps every field the
    new manifest leaves out (a GPU pool's nodeSelector, an old env var), so a redeploy would not be what it says.
    A conflict (someone changed it in between) is retried on the fresh object."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    k = api()
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    mode = manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"]
    live = None
    for attempt in range(5):  # a 5xx (an API server restarting) is retried, as wait_for does
        try:
            live = k.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            break
        except ApiException as exc:
            if exc.status == 404:
                break
            if (exc.status or 0) < 500 or attempt == 4:
                raise ClusterError(f"InferenceService {ns}/{name}: {exc.status} {exc.reason}: {_message(exc)}"
                                   ) from None
            log(f"InferenceService {ns}/{name}: API error {exc.status}, retrying")
            time.sleep(min(poll_s, 30))
    previous_revision = previous_failure = None
    if live is not None:
        live_mode = ((live.get("metadata") or {}).get("annotations") or {}).get("serving.kserve.io/deploymentMode")
        if live_mode and live_mode not in (mode, {"Knative": "Serverless", "Standard": "RawDeployment"}[mode]):
            raise ClusterError(f"InferenceService {ns}/{name} runs in {live_mode} mode and KServe does not change a "
                               f"service's mode: deploy with mode {live_mode}, or under another name")
        status = live.get("status") or {}
        previous_revision = ((status.get("components") or {}).get("predictor") or {}).get("latestReadyRevision")
        previous_failure = (status.get("modelStatus") or {}).get("lastFailureInfo")
    try:
        if live is not None:
            written = _replace(k, manifest, live)
            log(f"InferenceService {ns}/{name} replaced (was serving revision {previous_revision or '?'})")
        else:
            written = k.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
            log(f"InferenceService {ns}/{name} created")
    except ApiException as exc:
        raise ClusterError(f"InferenceService {ns}/{name}: {exc.status} {exc.reason}: {_message(exc)}") from None
    generation = ((written or {}).get("metadata") or {}).get("generation")
    if live is not None and generation == (live.get("metadata") or {}).get("generation"):
        previous_revision = None  # the same spec again: no new revision will come, the serving one is the answer
    obj = wait_for(lambda: k.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name),
                   lambda o: ready_verdict(o, previous_revision, previous_failure, generation),
                   f"InferenceService {ns}/{name}", timeout_s, poll_s, log)
    if mode == "Standard" and live is not None:
        # a replace leaves the old Ready status and the old, rolled-out Deployment in place until KServe
        # reconciles: wait for the Deployment that runs the new container, rolled out
        apps, container = client.AppsV1Api(), manifest["spec"]["predictor"]["containers"][0]
        wait_for(lambda: apps.read_namespaced_deployment(f"{name}-predictor", ns),
                 lambda d: rollout_verdict(d, container), f"Deployment {ns}/{name}-predictor", timeout_s, poll_s,
                 log)
    uri = manifest["spec"]["predictor"]["containers"][0]["env"][0]["value"]
    return {"name": name, "namespace": ns, "url": (obj.get("status") or {}).get("url"), "storage_uri": uri}


def _replace(k, manifest: dict, live: dict, tries: int = 3) -> dict:
    from kubernetes.client.exceptions import ApiException

    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    for attempt in range(tries):
        body = copy.deepcopy(manifest)
        body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
        for kept in ("finalizers", "ownerReferences"):  # KServe's finalizer (its cleanup) and owners are not ours
            if live["metadata"].get(kept):
                body["metadata"][kept] = live["metadata"][kept]
        try:
            return k.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, body)
        except ApiException as exc:
            if exc.status != 409 or attempt == tries - 1:
                raise
            live = k.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def _message(exc) -> str:
    """The API server's own message from a Status body, else the raw body."""
    try:
        return json.loads(exc.body).get("message") or exc.body
    except (TypeError, ValueError, AttributeError):
        return str(exc.body)


def deploy_model(storage_uri: str, name: str = "deepmedix-r1-pipeline", namespace: str = "",
                 serving: Serving | None = None, timeout_s: float = 1800, poll_s: float = 10.0,
                 log: Callable[[str], None] = print) -> dict:
    return deploy(inferenceservice_manifest(name, namespace or current_namespace(), storage_uri, serving),
                  timeout_s=timeout_s, poll_s=poll_s, log=log)
