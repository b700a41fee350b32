"""``deploy`` and the TrainJob launcher end to end against the stand-in Kubernetes API server (``kube_stub.py``,
a real HTTP server process speaking the REST paths, object shapes and errors of the API server and the released
CRDs), through the real ``kubernetes`` client and the CLI: each happy path and its failure cases."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner
from worlds import NS, as_runner, edit, kube_stub, standard_install, trainjob_crd, without

from deepmedix.cli import app
from deepmedix.cluster.deploy import inferenceservice_manifest

runner = CliRunner()
MODEL = "s3://deepmedix/pipeline-root/run-1/grpo/model"
ISVC_PATH = f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"
TJ_PATH = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"


def deploy(*extra: str):
    return runner.invoke(app, ["deploy", "--model", MODEL, "--namespace", NS, "--poll", "0.05", "--timeout", "20",
                               *extra])


def world(**controllers) -> dict:
    """A standard install where this process is the pipeline runner, allowed only the chart's Role."""
    w = as_runner(standard_install())
    w["controllers"].update(controllers)
    return w


# ------------------------------------------------------------------------------------------------------- deploy

def test_deploy_creates_the_inferenceservice_and_waits_for_ready(tmp_path, monkeypatch):
    with kube_stub(world(), tmp_path, monkeypatch) as kube:
        r = deploy()
        assert r.exit_code == 0, r.output
        assert f"http://deepmedix-r1-pipeline.{NS}.example.com" in r.output and f"{MODEL}/" in r.output
        (post,) = kube.requests("POST", ISVC_PATH)
        assert post["body"] == inferenceservice_manifest("deepmedix-r1-pipeline", NS, MODEL)
        # the status was read until Ready, not once
        assert len(kube.requests("GET", f"{ISVC_PATH}/deepmedix-r1-pipeline")) >= 2
        (live,) = kube.objects("InferenceService")
        assert live["spec"]["predictor"]["containers"][0]["env"][0] == {"name": "STORAGE_URI", "value": MODEL + "/"}


def test_redeploy_replaces_so_dropped_fields_go(tmp_path, monkeypatch):
    """A redeploy is a PUT of the whole object with the live resourceVersion: the GPU pool of the first deploy
    is gone after a CPU redeploy (a JSON merge patch would have kept nodeSelector and tolerations). Standard mode
    waits for the predictor Deployment's rollout too."""
    with kube_stub(world(), tmp_path, monkeypatch) as kube:
        first = deploy("--gpus", "1", "--node-selector", '{"pool": "h100"}',
                       "--tolerations", '[{"key": "gpu", "operator": "Exists"}]')
        assert first.exit_code == 0, first.output
        assert kube.objects("InferenceService")[0]["spec"]["predictor"]["nodeSelector"] == {"pool": "h100"}
        second = runner.invoke(app, ["deploy", "--model", MODEL + "-v2", "--namespace", NS, "--poll", "0.05",
                                     "--timeout", "20"])
        assert second.exit_code == 0, second.output
        assert "replaced" in second.output
        (put,) = kube.requests("PUT", ISVC_PATH)
        assert put["body"]["metadata"]["resourceVersion"]
        assert put["body"]["metadata"]["finalizers"] == ["inferenceservice.finalizers"]  # KServe's, kept
        assert not kube.requests("PATCH")
        (live,) = kube.objects("InferenceService")
        pred = live["spec"]["predictor"]
        assert "nodeSelector" not in pred and "tolerations" not in pred
        assert pred["containers"][0]["env"][0]["value"] == MODEL + "-v2/"
        assert kube.requests("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/deepmedix-r1-pipeline-predictor")


