"""``deepmedix doctor`` against the stand-in API server (``kube_stub.py``) and a real S3 server (weed): quiet on a
well-configured standard install, and every misconfiguration issue 20 found reported with its fix."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from typer.testing import CliRunner
from worlds import NS, edit, kube_stub, launcher_providers, standard_install, trainjob_crd, without

from deepmedix.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from conftest import weed_s3

    with weed_s3(tmp_path_factory.mktemp("weed")) as server:
        from deepmedix import store

        store.s3_client().make_bucket("deepmedix")
        yield server.env["S3_ENDPOINT"]


def cluster(endpoint: str) -> dict:
    w = standard_install(s3_endpoint=endpoint)
    return edit(w, "Secret", "deepmedix-s3", lambda s: s.update(data={
        "AWS_ACCESS_KEY_ID": base64.b64encode(b"testkey").decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(b"testsecret").decode()}))


def doctor(world: dict, tmp_path, monkeypatch, params: dict | None = None, text: bool = False
           ) -> tuple[int, list[dict], str]:
    """Run `deepmedix doctor --json` (and, with ``text``, the plain report too) against ``world``: (exit code,
    findings, the plain report or the JSON)."""
    args = ["doctor", "--namespace", NS]
    tmp_path.mkdir(parents=True, exist_ok=True)
    if params is not None:
        p = tmp_path / "params.yaml"
        p.write_text(yaml.safe_dump(params))
        args += ["--params", str(p)]
    with kube_stub(world, tmp_path / "kube", monkeypatch):
        r = runner.invoke(app, [*args, "--json"])
        plain = runner.invoke(app, args).output if text else r.stdout
    return r.exit_code, json.loads(r.stdout), plain


def test_a_well_configured_cluster_passes(s3, tmp_path, monkeypatch):
    code, findings, text = doctor(cluster(s3), tmp_path, monkeypatch,
                                  {"sft_nodes": 2, "sft_gpus_per_node": 8, "deploy": True, "serving_gpus": 1},
                                  text=True)
    assert code == 0, text
    assert {f["level"] for f in findings} == {"ok"}, text
    checks = {f["check"] for f in findings}
    assert checks >= {"pod-security", "kfp", "kfp-launcher", "trainer", "kserve", "keda", "prometheus", "gpu-nodes",
                      "s3"}
    assert f"bucket deepmedix at {s3} reachable" in text
    assert len(text.strip().splitlines()) == len(findings)  # one line per finding


def _launcher(data: dict):
    return lambda w: edit(w, "ConfigMap", "kfp-launcher", lambda o: o.update(data=data))


PROFILE_LAUNCHER = {"defaultPipelineRoot": f"minio://mlpipeline/private-artifacts/{NS}/v2/artifacts",
                    "clusterDomain": "cluster.local"}
MULTI = {"sft_nodes": 2, "sft_gpus_per_node": 8}


@pytest.mark.parametrize("break_it, params, check, level, says", [
    # finding 2: artifacts sent to AWS
    (lambda w: without(w, "ConfigMap", "kfp-launcher"), None, "kfp-launcher", "fail", "no ConfigMap kfp-launcher"),
    (_launcher({"defaultPipelineRoot": "s3://deepmedix/pipeline-root"}), None, "kfp-launcher", "fail",
     "AWS S3's default endpoint"),
    (_launcher(PROFILE_LAUNCHER), MULTI, "kfp-launcher", "fail", "not s3://"),
    (_launcher(PROFILE_LAUNCHER), None, "kfp-launcher", "fail", "not s3://"),  # the steps read s3:// URIs
    (_launcher({"defaultPipelineRoot": "s3://deepmedix/r", "providers": launcher_providers("h:1", secret="nope")}),
     None, "kfp-launcher", "fail", "Secret nope missing"),
    (lambda w: without(w, "Deployment", "ml-pipeline"), None, "kfp", "fail", "no Kubeflow Pipelines"),
    (lambda w: edit(w, "Deployment", "ml-pipeline", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        image="gcr.io/ml-pipeline/api-server:2.0.5")), None, "kfp", "fail", "KFP 2.0.5"),
    # KServe: found in whichever namespace (Kubeflow installs it in `kubeflow`); 0.16+ for the mode names
    (lambda w: edit(w, "Deployment", "kserve-controller-manager", lambda d: d["spec"]["template"]["spec"][
        "containers"][0].update(image="kserve/kserve-controller:v0.15.2")), {"deploy": True}, "kserve", "fail",
     "KServe 0.15.2: 0.16+ is needed"),
    (lambda w: edit(edit(w, "Deployment", "kserve-controller-manager", lambda d: d["metadata"].update(
        namespace="kubeflow")), "ConfigMap", "inferenceservice-config", lambda d: d["metadata"].update(
        namespace="kubeflow")), None, "kserve", "ok", "KServe 0.21.0, default deployment mode Standard"),
    # the Trainer
    (lambda w: without(w, "CustomResourceDefinition", "trainjobs.trainer.kubeflow.org"), MULTI, "trainer", "fail",
     "no Kubeflow Trainer"),
    (lambda w: without(w, "CustomResourceDefinition", "trainjobs.trainer.kubeflow.org"), None, "trainer", "warn",
     "no Kubeflow Trainer"),
    (lambda w: edit(w, "CustomResourceDefinition", "trainjobs.trainer.kubeflow.org",
                    lambda o: o.update(trainjob_crd(runtime_patches=False))), MULTI, "trainer", "fail",
     "no spec.runtimePatches"),
    (lambda w: without(w, "ClusterTrainingRuntime"), MULTI, "trainer", "fail", "no ClusterTrainingRuntime"),
    # finding 5: the storage-initializer under "restricted"
    (lambda w: edit(w, "ClusterStorageContainer", "default", lambda o: o["spec"]["container"].pop("securityContext")),
     None, "kserve", "fail", "storage-initializer"),
    (lambda w: without(w, "CustomResourceDefinition", "inferenceservices.serving.kserve.io"), {"deploy": True},
     "kserve", "fail", "no KServe"),
    # finding 4: Knative's feature flags
    (lambda w: edit(w, "ConfigMap", "config-features", lambda o: o.update(data={})),
     {"deploy": True, "deploy_mode": "Knative", "serving_gpus": 1}, "knative", "fail",
     "kubernetes.podspec-nodeselector, kubernetes.podspec-tolerations not enabled"),
    (lambda w: without(w, "CustomResourceDefinition", "services.serving.knative.dev"),
     {"deploy": True, "deploy_mode": "Knative"}, "knative", "fail", "no Knative Serving"),
    # KEDA and how Prometheus scrapes
    (lambda w: without(w, "CustomResourceDefinition", "scaledobjects.keda.sh"), None, "keda", "warn", "no KEDA"),
    (lambda w: without(w, "PodMonitor"), None, "prometheus", "warn", "no PodMonitor"),
    (lambda w: edit(w, "PodMonitor", "deepmedix-serving", lambda m: m["spec"].update(selector={"matchExpressions": [
        {"key": "serving.kserve.io/inferenceservice", "operator": "In", "values": ["deepmedix-r1"]}]})),
     None, "prometheus", "ok", "PodMonitor deepmedix-serving"),  # the kustomize component's selector
    # GPU nodes against the pool settings
    (lambda w: without(w, "Node"), None, "gpu-nodes", "fail", "no node has the labels"),
    (lambda w: edit(edit(w, "Node", "gpu-a", lambda n: n["spec"].update(taints=[
        {"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])), "Node", "gpu-b",
        lambda n: n["spec"].update(taints=[{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}])),
     None, "gpu-nodes", "fail", "are not tolerated"),
    (lambda w: w, {"sft_gpus_per_node": 16}, "gpu-nodes", "fail", "at most 8 nvidia.com/gpu"),
    (lambda w: w, {"sft_nodes": 3}, "gpu-nodes", "fail", "2 usable GPU node(s), the run asks for 3"),
    # the S3 Secret and bucket
    (lambda w: without(w, "Secret", "deepmedix-s3"), None, "s3", "fail", "no Secret deepmedix-s3"),
    (lambda w: edit(w, "ConfigMap", "kfp-launcher", lambda o: o["data"].update(
        defaultPipelineRoot="s3://no-such-bucket/root")), None, "s3", "fail", "no such bucket"),
    (lambda w: edit(w, "Secret", "deepmedix-s3", lambda o: o["data"].update(
        AWS_SECRET_ACCESS_KEY=base64.b64encode(b"wrong").decode())), None, "s3", "fail", "bucket deepmedix"),
])
def test_each_misconfiguration_is_reported_with_its_fix(s3, tmp_path, monkeypatch, break_it, params, check, level,
                                                       says):
    code, findings, text = doctor(break_it(cluster(s3)), tmp_path, monkeypatch, params)
    hits = [f for f in findings if f["check"] == check and says in f["message"]]
    assert hits and hits[0]["level"] == level, text
    assert code == (1 if level == "fail" else 0), text
    if level != "ok":
        assert hits[0]["fix"] or check == "s3", hits[0]


def test_an_unreachable_store_is_a_warning_not_a_verdict(tmp_path, monkeypatch):
    code, findings, text = doctor(standard_install(s3_endpoint="127.0.0.1:9"), tmp_path, monkeypatch)
    (s3,) = [f for f in findings if f["check"] == "s3"]
    assert s3["level"] == "warn" and "not checked" in s3["message"] and code == 0


def test_what_it_cannot_read_is_named(s3, tmp_path, monkeypatch):
    w = cluster(s3)
    w["controllers"]["fail"] = [{"method": "GET", "path": "^/api/v1/nodes$", "status": 403, "times": 10,
                                 "reason": "Forbidden", "message": "nodes is forbidden"}]
    code, findings, text = doctor(w, tmp_path, monkeypatch)
    (gpu,) = [f for f in findings if f["check"] == "gpu-nodes"]
    assert gpu["level"] == "warn" and "403" in gpu["message"]


def test_no_cluster_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    r = runner.invoke(app, ["doctor", "--namespace", NS])
    assert r.exit_code == 2 and "no Kubernetes API" in r.output


def test_the_charts_launcher_hook_on_a_profile_namespace(s3, tmp_path, monkeypatch):
    """End to end: the chart rendered with the README's install flags, its `<release>-kfp-launcher` ConfigMap
    applied, then its hook Job's command run against a profile namespace whose kfp-launcher the profile controller
    wrote (minio:// root, clusterDomain, no providers): doctor fails the namespace before and passes it after;
    clusterDomain is kept; the merge replaces with the live resourceVersion and is idempotent."""
    from test_helm import readme_install_flags, template

    flags = [f.replace("seaweedfs.kubeflow.svc.cluster.local:8333", s3) for f in readme_install_flags()]
    docs = [d for d in yaml.safe_load_all(template(*flags, "--namespace", NS).stdout) if d]
    wanted = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "deepmedix-kfp-launcher")
    (job,) = [d for d in docs if d["kind"] == "Job"]
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "deepmedix"
    owner = [{"apiVersion": "v1", "kind": "Namespace", "name": NS, "uid": "ns-uid", "controller": True}]
    overrides = [{"bucketName": "other", "endpoint": "other:9000", "credentials": {"fromEnv": True}}]
    w = edit(cluster(s3), "ConfigMap", "kfp-launcher", lambda o: o.update(
        data={**PROFILE_LAUNCHER, "providers": yaml.safe_dump({"s3": {"overrides": overrides}})},
        metadata={**o["metadata"], "ownerReferences": owner}))  # the profile controller's; an admin's override
    w["objects"].append({**wanted, "metadata": {**wanted["metadata"], "namespace": NS}})
    with kube_stub(w, tmp_path, monkeypatch) as kube:
        before = runner.invoke(app, ["doctor", "--namespace", NS, "--json"])
        assert before.exit_code == 1  # KFP's minio:// root: the steps could not read their inputs by URI
        assert any(f["check"] == "kfp-launcher" and f["level"] == "fail" for f in json.loads(before.stdout))
        for _ in range(2):
            r = runner.invoke(app, command[1:])
            assert r.exit_code == 0, r.output
        (live,) = [c for c in kube.objects("ConfigMap") if c["metadata"]["name"] == "kfp-launcher"]
        assert live["data"]["clusterDomain"] == "cluster.local"
        assert live["data"]["defaultPipelineRoot"] == "s3://deepmedix/pipeline-root"
        providers = yaml.safe_load(live["data"]["providers"])
        assert providers["s3"]["default"]["endpoint"] == s3 and providers["s3"]["overrides"] == overrides
        assert live["metadata"]["ownerReferences"] == owner
        assert all(p["body"]["metadata"]["resourceVersion"] for p in kube.requests("PUT", "/configmaps/kfp-launcher"))
        after = runner.invoke(app, ["doctor", "--namespace", NS, "--json"])
        assert after.exit_code == 0 and {f["level"] for f in json.loads(after.stdout)} == {"ok"}, after.stdout
        missing = runner.invoke(app, ["kfp-launcher", "--from", "nope", "--namespace", NS])
        assert missing.exit_code == 2 and "nope: 404" in missing.output
    with kube_stub(without(w, "ConfigMap", "kfp-launcher", NS), tmp_path / "2", monkeypatch) as kube:
        r = runner.invoke(app, ["kfp-launcher", "--from", "deepmedix-kfp-launcher"])  # the namespace: POD_NAMESPACE
        assert r.exit_code == 0 and "created" in r.output, r.output
        (live,) = [c for c in kube.objects("ConfigMap") if c["metadata"]["name"] == "kfp-launcher"]
        assert set(live["data"]) == {"defaultPipelineRoot", "providers"}


def test_knative_settings_matter_only_in_knative_mode(s3, tmp_path, monkeypatch):
    w = edit(cluster(s3), "ConfigMap", "config-features", lambda o: o.update(data={}))
    code, findings, text = doctor(w, tmp_path, monkeypatch, {"deploy": True, "serving_gpus": 1})
    (kn,) = [f for f in findings if f["check"] == "knative"]
    assert code == 0 and kn["level"] == "ok" and "not needed: deploy_mode Standard" in kn["message"]
    code, findings, text = doctor(w, tmp_path / "2", monkeypatch, {"deploy": True, "deploy_mode": "Knative"})
    (kn,) = [f for f in findings if f["check"] == "knative"]
    assert code == 0 and kn["level"] == "warn"  # no GPUs asked for: it would run, off the GPU pool
    assert "patch configmap config-features" in kn["fix"]


def test_a_bad_parameters_file_is_named(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("- a list\n")
    for path, says in ((bad, "expected a mapping"), (tmp_path / "none.yaml", "cannot read the parameters file")):
        r = runner.invoke(app, ["doctor", "--namespace", NS, "--params", str(path)])
        assert r.exit_code == 2 and str(path) in r.output and says in r.output


def test_the_plain_report_is_one_line_per_finding_with_its_fix(s3, tmp_path, monkeypatch):
    code, findings, text = doctor(without(cluster(s3), "Secret", "deepmedix-s3"), tmp_path, monkeypatch, text=True)
    assert code == 1 and len(text.strip().splitlines()) == len(findings)
    line = next(x for x in text.splitlines() if x.startswith("FAIL  s3"))
    assert "no Secret deepmedix-s3 in team-a  -> create it (README)" in line
