"""``deepmedix doctor``: read a live cluster through the Kubernetes API before a run and say what would fail, one
line per finding, with what to fix. Every check below is a failure a render passes and a first run hits; each
cites the controller source it follows.

Levels: ``ok``; ``warn`` (works, but not as the docs describe, or a feature this run does not use is missing;
or something could not be read); ``fail`` (this run would fail or break Pod Security). Exit status 1 on any fail.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, field

import yaml

from deepmedix.cluster.trainjob import GpuPool

KFP_MIN, KSERVE_MIN = (2, 14), (0, 16)  # the Trainer's minimum is checked by its CRD's schema (runtimePatches)
KNATIVE_FLAGS = ("kubernetes.podspec-nodeselector", "kubernetes.podspec-tolerations")


@dataclass
class Finding:
    check: str
    level: str  # ok | warn | fail
    message: str
    fix: str = ""


@dataclass
class Plan:
    """What the run will ask of the cluster (the pipeline parameters that matter here; defaults as the pipeline)."""
    namespace: str
    pool: GpuPool = field(default_factory=GpuPool)
    nodes: int = 1  # the most nodes any training stage asks for
    gpus_per_node: int = 1
    deploy: bool = False
    deploy_mode: str = "Standard"
    serving_gpus: int = 0
    s3_secret: str = "deepmedix-s3"

    @classmethod
    def from_params(cls, namespace: str, params: dict) -> "Plan":
        pool = GpuPool()
        pool.node_selector = params.get("gpu_node_selector", pool.node_selector)
        pool.tolerations = params.get("gpu_tolerations", pool.tolerations)
        stages = ("sft", "coldstart", "grpo")
        return cls(namespace, pool, nodes=max(int(params.get(f"{s}_nodes", 1)) for s in stages),
                   gpus_per_node=max([int(params.get(f"{s}_gpus_per_node", 1)) for s in stages]
                                     + [int(params.get("synth_gpus", 1)), int(params.get("eval_gpus", 1))]),
                   deploy=bool(params.get("deploy", False)), deploy_mode=params.get("deploy_mode", "Standard"),
                   serving_gpus=int(params.get("serving_gpus", 0)), s3_secret=params.get("s3_secret", "deepmedix-s3"))


def version_of(image: str) -> tuple[int, ...] | None:
    m = re.search(r":v?(\d+)\.(\d+)(?:\.(\d+))?", image or "")
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def tolerated(taint: dict, tolerations: list[dict]) -> bool:
    """Kubernetes' rule (k8s.io/api core/v1 toleration.go ToleratesTaint)."""
    if taint.get("effect") == "PreferNoSchedule":
        return True
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists" and (not t.get("key") or t["key"] == taint.get("key")):
            return True
        if t.get("key") == taint.get("key") and t.get("value", "") == taint.get("value", ""):
            return True
    return False


class Cluster:
    """Reads through the API; a 404 is None, a 403 or another error is raised as ``Unreadable``."""

    def __init__(self, k):
        self.k = k

    def _call(self, fn, *args, **kw):
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kw)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise Unreadable(f"{exc.status} {exc.reason}") from None

    def crd(self, name: str) -> dict | None:
        from kubernetes import client

        return self._call(lambda: client.ApiClient().sanitize_for_serialization(
            client.ApiextensionsV1Api().read_custom_resource_definition(name)))

    def configmap(self, ns: str, name: str) -> dict | None:
        cm = self._call(self.k.core.read_namespaced_config_map, name, ns)
        return None if cm is None else dict(cm.data or {})

    def secret(self, ns: str, name: str) -> dict | None:
        s = self._call(self.k.core.read_namespaced_secret, name, ns)
        return None if s is None else {k: base64.b64decode(v).decode(errors="replace") for k, v in
                                       (s.data or {}).items()}

    def image(self, ns: str, name: str) -> str | None:
        from kubernetes import client

        d = self._call(client.AppsV1Api().read_namespaced_deployment, name, ns)
        return None if d is None else d.spec.template.spec.containers[0].image

    def find_deployment(self, name: str) -> tuple[str | None, str | None]:
        """(namespace, image) of the Deployment ``name`` in whichever namespace it runs."""
        from kubernetes import client

        found = self._call(client.AppsV1Api().list_deployment_for_all_namespaces,
                           field_selector=f"metadata.name={name}")
        for d in (found.items if found else []):
            return d.metadata.namespace, d.spec.template.spec.containers[0].image
        return None, None

    def custom(self, group: str, version: str, plural: str, name: str | None = None, ns: str | None = None):
        c = self.k.custom
        if name and ns:
            return self._call(c.get_namespaced_custom_object, group, version, ns, plural, name)
        if name:
            return self._call(c.get_cluster_custom_object, group, version, plural, name)
        if ns:
            return (self._call(c.list_namespaced_custom_object, group, version, ns, plural) or {}).get("items", [])
        return (self._call(c.list_cluster_custom_object, group, version, plural) or {}).get("items", [])