def test_a_redeploy_is_done_when_the_new_model_runs_not_before(tmp_path, monkeypatch):
    """After a replace, KServe's status still says Ready (the old model) and the predictor Deployment is the old
    one, fully rolled out, until the controller reconciles the new spec. A controller that never gets there must
    not make the redeploy a success."""
    stuck = world(InferenceService={"ready_after": 1, "reconcile_updates": False})
    with kube_stub(stuck, tmp_path, monkeypatch):
        assert deploy().exit_code == 0
        r = runner.invoke(app, ["deploy", "--model", MODEL + "-v2", "--namespace", NS, "--poll", "0.05",
                                "--timeout", "1"])
        assert r.exit_code == 2 and "not done after" in r.output, r.output
    with kube_stub(world(), tmp_path / "2", monkeypatch) as kube:  # ready_after 2: one stale read after the PUT
        assert deploy().exit_code == 0
        r = runner.invoke(app, ["deploy", "--model", MODEL + "-v2", "--namespace", NS, "--poll", "0.05",
                                "--timeout", "20"])
        assert r.exit_code == 0, r.output
        (dep,) = [d for d in kube.objects("Deployment") if d["metadata"]["name"] == "deepmedix-r1-pipeline-predictor"]
        env = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["STORAGE_URI"] == MODEL + "-v2/" and dep["metadata"]["generation"] == 2


def test_a_knative_redeploy_of_the_same_spec_does_not_wait_for_a_revision(tmp_path, monkeypatch):
    """The same spec again makes no new Knative revision: the serving one is the answer, not a 30-minute wait."""
    with kube_stub(world(), tmp_path, monkeypatch):
        assert deploy("--mode", "Knative").exit_code == 0
        r = runner.invoke(app, ["deploy", "--model", MODEL, "--namespace", NS, "--mode", "Knative", "--poll", "0.05",
                                "--timeout", "5"])
        assert r.exit_code == 0, r.output


def test_deploy_reports_kserves_failure_reason(tmp_path, monkeypatch):
    failure = {"reason": "ModelLoadFailed", "message": "storage-initializer: s3://deepmedix/... 403 AccessDenied"}
    with kube_stub(world(InferenceService={"ready_after": 2, "failure": failure}), tmp_path, monkeypatch):
        r = deploy()
    assert r.exit_code == 2
    assert "ModelLoadFailed" in r.output and "AccessDenied" in r.output


def test_deploy_refuses_to_switch_a_live_services_mode(tmp_path, monkeypatch):
    with kube_stub(world(), tmp_path, monkeypatch) as kube:
        assert deploy("--mode", "Knative").exit_code == 0
        r = deploy("--mode", "Standard")
        assert r.exit_code == 2 and "runs in Knative mode" in r.output
        assert not kube.requests("PUT")


def test_deploy_forbidden_says_what_the_api_server_said(tmp_path, monkeypatch):
    w = world()
    w["controllers"]["fail"] = [{"method": "POST", "path": "inferenceservices", "status": 403, "reason": "Forbidden",
                                 "message": 'inferenceservices.serving.kserve.io is forbidden: User '
                                            '"system:serviceaccount:team-a:default-editor" cannot create'}]
    with kube_stub(w, tmp_path, monkeypatch):
        r = deploy()
    assert r.exit_code == 2 and "403" in r.output and "cannot create" in r.output


def test_deploy_times_out_with_the_last_state(tmp_path, monkeypatch):
    with kube_stub(world(InferenceService={"ready_after": 10**6}), tmp_path, monkeypatch):
        r = runner.invoke(app, ["deploy", "--model", MODEL, "--namespace", NS, "--poll", "0.05", "--timeout", "0.5"])
    assert r.exit_code == 2 and "not done after" in r.output


def test_wait_survives_transient_api_errors(tmp_path, monkeypatch):
    w = world()
    w["controllers"]["fail"] = [{"method": "GET", "path": "inferenceservices/deepmedix-r1-pipeline$", "status": 500,
                                 "times": 3, "after": 1}]  # the existence check passes, the wait then sees 500s
    with kube_stub(w, tmp_path, monkeypatch) as kube:
        r = deploy()
        assert r.exit_code == 0, r.output
        assert r.output.count("API error (ApiException), retrying") == 3
        assert len(kube.requests("GET", f"{ISVC_PATH}/deepmedix-r1-pipeline")) >= 5


def test_deploy_without_credentials_is_a_clear_401(tmp_path, monkeypatch):
    with kube_stub(world(), tmp_path, monkeypatch) as kube:
        kc = kube.kubeconfig
        kc.write_text(kc.read_text().replace("token: runner-token", "token: wrong"))
        r = deploy()
    assert r.exit_code == 2 and "401" in r.output


