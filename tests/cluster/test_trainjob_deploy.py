"""The cluster objects the stages create: the multi-node TrainJob and the InferenceService of the deploy step,
checked against their published schemas (the Kubeflow Trainer API models, the KServe SDK models) and for Pod
Security "restricted"; the verdicts read from their status; the `deepmedix stage run` entry on one node."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deepmedix.cli import app
from deepmedix.cluster.deploy import Serving, inferenceservice_manifest, ready_verdict
from deepmedix.cluster.trainjob import GpuPool, stage_args, trainjob_manifest, trainjob_verdict
from deepmedix.errors import ClusterError

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _strip_none(x):
    if isinstance(x, dict):
        return {k: _strip_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_strip_none(v) for v in x]
    return x


def assert_trainjob_schema(obj: dict) -> None:
    """Strict against kubeflow-trainer-api's TrainJob model: parsing and writing back gives the same object
    (a field the schema does not know would be dropped, a wrong type refused)."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    parsed = TrainerV1alpha1TrainJob.from_dict(copy.deepcopy(obj))
    assert _strip_none(parsed.to_dict()) == obj


def sft_job(**kw) -> dict:
    args = stage_args("sft", "s3://b/run/curate/data", "s3://b/run/base/model", "s3://b/run/sft/model", "7b",
                      ["max_steps=100", "deepspeed=configs/deepspeed/zero3.json"])
    return trainjob_manifest("deepmedix-sft-1234", "team-a", "ghcr.io/deepmedix/deepmedix-train:0.1.0", args,
                             nodes=kw.pop("nodes", 4), gpus_per_node=kw.pop("gpus_per_node", 8), **kw)


def test_trainjob_matches_the_published_schema_and_runs_torchrun():
    from k8s_checks import secret_errors

    job = sft_job()
    assert_trainjob_schema(job)
    assert secret_errors([job]) == []
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime",
                                  "apiGroup": "trainer.kubeflow.org"}
    t = spec["trainer"]
    assert t["numNodes"] == 4 and t["numProcPerNode"] == 8
    assert t["command"][:3] == ["torchrun", "-m", "deepmedix.cli"]
    assert t["command"][3:] == ["train", "sft", "--data", "s3://b/run/curate/data", "--model", "s3://b/run/base/model",
                                "--out", "s3://b/run/sft/model", "--config", "7b", "--set", "max_steps=100", "--set",
                                "deepspeed=configs/deepspeed/zero3.json"]
    assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    creds = {e["name"]: e for e in t["env"] if e["name"].startswith("AWS_") and "KEY" in e["name"]}
    assert set(creds) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(e["valueFrom"]["secretKeyRef"]["name"] == "deepmedix-s3" and "value" not in e for e in creds.values())
    (patch,) = spec["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = rj["template"]["spec"]["template"]["spec"]
    assert rj["name"] == "node" and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False,
                                                       "capabilities": {"drop": ["ALL"]}}