class Unreadable(Exception):
    pass


def _crd_has(crd: dict, version: str, path: list[str]) -> bool:
    for v in crd["spec"].get("versions") or []:
        if v["name"] != version:
            continue
        node = (v.get("schema") or {}).get("openAPIV3Schema") or {}
        for key in path:
            if node.get("x-kubernetes-preserve-unknown-fields"):
                return True
            node = (node.get("properties") or {}).get(key)
            if node is None:
                return False
        return True
    return False


# ------------------------------------------------------------------------------------------------ the checks

def check_kfp(c: Cluster, plan: Plan, kfp_ns: str) -> list[Finding]:
    out = []
    image = c.image(kfp_ns, "ml-pipeline")
    if image is None:
        return [Finding("kfp", "fail", f"no Kubeflow Pipelines API server (Deployment {kfp_ns}/ml-pipeline)",
                        "install Kubeflow Pipelines 2.x, or pass --kfp-namespace")]
    v = version_of(image)
    if v is None or v[:2] < KFP_MIN:
        out.append(Finding("kfp", "fail", f"KFP {image.rsplit(':', 1)[-1]}: the pipeline is compiled with KFP 2.17 "
                           f"and needs a {'.'.join(map(str, KFP_MIN))}+ backend", "upgrade Kubeflow Pipelines"))
    else:
        out.append(Finding("kfp", "ok", f"KFP {'.'.join(map(str, v))} ({kfp_ns}/ml-pipeline)"))
    return out + check_launcher(c, plan)


def launcher_s3(cm: dict) -> tuple[str, str, dict]:
    """(root, bucket, the providers.s3 entry the launcher uses for that bucket: the first override naming it, else
    ``default``; kubeflow/pipelines backend/src/v2/config/s3.go ProvideSessionInfo). Raises yaml.YAMLError."""
    root = cm.get("defaultPipelineRoot", "")
    bucket = root[5:].split("/", 1)[0] if root.startswith("s3://") else ""
    s3 = (yaml.safe_load(cm.get("providers") or "") or {}).get("s3") or {}
    entry = s3.get("default") or {}
    for o in s3.get("overrides") or s3.get("Overrides") or []:  # Go's JSON decoding ignores the key's case
        if o.get("bucketName") == bucket:
            return root, bucket, o
    return root, bucket, entry