def test_deploy_without_kserve_installed(tmp_path, monkeypatch):
    with kube_stub(without(world(), "CustomResourceDefinition", "inferenceservices.serving.kserve.io"),
                   tmp_path, monkeypatch):
        r = deploy()
    assert r.exit_code == 2 and "404" in r.output


# ---------------------------------------------------------------------------------------------- TrainJob launch

def stage_args(*extra: str) -> list[str]:
    return ["stage", "run", "sft", "--nodes", "2", "--gpus-per-node", "8", "--image",
            "ghcr.io/deepmedix/deepmedix-train:0.1.0", "--namespace", NS, "--poll", "0.05", *extra, "--",
            "--data", "s3://deepmedix/r/curate/data", "--model", "s3://deepmedix/r/base/model",
            "--out", "s3://deepmedix/r/sft/model", "-c", "7b"]


LOGS = ["[rank0] sft: step 1/100 loss 2.31", "[rank0] sft: step 2/100 loss 2.02", "sft: saved the model"]


def test_trainjob_runs_streams_the_first_nodes_log_and_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", "seaweedfs.kubeflow:8333")
    w = world(TrainJob={"finish_after": 6, "outcome": "Complete", "logs": LOGS})
    with kube_stub(w, tmp_path, monkeypatch) as kube:
        r = runner.invoke(app, stage_args())
        assert r.exit_code == 0, r.output
        for line in LOGS:
            assert line in r.output
        (post,) = kube.requests("POST", TJ_PATH)
        job = post["body"]
        assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["numProcPerNode"] == 8
        assert {"name": "S3_ENDPOINT", "value": "seaweedfs.kubeflow:8333"} in job["spec"]["trainer"]["env"]
        (stored,) = kube.objects("TrainJob")
        assert stored["spec"]["runtimePatches"]  # Trainer >= 2.2's CRD keeps the GPU pool and /dev/shm
        assert not kube.requests("DELETE")  # a finished TrainJob stays for its logs
        listed = kube.requests("GET", f"/api/v1/namespaces/{NS}/pods")
        # the first node's pod is watched (list + changes), by its JobSet labels
        assert any("jobset.sigs.k8s.io/jobset-name=deepmedix-sft-" in r["query"].get("labelSelector", "")
                   and r["query"].get("watch", "").lower() == "true" for r in listed)
        assert any(r["query"].get("follow", "").lower() == "true" for r in kube.requests("GET", "/log"))


def test_trainjob_logs_forbidden_are_said_once_and_the_job_still_counts(tmp_path, monkeypatch):
    """A Role without `watch` on pods (the chart's before this fix): the log stream cannot start, which is said
    once; the verdict still comes from the TrainJob."""
    monkeypatch.setenv("S3_ENDPOINT", "seaweedfs.kubeflow:8333")
    w = world(TrainJob={"finish_after": 3, "outcome": "Complete", "logs": LOGS})
    for rule in w["rbac"]["runner-token"]["rules"]:
        if rule["resources"] == ["pods"]:
            rule["verbs"].remove("watch")
    with kube_stub(w, tmp_path, monkeypatch):
        r = runner.invoke(app, stage_args())
    assert r.exit_code == 0, r.output
    assert r.output.count("cannot watch its pods for logs (403 Forbidden)") == 1 and LOGS[0] not in r.output


