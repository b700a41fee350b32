"""The pipeline compiles to IR naming every stage with its cluster settings (GPUs, pool, shared memory, secrets by
name), the checked-in IR is current, and kfp.local runs it whole."""

from __future__ import annotations

import json

import yaml
from conftest import nonfinite

from pipelines.compile import DEFAULT_OUT, compile_pipeline
from pipelines.deepmedix_pipeline import (
    GPU_NODE_SELECTOR,
    GPU_TASKS,
    GPU_TOLERATIONS,
    OPTIONAL_TASKS,
    PIPELINE_ROOT,
    STAGE_TASKS,
    TRAINING_TASKS,
)


def _compiled(tmp_path):
    ir, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text())
    return ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _dag_task(ir, task: str) -> dict:
    """A task's entry in the DAG that holds it (the root or a condition branch)."""
    for comp in [ir["root"], *ir["components"].values()]:
        if task in (comp.get("dag") or {}).get("tasks", {}):
            return comp["dag"]["tasks"][task]
    raise KeyError(task)


def _executor(ir, task: str) -> str:
    """The executor label of a task, wherever it sits (the root DAG or a condition branch)."""
    for comp in [ir["root"], *ir["components"].values()]:
        for name, t in (comp.get("dag") or {}).get("tasks", {}).items():
            if name == task and "executorLabel" in ir["components"][t["componentRef"]["name"]]:
                return ir["components"][t["componentRef"]["name"]]["executorLabel"]
    raise KeyError(task)


def test_compiles_and_names_every_stage(tmp_path):
    ir, _ = _compiled(tmp_path)
    tasks = ir["root"]["dag"]["tasks"]
    assert set(STAGE_TASKS) <= {t["taskInfo"]["name"] for t in tasks.values()}
    execs = ir["deploymentSpec"]["executors"]
    assert len(execs) == len(STAGE_TASKS) + len(OPTIONAL_TASKS) + 1  # + step-gpus
    for label, ex in execs.items():
        assert ex["container"]["image"].startswith("ghcr.io/deepmedix/deepmedix-")
        assert "pip install" not in " ".join(ex["container"]["command"])  # install_kfp_package=False
        if label != "exec-step-gpus":  # every stage's body calls the library
            assert "from deepmedix" in " ".join(ex["container"]["command"]), label
    assert tasks["grpo"]["cachingOptions"] == {} and tasks["sft"]["cachingOptions"] == {}
    assert set(ir["root"]["inputDefinitions"]["parameters"]) >= {
        "size", "base_model_uri", "sft_overrides", "curate_overrides", "grpo_overrides", "sft_nodes",
        "sft_gpus_per_node", "grpo_nodes", "grpo_gpus_per_node", "gpu_node_selector", "gpu_tolerations"}
    # the pipeline root comes from the namespace's kfp-launcher ConfigMap (the chart: s3://) or `submit
    # --pipeline-root`; a root compiled in would outrank the ConfigMap
    assert "defaultPipelineRoot" not in ir and PIPELINE_ROOT.startswith("s3://")