def check_launcher(c: Cluster, plan: Plan) -> list[Finding]:
    """The launcher reads ``defaultPipelineRoot`` and ``providers`` from the run namespace's ``kfp-launcher``
    (kubeflow/pipelines backend/src/v2/config/env.go FromConfigMap, getBucketProviders). For an s3:// root without
    a ``providers.s3`` block it opens the bucket with the AWS SDK's defaults (objectstore/object_store.go
    OpenBucket): AWS's own endpoint, whatever S3_ENDPOINT says. The multi-user profile controller writes this
    ConfigMap with a minio:// root and no providers (pipelines-profile-controller/sync.py) and never updates it
    (its ConfigMap attachment is updateStrategy OnDelete). The root must be s3:// on the DeepMedix store: the
    training steps and deploy read their inputs by URI through it."""
    fix = ("install the chart (kfp.launcherConfigMap.mode=merge, the default: its hook merges the root and "
           "provider in), or add them yourself (helm/deepmedix/README.md shows the block)")
    cm = c.configmap(plan.namespace, "kfp-launcher")
    if cm is None:
        return [Finding("kfp-launcher", "fail", f"no ConfigMap kfp-launcher in {plan.namespace}: artifacts would go "
                        "to KFP's default minio://mlpipeline root, which DeepMedix's steps cannot read by URI", fix)]
    try:
        root, bucket, entry = launcher_s3(cm)
    except yaml.YAMLError as exc:
        return [Finding("kfp-launcher", "fail", f"kfp-launcher providers: not valid YAML ({exc})", fix)]
    if not bucket:
        return [Finding("kfp-launcher", "fail", f"defaultPipelineRoot is {root or 'unset'!r}, not s3://<bucket>: the "
                        "training steps, their TrainJobs and deploy read and write s3:// URIs", fix)]
    if not entry.get("endpoint"):
        return [Finding("kfp-launcher", "fail", f"kfp-launcher has root {root} but no providers.s3 endpoint: the "
                        "launcher would write the artifacts to AWS S3's default endpoint", fix)]
    creds = entry.get("credentials") or {}
    out = [Finding("kfp-launcher", "ok", f"root {root}, S3 endpoint {entry['endpoint']}")]
    if creds.get("fromEnv"):
        out.append(Finding("kfp-launcher", "warn", "providers.s3 credentials fromEnv: KFP 2.14-2.16 then ignore "
                           "the block's endpoint too", "use credentials.secretRef"))
    elif (ref := creds.get("secretRef") or {}).get("secretName"):
        s = c.secret(plan.namespace, ref["secretName"])
        missing = [ref.get(k) for k in ("accessKeyKey", "secretKeyKey") if s is None or ref.get(k) not in s]
        if s is None or missing:
            out.append(Finding("kfp-launcher", "fail", f"providers.s3 credentials: Secret {ref['secretName']} "
                               + ("missing" if s is None else f"has no key {missing}"), "create it (README)"))
    else:
        out.append(Finding("kfp-launcher", "fail", "providers.s3 has no credentials (fromEnv or secretRef): the "
                           "launcher refuses it (\"missing default credentials\")", fix))
    return out


def check_trainer(c: Cluster, plan: Plan) -> list[Finding]:
    need = plan.nodes > 1
    bad = "fail" if need else "warn"
    fix = "install Kubeflow Trainer >= 2.2 with its runtimes (README)"
    crd = c.crd("trainjobs.trainer.kubeflow.org")
    if crd is None:
        return [Finding("trainer", bad, "no Kubeflow Trainer (CRD trainjobs.trainer.kubeflow.org): multi-node "
                        "training cannot run", fix)]
    out = []
    # TrainJob spec.runtimePatches came with Trainer 2.2 (podSpecOverrides 2.0, podTemplateOverrides 2.1): an older
    # CRD prunes it, and the job runs without the GPU pool, /dev/shm and security context
    if not _crd_has(crd, "v1alpha1", ["spec", "runtimePatches"]):
        out.append(Finding("trainer", bad, "the TrainJob CRD has no spec.runtimePatches (Trainer < 2.2)", fix))
    if c.custom("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", "torch-distributed") is None:
        out.append(Finding("trainer", bad, "no ClusterTrainingRuntime torch-distributed", fix))
    return out or [Finding("trainer", "ok", "Kubeflow Trainer with runtimePatches and torch-distributed")]