def test_a_kfp_step_leaves_the_model_where_the_trainjob_wrote_it(tmp_path, monkeypatch):
    """In a KFP step the output has a local path and a URI: the TrainJob writes to the URI, and the step's local
    folder stays empty (the launcher uploads nothing from it), so no copy of a 7B model passes through the pod."""
    from deepmedix.cluster.trainjob import run_training

    monkeypatch.setenv("S3_ENDPOINT", "seaweedfs.kubeflow:8333")
    local = tmp_path / "s3" / "deepmedix" / "r" / "sft" / "model"
    with kube_stub(world(), tmp_path / "kube", monkeypatch) as kube:
        out = run_training("sft", (None, "s3://deepmedix/r/curate/data"), (None, "s3://deepmedix/r/base/model"),
                           (str(local), "s3://deepmedix/r/sft/model"), "7b", [], nodes=2, gpus_per_node=8,
                           image="ghcr.io/deepmedix/deepmedix-train:0.1.0", poll_s=0.05, log=lambda _: None)
        (post,) = kube.requests("POST", TJ_PATH)
    assert out["trainjob"] == post["body"]["metadata"]["name"]
    assert "--out" in (cmd := post["body"]["spec"]["trainer"]["command"]) and \
        cmd[cmd.index("--out") + 1] == "s3://deepmedix/r/sft/model"
    assert local.is_dir() and not any(local.iterdir())


def test_trainjob_failure_reason_and_the_job_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", "seaweedfs.kubeflow:8333")
    w = world(TrainJob={"finish_after": 2, "outcome": "Failed", "reason": "BackoffLimitExceeded",
                        "message": "jobset node-0 failed: CUDA out of memory", "logs": LOGS[:1]})
    with kube_stub(w, tmp_path, monkeypatch) as kube:
        r = runner.invoke(app, stage_args())
        assert r.exit_code == 2
        assert "BackoffLimitExceeded" in r.output and "CUDA out of memory" in r.output
        assert not kube.requests("DELETE")


def test_an_old_trainer_that_prunes_runtime_patches_is_refused_and_cleaned_up(tmp_path, monkeypatch):
    """Trainer < 2.2 has no spec.runtimePatches: its CRD prunes it (the API server drops what a structural schema
    does not declare), and the job would start without GPUs pool, /dev/shm or security context."""
    monkeypatch.setenv("S3_ENDPOINT", "seaweedfs.kubeflow:8333")
    old = edit(world(), "CustomResourceDefinition", "trainjobs.trainer.kubeflow.org",
               lambda o: o.update(trainjob_crd(runtime_patches=False)))
    with kube_stub(old, tmp_path, monkeypatch) as kube:
        r = runner.invoke(app, stage_args())
        assert r.exit_code == 2 and "Kubeflow Trainer >= 2.2" in r.output
        (delete,) = kube.requests("DELETE", TJ_PATH)
        assert not kube.objects("TrainJob")


def test_trainjob_timeout_deletes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT", "seaweedfs.kubeflow:8333")
    with kube_stub(world(TrainJob={"outcome": "never"}), tmp_path, monkeypatch) as kube:
        r = runner.invoke(app, stage_args("--timeout", "0.5"))
        assert r.exit_code == 2 and "not done after" in r.output
        assert kube.requests("DELETE", TJ_PATH) and not kube.objects("TrainJob")


def test_trainjob_is_deleted_when_the_step_is_cancelled(tmp_path, monkeypatch):
    """A cancelled KFP run SIGTERMs the step's pod: the launcher deletes the TrainJob on its way out, so no GPU
    stays held by a job nobody waits for."""
    from worlds import env_with

    with kube_stub(world(TrainJob={"outcome": "never", "logs": LOGS}), tmp_path) as kube:
        proc = subprocess.Popen([sys.executable, "-m", "deepmedix.cli", *stage_args()],
                                env=env_with(kube.kubeconfig, S3_ENDPOINT="seaweedfs.kubeflow:8333"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 60
        while not kube.objects("TrainJob") and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert kube.objects("TrainJob"), proc.communicate()[0]
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode != 0
        assert "deleted" in out
        assert kube.requests("DELETE", TJ_PATH) and not kube.objects("TrainJob")


@pytest.mark.parametrize("missing, message", [
    ("S3_ENDPOINT", "S3_ENDPOINT is not set"),
])
def test_trainjob_preflight_needs_the_store(tmp_path, monkeypatch, missing, message):
    monkeypatch.delenv(missing, raising=False)
    with kube_stub(world(), tmp_path, monkeypatch) as kube:
        r = runner.invoke(app, stage_args())
        assert r.exit_code == 2 and message in r.output
        assert not kube.requests("POST")