def test_gpu_steps_carry_gpus_pool_and_shared_memory_and_cpu_steps_none(tmp_path):
    ir, kube = _compiled(tmp_path)
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["defaultValue"] == GPU_NODE_SELECTOR
    assert params["gpu_tolerations"]["defaultValue"] == GPU_TOLERATIONS
    for task in STAGE_TASKS + OPTIONAL_TASKS:
        label = _executor(ir, task)
        container = ir["deploymentSpec"]["executors"][label]["container"]
        k8s = kube[label]
        if task in GPU_TASKS:
            acc = container["resources"]["accelerator"]
            assert acc["resourceType"] == "nvidia.com/gpu", (task, acc)
            assert acc["resourceCount"].startswith("{{$.inputs.parameters['pipelinechannel--step-gpus-"), (task, acc)
            assert k8s["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "gpu_node_selector"}}
            assert k8s["tolerations"] == [{"tolerationJson": {"componentInputParameter": "gpu_tolerations"}}]
            assert k8s["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "32Gi",
                                              "volumeName": "dshm"}]
            assert "deepmedix-train" in container["image"]
        else:
            assert "accelerator" not in container["resources"], task  # CPU and memory requests only
            assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(k8s), task
            assert "deepmedix-data" in container["image"], task
    for task in TRAINING_TASKS:  # a training step's own GPUs: its GPUs per node, or none when it runs a TrainJob
        label = _executor(ir, task)
        stage = task.split("-")[0]
        count = ir["deploymentSpec"]["executors"][label]["container"]["resources"]["accelerator"]["resourceCount"]
        assert count == f"{{{{$.inputs.parameters['pipelinechannel--step-gpus-{stage}']}}}}", count
        assert ir["root"]["dag"]["tasks"][task]["inputs"]["parameters"][f"pipelinechannel--step-gpus-{stage}"] == {
            "taskOutputParameter": {"outputParameterKey": stage, "producerTask": "step-gpus"}}
        assert kube[label]["nodeSelector"] and kube[label]["tolerations"]  # the pool, also for the TrainJob
    from components.stages import step_gpus

    own = step_gpus.python_func
    assert tuple(own(1, 8, 2, 8, 4, 4, 1, 2)) == ("8", "0", "0", "1", "2")
    assert tuple(own(1, 1, 1, 2, 1, 1, 0, 1)) == ("1", "2", "1", "0", "1")


def test_accelerator_counts_reach_the_driver_as_strings(tmp_path):
    """The KFP 2.x driver resolves a pod-spec runtime parameter with ``val.GetStringValue()``
    (backend/src/v2/driver, ``resolvePodSpecInputRuntimeParameter``) and sets ``nvidia.com/gpu`` only when the
    result is not empty: a NUMBER parameter resolves to "" and the pod gets no GPU limit. Every GPU step's count is
    therefore a STRING output of step-gpus, never a pipeline int parameter."""
    ir, _ = _compiled(tmp_path)
    outputs = ir["components"]["comp-step-gpus"]["outputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in outputs.items()} == {k: "STRING" for k in
                                                                  ("sft", "coldstart", "grpo", "synth", "eval")}
    for task in GPU_TASKS:
        count = ir["deploymentSpec"]["executors"][_executor(ir, task)]["container"]["resources"]["accelerator"][
            "resourceCount"]
        channel = count.split("'")[1]
        src = _dag_task(ir, task)["inputs"]["parameters"][channel]
        assert src["taskOutputParameter"]["producerTask"] == "step-gpus", (task, src)
        assert outputs[src["taskOutputParameter"]["outputParameterKey"]]["parameterType"] == "STRING"
        assert "step-gpus" in _dag_task(ir, task)["dependentTasks"], task  # the count exists before the pod