def check_kserve(c: Cluster, plan: Plan, restricted: bool) -> list[Finding]:
    bad = "fail" if plan.deploy else "warn"
    if c.crd("inferenceservices.serving.kserve.io") is None:
        return [Finding("kserve", bad, "no KServe (CRD inferenceservices.serving.kserve.io)", "install KServe 0.16+")]
    out = []
    # KServe's own install puts its controller in `kserve`, Kubeflow's in `kubeflow`: found by name
    ns, image = c.find_deployment("kserve-controller-manager")
    v = version_of(image or "")
    if v and v[:2] < KSERVE_MIN:
        # the Standard/Knative mode names came in 0.16 (kserve#4608): an older KServe ignores them and falls back
        # to its default mode (Serverless), where Knative refuses the pod-level securityContext
        out.append(Finding("kserve", bad, f"KServe {'.'.join(map(str, v))}: 0.16+ is needed (the Standard/Knative "
                           "deployment mode names)", "upgrade KServe"))
    try:
        deploy_cfg = json.loads((c.configmap(ns, "inferenceservice-config") or {}).get("deploy") or "{}") if ns else {}
    except ValueError:
        deploy_cfg = {}
    mode = deploy_cfg.get("defaultDeploymentMode", "Serverless")
    out.append(Finding("kserve", "ok", f"KServe {'.'.join(map(str, v)) if v else '(version unknown)'}, default "
                       f"deployment mode {mode}; DeepMedix sets its mode per InferenceService ({plan.deploy_mode})"))
    # the storage-initializer gets no securityContext from KServe (storage_initializer_injector.go); only the
    # ClusterStorageContainer serving s3:// can give it one
    cscs = c.custom("serving.kserve.io", "v1alpha1", "clusterstoragecontainers") or []
    s3 = [x for x in cscs if any((f.get("prefix") == "s3://") for f in (x.get("spec") or {}).get(
        "supportedUriFormats") or [])]
    sc = (((s3[0].get("spec") or {}).get("container") or {}).get("securityContext") or {}) if s3 else {}
    ok = (sc.get("allowPrivilegeEscalation") is False and "ALL" in ((sc.get("capabilities") or {}).get("drop") or [])
          and sc.get("runAsNonRoot") is True and (sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault")
    if not ok:
        which = f"ClusterStorageContainer {s3[0]['metadata']['name']}" if s3 else "no ClusterStorageContainer for s3://"
        out.append(Finding("kserve", "fail" if restricted else "warn",
                           f"the storage-initializer ({which}) has no restricted securityContext: predictor pods "
                           "fail Pod Security \"restricted\"",
                           "kubectl apply -f manifests/cluster/storage-initializer.yaml"))
    return out + check_knative(c, plan)


def check_knative(c: Cluster, plan: Plan) -> list[Finding]:
    """Knative refuses nodeSelector/tolerations in a pod spec unless ``config-features`` enables them (knative
    serving pkg/apis/config/features.go: PodSpecNodeSelector, PodSpecTolerations default Disabled). Only a
    failure when this run deploys in Knative mode."""
    knative = plan.deploy_mode == "Knative"
    if c.crd("services.serving.knative.dev") is None:
        if knative:
            return [Finding("knative", "fail", "deploy_mode Knative but no Knative Serving",
                            "deploy with deploy_mode Standard, or install Knative Serving")]
        return [Finding("knative", "ok", "no Knative Serving (not needed: deploy_mode Standard)")]
    flags = c.configmap("knative-serving", "config-features") or {}
    off = [f for f in KNATIVE_FLAGS if (flags.get(f) or "disabled").lower() != "enabled"]
    if not off:
        return [Finding("knative", "ok", "Knative with node selector and toleration features enabled")]
    if not knative:
        return [Finding("knative", "ok", f"Knative present, {', '.join(off)} off (not needed: deploy_mode "
                        "Standard; Knative mode could not place pods on GPU nodes)")]
    return [Finding("knative", "fail" if plan.serving_gpus else "warn",
                    f"Knative refuses GPU placement: {', '.join(off)} not enabled in knative-serving/"
                    "config-features", "kubectl -n knative-serving patch configmap config-features --type merge "
                    "-p '{\"data\": {" + ", ".join(f'\"{f}\": \"enabled\"' for f in off) + "}}' (or deploy_mode "
                    "Standard)")]


def check_autoscaling(c: Cluster, plan: Plan) -> list[Finding]:
    out = []
    if c.crd("scaledobjects.keda.sh") is None:
        out.append(Finding("keda", "warn", "no KEDA: serving.autoscaler=keda (scaling on queue depth) cannot work; "
                           "the default, hpa, does", "install KEDA, or keep serving.autoscaler=hpa"))
    else:
        out.append(Finding("keda", "ok", "KEDA installed"))
    if c.crd("podmonitors.monitoring.coreos.com") is not None:
        # the Prometheus Operator ignores prometheus.io/* annotations; it scrapes what a PodMonitor selects
        mons = c.custom("monitoring.coreos.com", "v1", "podmonitors", ns=plan.namespace) or []
        ours = [m for m in mons if _selects_serving_pods((m.get("spec") or {}).get("selector") or {})]
        if not ours:
            out.append(Finding("prometheus", "warn", f"Prometheus Operator present but no PodMonitor for DeepMedix in "
                               f"{plan.namespace}: the queue metric KEDA scales on is never scraped",
                               "install the chart with serving.podMonitor.enabled=true"))
        else:
            out.append(Finding("prometheus", "ok", f"PodMonitor {ours[0]['metadata']['name']}"))
    return out


def _selects_serving_pods(sel: dict) -> bool:
    """A PodMonitor selector that picks DeepMedix's InferenceService pods: the chart's (part-of: deepmedix) or the
    kustomize component's (serving.kserve.io/inferenceservice In [deepmedix-r1, ...])."""
    if (sel.get("matchLabels") or {}).get("app.kubernetes.io/part-of") == "deepmedix":
        return True
    return any(e.get("key") == "serving.kserve.io/inferenceservice" and
               any(str(v).startswith("deepmedix") for v in e.get("values") or [])
               for e in sel.get("matchExpressions") or [])


def check_pod_security(c: Cluster, plan: Plan) -> tuple[list[Finding], bool]:
    ns = c._call(c.k.core.read_namespace, plan.namespace)
    if ns is None:
        return [Finding("namespace", "fail", f"namespace {plan.namespace} does not exist", "create it")], False
    level = (ns.metadata.labels or {}).get("pod-security.kubernetes.io/enforce", "")
    return [Finding("pod-security", "ok", f"{plan.namespace} enforces {level or 'no'} Pod Security level")], \
        level == "restricted"


def check_gpu_nodes(c: Cluster, plan: Plan) -> list[Finding]:
    nodes = c._call(c.k.core.list_node).items
    sel = plan.pool.node_selector or {}
    pool = [n for n in nodes if all((n.metadata.labels or {}).get(k) == v for k, v in sel.items())]
    fix = "set gpu_node_selector / gpu_tolerations (pipeline parameters) to your GPU pool's labels and taints"
    if not pool:
        return [Finding("gpu-nodes", "fail", f"no node has the labels {sel}", fix)]
    res = plan.pool.resource
    usable, blocked = [], []
    for n in pool:
        taints = [t.to_dict() if hasattr(t, "to_dict") else t for t in (n.spec.taints or [])]
        bad = [t for t in taints if t.get("effect") in ("NoSchedule", "NoExecute")
               and not tolerated(t, plan.pool.tolerations)]
        (blocked if bad else usable).append((n, bad))
    if not usable:
        n, bad = blocked[0]
        return [Finding("gpu-nodes", "fail", f"{len(pool)} node(s) match {sel} but taint(s) {bad} on "
                        f"{n.metadata.name} are not tolerated", fix)]
    gpus = max(int((n.status.allocatable or {}).get(res, "0")) for n, _ in usable)
    if gpus < plan.gpus_per_node:
        return [Finding("gpu-nodes", "fail", f"the pool's nodes have at most {gpus} {res}; the run asks for "
                        f"{plan.gpus_per_node} per node", "lower *_gpus_per_node or use bigger nodes")]
    if len(usable) < plan.nodes:
        return [Finding("gpu-nodes", "fail", f"{len(usable)} usable GPU node(s), the run asks for {plan.nodes}",
                        "lower *_nodes")]
    return [Finding("gpu-nodes", "ok", f"{len(usable)} GPU node(s) in the pool, up to {gpus} {res} each")]


def check_s3(c: Cluster, plan: Plan) -> list[Finding]:
    secret = c.secret(plan.namespace, plan.s3_secret)
    if secret is None:
        return [Finding("s3", "fail", f"no Secret {plan.s3_secret} in {plan.namespace}", "create it (README)")]
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not secret.get(k)]
    if missing:
        return [Finding("s3", "fail", f"Secret {plan.s3_secret} lacks {missing}", "recreate it (README)")]
    try:
        root, bucket, entry = launcher_s3(c.configmap(plan.namespace, "kfp-launcher") or {})
    except yaml.YAMLError:
        bucket, entry = "", {}
    endpoint = entry.get("endpoint", "")
    if not (bucket and endpoint):
        return [Finding("s3", "ok", f"Secret {plan.s3_secret} has both keys (bucket not checked: no s3 root)")]
    problem = bucket_problem(secret, entry, bucket)
    if problem is None:
        return [Finding("s3", "ok", f"bucket {bucket} at {endpoint} reachable with Secret {plan.s3_secret}")]
    if problem.startswith("unreachable"):
        return [Finding("s3", "warn", f"{endpoint} {problem} from here (an in-cluster address?): bucket {bucket} not "
                        "checked")]
    return [Finding("s3", "fail", f"bucket {bucket} at {endpoint}: {problem}", "create the bucket / fix the keys")]


def bucket_problem(secret: dict, entry: dict, bucket: str) -> str | None:
    """Ask the store for ``bucket`` the way the launcher would: ``entry``'s endpoint (host:port; https unless
    ``disableSSL``) and region, the Secret's keys."""
    import urllib3
    from minio import Minio

    scheme, _, host = str(entry["endpoint"]).rpartition("://")
    secure = scheme == "https" if scheme else not entry.get("disableSSL", False)
    client = Minio(host, access_key=secret["AWS_ACCESS_KEY_ID"], secret_key=secret["AWS_SECRET_ACCESS_KEY"],
                   secure=secure, region=entry.get("region") or "us-east-1",
                   http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=3, read=10),
                                                   retries=urllib3.Retry(total=0)))
    try:
        return None if client.bucket_exists(bucket) else "no such bucket"
    except urllib3.exceptions.HTTPError as exc:
        return f"unreachable ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - S3Error: access denied, bad signature...
        return f"{getattr(exc, 'code', type(exc).__name__)}: {getattr(exc, 'message', exc)}"


