"""``deepmedix pipeline submit`` end to end: the real ``kfp.Client`` against a stand-in KFP API server process
(``kfp_stub.py``, the v2beta1 REST API): the run it creates, single-user and multi-user, and its failures."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import server_process
from typer.testing import CliRunner

from deepmedix.cli import app

HERE = Path(__file__).resolve().parent
runner = CliRunner()
PARAMS = {"size": "tiny", "sft_nodes": 2, "sft_gpus_per_node": 8, "gpu_node_selector": {"pool": "h100"},
          "deploy": True, "deploy_mode": "Standard"}


def state(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/_stub/state", timeout=10) as r:
        return json.load(r)


def submit(url: str, params: Path, *extra: str):
    return runner.invoke(app, ["pipeline", "submit", "--host", url, "--params", str(params), *extra])


@pytest.fixture
def params(tmp_path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(PARAMS))
    return p


def test_submit_creates_a_run_with_the_compiled_pipeline_and_the_parameters(tmp_path, params):
    with server_process(HERE / "kfp_stub.py", [], tmp_path, ready_path="/_stub/state") as url:
        r = submit(url, params, "--pipeline-root", "s3://team-bucket/root", "--run-name", "r1")
        assert r.exit_code == 0, r.output
        again = submit(url, params)
        assert again.exit_code == 0, again.output
        s = state(url)
    (exp,) = s["experiments"]  # created once, then found by name
    assert exp["display_name"] == "deepmedix"
    first, second = s["runs"]
    assert first["display_name"] == "r1" and first["experiment_id"] == exp["experiment_id"]
    assert first["runtime_config"]["parameters"] == PARAMS
    assert first["runtime_config"]["pipeline_root"] == "s3://team-bucket/root"
    assert first["pipeline_spec"]["pipelineInfo"]["name"] == "deepmedix-r1"
    assert first["pipeline_spec"]["root"]["dag"]["tasks"]["sft"]["componentRef"]["name"] == "comp-sft"
    # the Kubernetes settings the driver applies travel in the platform spec: the S3 Secret, the GPU pool
    sft = first["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-sft"]
    assert sft["secretAsEnv"][0]["secretNameParameter"] and sft["nodeSelector"] and sft["tolerations"]
    assert f"{url}/#/runs/details/{first['run_id']}" in r.output
    assert not second["runtime_config"].get("pipeline_root")  # the namespace's kfp-launcher decides


def test_multi_user_needs_the_namespace(tmp_path, params):
    with server_process(HERE / "kfp_stub.py", ["--multi-user"], tmp_path, ready_path="/_stub/state") as url:
        r = submit(url, params)
        assert r.exit_code == 2 and "multi-user" in r.output and "--namespace" in r.output
        ok = submit(url, params, "--namespace", "team-a")
        assert ok.exit_code == 0, ok.output
        s = state(url)
    assert [e["namespace"] for e in s["experiments"]] == ["team-a"] and len(s["runs"]) == 1


def test_a_token_from_the_named_env_var(tmp_path, params, monkeypatch):
    with server_process(HERE / "kfp_stub.py", ["--token", "s3cret"], tmp_path, ready_path="/_stub/state") as url:
        denied = submit(url, params)
        assert denied.exit_code == 2 and "HTTP 401" in denied.output
        monkeypatch.setenv("MY_KFP_TOKEN", "s3cret")
        ok = submit(url, params, "--token-env", "MY_KFP_TOKEN")
        assert ok.exit_code == 0, ok.output
        assert len(state(url)["runs"]) == 1


def test_an_auth_proxys_login_page_asks_for_a_token(tmp_path, params):
    with server_process(HERE / "kfp_stub.py", ["--token", "t", "--login-page"], tmp_path,
                        ready_path="/_stub/state") as url:
        r = submit(url, params)
    assert r.exit_code == 2 and "not JSON (a login page?)" in r.output and "--token-env" in r.output


def test_the_pipeline_root_must_be_on_s3(tmp_path, params):
    r = submit("http://127.0.0.1:9", params, "--pipeline-root", "minio://mlpipeline/v2/artifacts")
    assert r.exit_code == 2 and "not an s3://bucket/prefix URI" in r.output


def test_a_host_without_the_api_path_is_a_404(tmp_path, params):
    """Kubeflow serves the API under /pipeline: a host without it reaches something else."""
    with server_process(HERE / "kfp_stub.py", ["--prefix", "/pipeline"], tmp_path, ready_path="/_stub/state") as url:
        wrong = submit(url, params)
        assert wrong.exit_code == 2 and "HTTP 404" in wrong.output
        ok = submit(url + "/pipeline", params)
        assert ok.exit_code == 0, ok.output


def test_an_unreachable_api_names_the_host(tmp_path, params):
    r = submit("http://127.0.0.1:9", params)
    assert r.exit_code == 2 and "KFP API at http://127.0.0.1:9: not reachable" in r.output