def test_trainjob_pool_is_configurable_and_bad_stage_is_refused():
    pool = GpuPool(node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                   tolerations=[{"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}],
                   shm_size="64Gi")
    job = sft_job(nodes=2, gpus_per_node=4, pool=pool, service_account="pipeline-runner")
    assert_trainjob_schema(job)
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == pool.node_selector and pod["serviceAccountName"] == "pipeline-runner"
    with pytest.raises(ValueError, match="stage: 'rlhf'"):
        stage_args("rlhf", "d", "m", "o", "tiny", [])
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numNodes"] = "two"
    with pytest.raises(ValueError):  # pydantic's ValidationError: the model refuses the type
        assert_trainjob_schema(bad)
    unknown = copy.deepcopy(job)
    unknown["spec"]["trainer"]["gpus"] = 8
    with pytest.raises(AssertionError):
        assert_trainjob_schema(unknown)


@pytest.mark.parametrize("status, verdict", [
    ({}, (False, None)),
    ({"conditions": [{"type": "Created", "status": "True"}]}, (False, None)),
    ({"conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]}, (True, None)),
    ({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                      "message": "node-1 exited with 137"}]},
     (True, "BackoffLimitExceeded: node-1 exited with 137")),
])
def test_trainjob_verdict(status, verdict):
    assert trainjob_verdict({"status": status}) == verdict


def test_multi_node_needs_s3_and_a_cluster(tmp_path):
    from deepmedix.cluster.trainjob import run_training

    local = (str(tmp_path / "d"), str(tmp_path / "d"))
    with pytest.raises(ClusterError, match="needs s3:// inputs and output"):
        run_training("sft", local, local, local, "tiny", [], nodes=2, gpus_per_node=1, image="x")
    s3 = ("s3://b/d", "s3://b/d")
    with pytest.raises(ClusterError, match="needs the training image"):
        run_training("sft", s3, s3, s3, "tiny", [], nodes=2)


def test_stage_run_on_one_node_trains(small_data, base_model_dir, tmp_path):
    """`deepmedix stage run sft` (what the Argo steps call) on one node: the real SFT, in this process."""
    out = tmp_path / "sft"
    r = subprocess.run([sys.executable, "-m", "deepmedix.cli", "stage", "run", "sft", "--nodes", "1",
                        "--gpus-per-node", "1", "--", "--data", str(small_data), "--model", str(base_model_dir),
                        "--out", str(out), "-c", "tiny", "--set", "max_steps=1", "--set", "eval_records=2",
                        "--set", "per_device_train_batch_size=2", "--set", "max_records=4"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "config.json").exists() and any(out.glob("*.safetensors"))
    bad = runner.invoke(app, ["stage", "run", "sft", "--", "--data", "x", "--model", "y"])
    assert bad.exit_code == 2 and "missing --out" in bad.output
    bad = runner.invoke(app, ["stage", "run", "sft", "--", "--data", "x", "--bogus", "y"])
    assert bad.exit_code == 2 and "unexpected '--bogus'" in bad.output


# ---------------------------------------------------------------- the deploy step's InferenceService

def test_inferenceservice_of_the_deploy_step(tmp_path):
    from k8s_checks import (
        assert_restricted,
        isvc_schema_errors,
        kserve_admission_errors,
        pods,
        secret_errors,
        with_storage_initializer,
    )

    isvc = inferenceservice_manifest("deepmedix-r1", "team-a", "s3://deepmedix/runs/r1/grpo/model",
                                     Serving(deployment_mode="Knative"))
    gpu_isvc = inferenceservice_manifest("x", "ns", "s3://b/m", Serving(deployment_mode="Standard", gpus=1))
    assert inferenceservice_manifest("x", "ns", "s3://b/m")["metadata"]["annotations"][
        "serving.kserve.io/deploymentMode"] == "Standard"  # the default: no Knative feature flags needed
    restricted_csc = yaml.safe_load((REPO / "manifests" / "cluster" / "storage-initializer.yaml").read_text())
    for obj in (isvc, gpu_isvc):
        assert isvc_schema_errors(obj) == [] and kserve_admission_errors(obj) == []
        for name, pod in pods(obj).items():
            assert_restricted(pod, name)
            # the storage-initializer KServe injects: restricted only with the ClusterStorageContainer the README
            # has the admin apply (KServe gives it no securityContext of its own)
            assert_restricted(with_storage_initializer(pod, restricted_csc), name)
            with pytest.raises(AssertionError, match="storage-initializer"):
                assert_restricted(with_storage_initializer(pod), name)
        assert secret_errors([obj]) == []
    # Knative's webhook refuses a pod-level securityContext (feature kubernetes.podspec-securitycontext, off by
    # default); Standard mode has one
    assert "securityContext" not in isvc["spec"]["predictor"]
    assert gpu_isvc["spec"]["predictor"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    pred = isvc["spec"]["predictor"]
    (c,) = pred["containers"]
    # a folder URI ends with "/": KServe downloads by raw key prefix, and ".../model" would also fetch
    # ".../model-checkpoints/**" (kserve/storage/storage.py, _download_s3: objects.filter(Prefix=bucket_path))
    assert c["env"][0] == {"name": "STORAGE_URI", "value": "s3://deepmedix/runs/r1/grpo/model/"}
    assert inferenceservice_manifest("x", "ns", "s3://b/m/")["spec"]["predictor"]["containers"][0]["env"][0][
        "value"] == "s3://b/m/" and inferenceservice_manifest("x", "ns", "pvc://claim/m")["spec"]["predictor"][
        "containers"][0]["env"][0]["value"] == "pvc://claim/m"
    assert pred["serviceAccountName"] == "deepmedix-serving" and pred["scaleMetric"] == "concurrency"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    gpu = inferenceservice_manifest("x", "ns", "s3://b/m", Serving(deployment_mode="Standard", gpus=1,
                                                                 node_selector={"pool": "gpu"},
                                                                 tolerations=[{"key": "gpu", "operator": "Exists"}]))
    gp = gpu["spec"]["predictor"]
    assert gp["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1" and "scaleMetric" not in gp
    assert gp["nodeSelector"] == {"pool": "gpu"} and gp["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    with pytest.raises(ClusterError, match="not a URI"):
        inferenceservice_manifest("x", "ns", "/local/folder")
    with pytest.raises(ClusterError, match="deployment_mode"):
        inferenceservice_manifest("x", "ns", "s3://b/m", Serving(deployment_mode="Serverless2"))


def test_deploy_manifest_matches_the_kustomize_base():
    """The deploy step's object and manifests/base describe the same container (args, probes, security, mounts)."""
    from k8s_tools import kubectl

    rendered = subprocess.run([str(kubectl()), "kustomize", str(REPO / "manifests" / "base")], capture_output=True,
                              text=True, check=True).stdout
    base = next(d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "InferenceService")
    ours = inferenceservice_manifest(base["metadata"]["name"], "ns",
                                     base["spec"]["predictor"]["containers"][0]["env"][0]["value"])
    b, o = base["spec"]["predictor"]["containers"][0], ours["spec"]["predictor"]["containers"][0]
    for key in ("name", "image", "command", "ports", "volumeMounts", "env", "args"):
        assert o[key] == b[key], key
    for key in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert o[key]["httpGet"] == b[key]["httpGet"], key
    assert o["securityContext"]["capabilities"] == b["securityContext"]["capabilities"]
    assert o["securityContext"]["readOnlyRootFilesystem"] is b["securityContext"]["readOnlyRootFilesystem"] is True
    assert {v["name"] for v in ours["spec"]["predictor"]["volumes"]} == \
        {v["name"] for v in base["spec"]["predictor"]["volumes"]}


KN = {"conditions": [{"type": "Ready", "status": "True"}]}


@pytest.mark.parametrize("obj, before, verdict", [
    ({"status": {}}, (None, None), (False, None)),
    ({"status": {**KN, "components": {"predictor": {"latestCreatedRevision": "p-00001",
                                                    "latestReadyRevision": "p-00001"}}}}, (None, None), (True, None)),
    # after a patch: the old revision still serves and is Ready; the new one is created but not ready
    ({"status": {**KN, "components": {"predictor": {"latestCreatedRevision": "p-00002",
                                                    "latestReadyRevision": "p-00001"}}}}, ("p-00001", None),
     (False, None)),
    # nothing new created yet: the old revision is not taken for the new model
    ({"status": {**KN, "components": {"predictor": {"latestCreatedRevision": "p-00001",
                                                    "latestReadyRevision": "p-00001"}}}}, ("p-00001", None),
     (False, None)),
    ({"status": {**KN, "components": {"predictor": {"latestCreatedRevision": "p-00002",
                                                    "latestReadyRevision": "p-00002"}}}}, ("p-00001", None),
     (True, None)),
    ({"status": KN}, (None, None), (True, None)),  # Standard mode: no revisions (the Deployment is checked after)
    ({"status": {"modelStatus": {"lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no config.json"}}}},
     (None, None), (True, "ModelLoadFailed: no config.json")),
    # a failure left from before the patch does not fail the new deploy
    ({"status": {"modelStatus": {"lastFailureInfo": {"reason": "ModelLoadFailed", "message": "x"}}}},
     (None, {"reason": "ModelLoadFailed", "message": "x"}), (False, None)),
])
def test_ready_verdict(obj, before, verdict):
    assert ready_verdict(obj, *before) == verdict


def test_trainjob_is_owned_by_the_step_pod_and_has_no_mesh_sidecar(monkeypatch):
    from deepmedix.cluster.trainjob import owner_reference

    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    assert owner_reference() == []
    monkeypatch.setenv("KFP_POD_NAME", "deepmedix-r1-abcde-sft-driver")
    monkeypatch.setenv("KFP_POD_UID", "0c8c7a2e-0000-4000-8000-000000000001")
    job = sft_job(owners=owner_reference())
    assert_trainjob_schema(job)
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod",
                                                   "name": "deepmedix-r1-abcde-sft-driver",
                                                   "uid": "0c8c7a2e-0000-4000-8000-000000000001",
                                                   "blockOwnerDeletion": False}]
    tmpl = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]
    assert tmpl["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}


def test_multi_node_checks_the_store_endpoint_before_asking_for_gpus(monkeypatch):
    from deepmedix.cluster.trainjob import run_training

    monkeypatch.delenv("S3_ENDPOINT", raising=False)
    s3 = ("s3://b/d", "s3://b/d")
    with pytest.raises(ClusterError, match="S3_ENDPOINT is not set"):
        run_training("sft", s3, s3, s3, "tiny", [], nodes=2, image="img")


def test_cli_pool_options():
    from deepmedix.cluster.commands import gpu_pool as _gpu_pool

    pool = _gpu_pool('{"pool": "h100"}', '[{"key": "gpu", "operator": "Exists"}]')
    assert pool.node_selector == {"pool": "h100"} and pool.tolerations == [{"key": "gpu", "operator": "Exists"}]
    assert _gpu_pool("", "").node_selector == {"nvidia.com/gpu.present": "true"}
    with pytest.raises(ValueError, match="--node-selector: not valid JSON"):
        _gpu_pool("{pool", "")
    with pytest.raises(ValueError, match="--tolerations: expected a JSON list"):
        _gpu_pool("", "{}")
    # a TrainJob node's requests: Kubernetes quantities (binary suffixes take an upper-case K)
    pool = _gpu_pool("", "", "12", "512Ki")
    assert (pool.cpu_per_node, pool.memory_per_node) == ("12", "512Ki")
    assert _gpu_pool("", "", "1500m", "1.5Ti").memory_per_node == "1.5Ti"
    for cpu, mem, bad in (("", "512ki", "--memory-per-node"), ("", "lots", "--memory-per-node"),
                          ("two", "", "--cpu-per-node")):
        with pytest.raises(ValueError, match=f"{bad}: .* is not a Kubernetes quantity"):
            _gpu_pool("", "", cpu, mem)


def test_deploy_without_a_cluster_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    r = runner.invoke(app, ["deploy", "--model", "s3://b/m", "--namespace", "ns"])
    assert r.exit_code == 2 and "no Kubernetes API" in r.output


def test_a_one_node_kfp_step_checkpoints_beside_its_output_on_s3_and_a_retry_resumes(tmp_path):
    """In a KFP step the output folder is local (the launcher uploads it at the end): checkpoints go to
    ``<output uri>-checkpoints`` on S3 instead of the pod's disk, and committed ones of the same output (a retried
    pod) make the step resume; a user's own checkpoint_uri and a plain local run are left alone."""
    from conftest import weed_s3

    from deepmedix import store
    from deepmedix.cluster.trainjob import durable_checkpoints

    out = (str(tmp_path / "local" / "model"), "s3://deepmedix/pipeline-root/run-1/sft/model")
    with weed_s3(tmp_path / "weed"):
        store.s3_client().make_bucket("deepmedix")
        overrides, resume = durable_checkpoints("sft", out, ["max_steps=10"], log=lambda _: None)
        assert overrides == ["max_steps=10", "checkpoint_uri=s3://deepmedix/pipeline-root/run-1/sft/model-checkpoints"]
        assert resume is False
        ckpt = tmp_path / "checkpoint-5"
        ckpt.mkdir()
        (ckpt / store.LINEAGE).write_text("{}")
        store.upload_dir(ckpt, f"{out[1]}-checkpoints/checkpoint-5")
        seen = []
        assert durable_checkpoints("sft", out, [], log=seen.append)[1] is True and "resuming" in seen[0]
        assert durable_checkpoints("sft", out, ["checkpoint_uri=s3://x/y"]) == (["checkpoint_uri=s3://x/y"], False)
        assert durable_checkpoints("sft", (out[0], out[0]), []) == ([], False)