def run(plan: Plan, kfp_namespace: str = "kubeflow") -> list[Finding]:
    """Every check; a check whose objects this identity cannot read is a warning naming it, not a crash."""
    from deepmedix.cluster.k8s import api

    c = Cluster(api())
    try:
        findings, restricted = check_pod_security(c, plan)
    except Unreadable as exc:
        findings, restricted = [Finding("namespace", "warn", f"cannot read namespace {plan.namespace} ({exc})")], False
    checks = [("kfp", lambda: check_kfp(c, plan, kfp_namespace)), ("trainer", lambda: check_trainer(c, plan)),
              ("kserve", lambda: check_kserve(c, plan, restricted)), ("keda", lambda: check_autoscaling(c, plan)),
              ("gpu-nodes", lambda: check_gpu_nodes(c, plan)), ("s3", lambda: check_s3(c, plan))]
    for name, check in checks:
        try:
            findings += check()
        except Unreadable as exc:
            findings.append(Finding(name, "warn", f"could not read what this check needs ({exc})",
                                    "run doctor as a user who may read cluster-scoped objects"))
    return findings


def report(findings: list[Finding], as_json: bool) -> str:
    if as_json:
        return json.dumps([asdict(f) for f in findings], indent=2)
    return "\n".join(f"{f.level.upper():4}  {f.check:13} {f.message}" + (f"  -> {f.fix}" if f.fix and f.level != "ok"
                                                                        else "") for f in findings)