def test_secrets_by_name_only_and_training_uncached(tmp_path):
    ir, kube = _compiled(tmp_path)
    for label, k8s in kube.items():
        if label == "exec-step-gpus":
            assert not k8s.get("secretAsEnv"), "step-gpus reads nothing"
            continue
        refs = k8s["secretAsEnv"]
        assert {e["envVar"] for r in refs for e in r["keyToEnv"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        for r in refs:
            assert set(r) <= {"keyToEnv", "optional", "secretNameParameter", "secretName"}, r
            # the S3 Secret by the pipeline parameter's name (inside a condition branch: its channel), the judge's by
            # a fixed name
            assert r.get("secretNameParameter", {}).get("componentInputParameter") in (
                "s3_secret", "pipelinechannel--s3_secret") or r.get("secretName") == "deepmedix-judge", r
        (cm,) = k8s["configMapAsEnv"]
        assert {e["envVar"] for e in cm["keyToEnv"]} == {"S3_ENDPOINT", "S3_USE_HTTPS", "AWS_REGION"}
        assert cm["optional"] is True and cm["configMapNameParameter"]["componentInputParameter"] in (
            "s3_env_configmap", "pipelinechannel--s3_env_configmap")
    text = (tmp_path / "p.yaml").read_text()
    for needle in ("aws_secret_access_key:", "AKIA", "password", "secretKeyValue"):
        assert needle not in text.lower() if needle.islower() else needle not in text
    for container in ir["deploymentSpec"]["executors"].values():
        assert not container["container"].get("env"), "no literal env values in any step"
    tasks = ir["root"]["dag"]["tasks"]
    for task in TRAINING_TASKS + ("coldstart-synth", "evaluate", "evaluate-coldstart"):
        assert tasks[task]["cachingOptions"] == {}, task
    assert tasks["curate"]["cachingOptions"] == {"enableCache": True}
    # side effects are never taken from the cache: a cached deploy would leave the cluster as it was, a cached
    # arena would skip the judges
    for task in OPTIONAL_TASKS:
        assert _dag_task(ir, task)["cachingOptions"] == {}, task


def test_every_step_requests_cpu_and_memory_as_the_argo_template_does(tmp_path):
    """A pod without requests is scheduled as if it needed nothing (and its /dev/shm counts against memory):
    every executor in the IR requests CPU and memory, the values of pipelines/resources.py, which the Argo
    WorkflowTemplate's steps request too."""
    from pipelines.argo import stages
    from pipelines.resources import REQUESTS

    ir, _ = _compiled(tmp_path)
    names = ["step-gpus", *STAGE_TASKS, *OPTIONAL_TASKS]
    assert sorted(names) == sorted(REQUESTS)
    for task in names:
        res = ir["deploymentSpec"]["executors"][_executor(ir, task)]["container"]["resources"]
        assert (res["resourceCpuRequest"], res["resourceMemoryRequest"]) == REQUESTS[task], task
    argo = {st.name: (st.cpu, st.memory) for st in stages()}
    assert argo == {k: v for k, v in REQUESTS.items() if k in argo} and len(argo) >= 9


def test_checked_in_ir_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert DEFAULT_OUT.read_text() == fresh, "run `make compile` and commit pipelines/deepmedix_pipeline.yaml"


def test_kfp_local_runs_the_whole_pipeline(tmp_path):
    from pipelines.demo import run_pipeline_local, stage_metrics

    fast = ["max_steps=2", "per_device_train_batch_size=4", "eval_records=2", "max_records=12"]
    run = run_pipeline_local(
        tmp_path / "root", size="tiny",
        curate_overrides=["n_patients=6", "image_size=128", "vqa_per_study=1"],
        sft_overrides=fast, coldstart_overrides=fast,
        grpo_overrides=["max_steps=1", "per_device_train_batch_size=2", "num_generations=2",
                        "max_completion_length=8", "eval_records=2", "max_records=4"],
        eval_overrides=["max_records=6", "max_new_tokens=8"])
    rows = {r["task"]: r for r in stage_metrics(run)}
    assert list(rows) == list(STAGE_TASKS)
    for task, row in rows.items():  # every number a stage logged is a real number (a NaN fails here)
        assert "wall_s" in row and not nonfinite(row), (task, nonfinite(row))
    assert rows["curate"]["after"] > 0
    assert rows["base-model"]["after"] > 0  # parameters
    for task in ("sft", "coldstart-sft"):
        assert rows[task]["metric"] == "val_loss" and 0 < rows[task]["after"] and 0 < rows[task]["before"]
    assert rows["sft"]["after"] < rows["sft"]["before"]
    assert rows["coldstart-synth"]["after"] > 0  # traces kept
    assert rows["grpo"]["metric"] == "val_reward_paper" and 0 <= rows["grpo"]["before"] <= 1
    assert 0 <= rows["grpo"]["after"] <= 1
    for task in ("evaluate-coldstart", "evaluate"):
        assert rows[task]["metric"] == "format_compliance" and 0 <= rows[task]["format_compliance"] <= 1
    preds = (run / "evaluate" / "results" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 6 and json.loads(preds[0])["record_id"]
    assert (run / "grpo" / "model" / "config.json").exists()
    # the dataset card, one HTML page with its PNGs inlined (the curate step's HTML artifact for KFP's UI)
    card = (run / "curate" / "card").read_text()
    assert card.startswith("<!doctype html>") and "Records by source" not in card  # the chart is an image
    assert card.count('src="data:image/png;base64,') >= 4 and "<td>phantom</td>" in card
    # lineage: `evaluate` scored the model GRPO wrote (by content hash), `evaluate-coldstart` the cold-start model
    from deepmedix import store

    scored = store.read_lineage(run / "evaluate" / "results")["inputs"]["model"]
    assert scored["sha256"] == store.read_lineage(run / "grpo" / "model")["sha256"] == store.dir_hash(
        run / "grpo" / "model")
    cold = store.read_lineage(run / "evaluate-coldstart" / "results")["inputs"]["model"]
    assert cold["sha256"] == store.read_lineage(run / "coldstart-sft" / "model")["sha256"] != scored["sha256"]


def test_compile_for_a_size_resolves_every_stage_config_and_makes_it_the_default(tmp_path):
    from typer.testing import CliRunner

    from deepmedix.cli import app

    r = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(tmp_path / "7b.yaml"), "--size", "7b"])
    assert r.exit_code == 0, r.output
    ir = next(yaml.safe_load_all((tmp_path / "7b.yaml").read_text()))
    assert ir["root"]["inputDefinitions"]["parameters"]["size"]["defaultValue"] == "7b"
    default = next(yaml.safe_load_all(DEFAULT_OUT.read_text()))
    assert default["root"]["inputDefinitions"]["parameters"]["size"]["defaultValue"] == "tiny"
    # a size some stage has no config for fails before anything is written, naming every missing file
    r = CliRunner().invoke(app, ["pipeline", "compile", "--out", str(tmp_path / "13b.yaml"), "--size", "13b"])
    assert r.exit_code == 2 and not (tmp_path / "13b.yaml").exists()
    assert "configs/curate/13b.yaml" in r.output and "configs/arena/13b.yaml" in r.output


def test_steps_that_only_pass_a_uri_on_download_nothing(tmp_path):
    """KFP's launcher downloads every input artifact before the step's code runs (backend/src/v2/component/
    launcher_v2.go downloadArtifacts, no opt-out in 2.17): the training stages (a multi-node one only hands URIs to
    its TrainJob) and deploy (KServe fetches the model in the predictor pod) take URIs, string outputs of the steps
    that made them."""
    ir, _ = _compiled(tmp_path)
    producers = {"sft": {"data_uri": "curate", "base_uri": "base-model"},
                 "coldstart-sft": {"traces_uri": "coldstart-synth", "base_uri": "sft"},
                 "grpo": {"data_uri": "curate", "base_uri": "coldstart-sft"}, "deploy": {"model_uri": "grpo"}}
    for task, inputs in producers.items():
        comp = ir["components"][_dag_task(ir, task)["componentRef"]["name"]]
        assert not comp["inputDefinitions"].get("artifacts"), task
        for name, producer in inputs.items():
            src = _dag_task(ir, task)["inputs"]["parameters"][name]
            # deploy sits in the `deploy == True` branch: the value reaches it as the branch's input channel
            assert src.get("taskOutputParameter") == {"producerTask": producer, "outputParameterKey": "Output"} or \
                src.get("componentInputParameter") == f"pipelinechannel--{producer}-Output", (task, name, src)
    # the training stages' TrainJob resources are pipeline parameters, not constants
    root = ir["root"]["inputDefinitions"]["parameters"]
    assert root["trainjob_cpu_per_node"]["defaultValue"] == "16"
    assert root["trainjob_memory_per_node"]["defaultValue"] == "128Gi"
