"""The DeepMedix-R1 DAG as an Argo ``WorkflowTemplate`` (built with hera), for clusters with Argo Workflows and no
KFP: the same stages in the same order as :mod:`pipelines.deepmedix_pipeline`, plus the Report Arena and deploy.

    python -m pipelines.argo --out pipelines/deepmedix_workflowtemplate.yaml     # render (a test checks it is current)
    kubectl apply -n NS -f pipelines/deepmedix_workflowtemplate.yaml
    argo submit -n NS --from workflowtemplate/deepmedix-r1 -p size=7b -p bucket=BUCKET -p sft_nodes=2 ...

How it maps onto the cluster:

* Each stage is one container template running the ``deepmedix`` CLI in its image: the data image (CPU: curate,
  base model, arena, deploy) or the train image (GPU: SFT, cold start, GRPO, evaluation). The three training stages
  run ``deepmedix stage run STAGE --nodes N --gpus-per-node G -- ...``: one node trains in the pod, several nodes
  make the pod create a Kubeflow Trainer TrainJob (in the train image) and wait for it (the pod then asks for no
  GPU).
* Artifacts are ``s3://<bucket>/runs/<workflow name>/<stage>/<name>`` URIs passed as parameters: the deepmedix store
  reads and writes them itself with ``S3_ENDPOINT``, ``S3_USE_HTTPS``, ``AWS_REGION`` (workflow parameters) and
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the Secret ``deepmedix-s3`` (``secretKeyRef``: by name,
  never a value). The judges' / an API teacher's key comes from the optional Secret ``deepmedix-judge`` the same
  way (as in the KFP pipeline).
* GPU templates: an ``nvidia.com/gpu`` limit, the GPU pool's node selector and toleration (workflow parameters), a
  memory-backed emptyDir at ``/dev/shm``. A resource quantity cannot hold a ``{{...}}`` tag (Argo parses it before
  substituting), so the per-stage GPU count is set by ``podSpecPatch`` over the static limit of 1. The pool is
  given as key / value parameters (KFP's pipeline takes JSON; Argo cannot splice a map into these fields).
* Pods run as uid 1000, non-root, seccomp RuntimeDefault, no privilege escalation, all capabilities dropped
  (Pod Security "restricted"), under the ServiceAccount ``pipeline-runner``; no retries for training; pods of
  successful steps are deleted at once, the workflow after a TTL.
* ``base_model_uri`` empty: the base-model step builds the tiny model (``deepmedix model tiny``); set: the step is
  skipped and SFT starts from that URI. ``run_arena`` and ``deploy`` (``true`` / ``false``, off by default as in
  the KFP pipeline) switch the last two steps.
* Parameter names follow the KFP pipeline's where the two take the same thing.
* A list parameter (config overrides, a JSON list of ``KEY=VALUE``) cannot be spread over container args in Argo,
  so stages with overrides run through ``python -m pipelines.argo exec --overrides JSON -- deepmedix ...``, which
  appends one ``--set ITEM`` per item and execs the command (standard library only: the images have no hera).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pipelines.resources import requests

try:  # rendering needs hera; the images only run `exec`, which does not
    from hera.workflows import (
        DAG,
        Container,
        EmptyDirVolume,
        Env,
        Parameter,
        RetryStrategy,
        SecretEnv,
        Task,
        WorkflowTemplate,
    )
    from hera.workflows import models as m
except ImportError:  # pragma: no cover - exercised in the images
    DAG = Container = EmptyDirVolume = Env = Parameter = RetryStrategy = SecretEnv = Task = WorkflowTemplate = None
    m = None

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "deepmedix_workflowtemplate.yaml"
NAME = "deepmedix-r1"
SERVICE_ACCOUNT = "pipeline-runner"
S3_SECRET = "deepmedix-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # env name == key in the Secret
JUDGE_SECRET = "deepmedix-judge"  # optional: OPENAI_API_KEY for the arena's judges and an API teacher (cold start)
UID = 1000
GPU = "nvidia.com/gpu"
SHM_SIZE = "32Gi"
HOME = "/home/deepmedix"
ARTIFACTS = "s3://{{workflow.parameters.bucket}}/runs/{{workflow.name}}"
# the stages of the KFP pipeline (pipelines.deepmedix_pipeline.STAGE_TASKS) and the two that follow evaluation
EXTRA_TASKS = ("arena", "deploy")


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def wf(name: str) -> str:
    return "{{workflow.parameters.%s}}" % name


# The GPU pool as JSON for `deepmedix stage run` / `deepmedix deploy` (a TrainJob's or InferenceService's pods go to
# the same pool as the workflow's own GPU steps).
POOL_SELECTOR_JSON = '{"' + "{{workflow.parameters.gpu_node_selector_key}}" + '": "' + \
    "{{workflow.parameters.gpu_node_selector_value}}" + '"}'
POOL_TOLERATIONS_JSON = '[{"key": "' + "{{workflow.parameters.gpu_toleration_key}}" + \
    '", "operator": "Exists", "effect": "NoSchedule"}]'


def inp(name: str) -> str:
    return "{{inputs.parameters.%s}}" % name


def artifact(stage: str, name: str) -> str:
    return f"{ARTIFACTS}/{stage}/{name}"


def parameters() -> dict[str, tuple[str, str]]:
    """The workflow parameters: name -> (default, description)."""
    # the same images as the KFP components (DEEPMEDIX_REGISTRY / DEEPMEDIX_VERSION at render time; `make compile`)
    registry = os.environ.get("DEEPMEDIX_REGISTRY", "ghcr.io/deepmedix")
    tag = os.environ.get("DEEPMEDIX_VERSION") or project_version()
    gpu_stage = {"sft": "stage 1 SFT", "coldstart": "stage 2 cold-start SFT", "grpo": "stage 3 GRPO"}
    out = {
        "size": ("tiny", "config size of every stage: configs/<stage>/<size>.yaml (tiny, 7b)"),
        "bucket": ("deepmedix", "S3 bucket of the artifacts: s3://<bucket>/runs/<workflow name>/<stage>/..."),
        "base_model_uri": ("", "a model folder URI to start SFT from; empty: build the tiny model"),
        "curate_overrides": ("[]", "JSON list of KEY=VALUE config overrides for curation"),
        "sft_overrides": ("[]", "JSON list of KEY=VALUE config overrides for stage 1 SFT"),
        "coldstart_overrides": ("[]", "JSON list of KEY=VALUE config overrides for cold-start synthesis and SFT"),
        "grpo_overrides": ("[]", "JSON list of KEY=VALUE config overrides for GRPO (e.g. reward weights)"),
        "eval_overrides": ("[]", "JSON list of KEY=VALUE config overrides for both evaluations"),
        "arena_overrides": ("[]", "JSON list of KEY=VALUE config overrides for the Report Arena (judges)"),
    }
    for stage, what in gpu_stage.items():
        out[f"{stage}_nodes"] = ("1", f"nodes for {what}; more than 1: a Kubeflow Trainer TrainJob")
        out[f"{stage}_gpus_per_node"] = ("1", f"GPUs per node for {what}")
    out.update({
        "synth_gpus": ("1", "GPUs for cold-start trace synthesis (0 with an API teacher)"),
        "eval_gpus": ("1", "GPUs for each evaluation"),
        "gpu_node_selector_key": ("nvidia.com/gpu.present", "node label that selects the GPU pool"),
        "gpu_node_selector_value": ("true", "its value"),
        "gpu_toleration_key": (GPU, "taint key of the GPU pool (tolerated with operator Exists, NoSchedule)"),
        "trainjob_cpu_per_node": ("16", "CPU request of each node of a multi-node TrainJob"),
        "trainjob_memory_per_node": ("128Gi", "memory request and limit of each node of a multi-node TrainJob"),
        "data_image": (f"{registry}/deepmedix-data:{tag}", "CPU image (images/data.Dockerfile)"),
        "train_image": (f"{registry}/deepmedix-train:{tag}", "CUDA image (images/train.Dockerfile)"),
        "serving_image": (f"{registry}/deepmedix-serving:{tag}",
                          "the predictor image the deploy step puts in the InferenceService"),
        "s3_endpoint": ("minio-service.kubeflow:9000", "S3 endpoint, host:port or URL (S3_ENDPOINT)"),
        "s3_use_https": ("0", "1: HTTPS to the S3 endpoint (S3_USE_HTTPS)"),
        "aws_region": ("us-east-1", "S3 region (AWS_REGION)"),
        "llm_base_url": ("", "OpenAI-compatible endpoint of an API teacher / the judges (OPENAI_BASE_URL)"),
        "run_arena": ("false", "true: run the Report Arena on both evaluations (needs judges: arena_overrides)"),
        "deploy": ("false", "true: deploy the GRPO model with KServe after its evaluation"),
        "deploy_name": ("deepmedix-r1-pipeline", "InferenceService name (the Helm chart owns deepmedix-r1)"),
        "deploy_namespace": ("", "namespace of the InferenceService (empty: the workflow's)"),
        "serving_gpus": ("0", "GPUs per serving replica (0: CPU)"),
        "deploy_mode": ("Standard", "KServe deployment mode: Standard (KServe's default) or Knative (scale to zero)"),
    })
    return out


@dataclass(frozen=True)
class Stage:
    """One container template: the ``deepmedix`` argv (after the program name), its inputs, its profile."""
    name: str
    argv: list[str]
    inputs: tuple[str, ...]
    image: str = "data_image"
    overrides: str = ""            # workflow parameter holding a JSON list of config overrides
    gpus: str = ""                 # "" = CPU; else the GPU count: a number or an Argo tag / expression
    cpu: str = "1"
    memory: str = "4Gi"
    retry: bool = True             # pod-level errors (eviction, node loss) only; never for training
    env: tuple[tuple[str, str], ...] = ()
    judge_secret: bool = False
    description: str = ""


def _train_gpus(stage: str) -> str:
    """The pod's GPUs for a training stage: the per-node count on one node; none when it launches a TrainJob."""
    return (f"{{{{=asInt(workflow.parameters.{stage}_nodes) > 1 ? 0 : "
            f"asInt(workflow.parameters.{stage}_gpus_per_node)}}}}")


def _train_argv(stage: str, io: list[str]) -> list[str]:
    return ["stage", "run", stage, "--nodes", wf(f"{stage}_nodes"), "--gpus-per-node", wf(f"{stage}_gpus_per_node"),
            "--image", wf("train_image"), "--node-selector", POOL_SELECTOR_JSON, "--tolerations", POOL_TOLERATIONS_JSON,
            "--cpu-per-node", wf("trainjob_cpu_per_node"), "--memory-per-node", wf("trainjob_memory_per_node"),
            "--", *io, "-c", wf("size")]


def stages() -> list[Stage]:
    size = ["-c", wf("size")]
    train_env = (("TOKENIZERS_PARALLELISM", "false"),)
    llm_env = (("OPENAI_BASE_URL", wf("llm_base_url")),)
    return [
        Stage("curate", ["curate", "--out", inp("out"), *size], ("out",), overrides="curate_overrides",
              **requests("curate"), description="curate the public CXR sets / phantoms into Records"),
        Stage("base-model", ["model", "tiny", "--out", inp("out"), "--data", inp("data"), *size], ("data", "out"),
              **requests("base-model"), description="build the tiny Qwen2.5-VL and its tokenizer"),
        Stage("sft", _train_argv("sft", ["--data", inp("data"), "--model", inp("model"), "--out", inp("out")]),
              ("data", "model", "out"), image="train_image", overrides="sft_overrides", gpus=_train_gpus("sft"),
              **requests("sft"), retry=False, env=train_env, description="stage 1: instruction SFT"),
        Stage("coldstart-synth", ["coldstart", "synth", "--data", inp("data"), "--out", inp("out"), *size],
              ("data", "out"), image="train_image", overrides="coldstart_overrides",
              gpus=wf("synth_gpus"), **requests("coldstart-synth"), env=llm_env, judge_secret=True,
              description="grounded reasoning traces from the teacher, filtered"),
        Stage("coldstart-sft", _train_argv("coldstart", ["--traces", inp("traces"), "--model", inp("model"),
                                                         "--out", inp("out")]),
              ("traces", "model", "out"), image="train_image", overrides="coldstart_overrides",
              gpus=_train_gpus("coldstart"), **requests("coldstart-sft"), retry=False, env=train_env,
              description="stage 2: SFT on the grounded traces"),
        Stage("grpo", _train_argv("grpo", ["--data", inp("data"), "--model", inp("model"), "--out", inp("out")]),
              ("data", "model", "out"), image="train_image", overrides="grpo_overrides", gpus=_train_gpus("grpo"),
              **requests("grpo"), retry=False, env=train_env, description="stage 3: GRPO"),
        Stage("evaluate", ["eval", "run", "--model", inp("model"), "--data", inp("data"), "--out", inp("out"),
                           *size],
              ("model", "data", "out"), image="train_image", overrides="eval_overrides", gpus=wf("eval_gpus"),
              **requests("evaluate"), description="generate on the test split; metrics, predictions, tables"),
        Stage("arena", ["arena", "run", "-p", f"coldstart={inp('coldstart')}", "-p", f"grpo={inp('grpo')}",
                        "--out", inp("out"), *size],
              ("coldstart", "grpo", "out"), overrides="arena_overrides", env=llm_env, judge_secret=True,
              **requests("arena"),
              description="Report Arena: LLM judges compare the two models' answers"),
        Stage("deploy", ["deploy", "--model", inp("model"), "--name", wf("deploy_name"),
                         "--namespace", wf("deploy_namespace"), "--image", wf("serving_image"),
                         "--gpus", wf("serving_gpus"), "--mode", wf("deploy_mode"),
                         "--node-selector", POOL_SELECTOR_JSON, "--tolerations", POOL_TOLERATIONS_JSON],
              ("model",), **requests("deploy"),
              description="create or update the InferenceService serving the model; wait until Ready"),
    ]


# ------------------------------------------------------------------------------------------------ hera objects

def _pod_security() -> "m.PodSecurityContext":
    return m.PodSecurityContext(run_as_non_root=True, run_as_user=UID, run_as_group=UID, fs_group=UID,
                                seccomp_profile=m.SeccompProfile(type="RuntimeDefault"))


def _container_security() -> "m.SecurityContext":
    return m.SecurityContext(allow_privilege_escalation=False, run_as_non_root=True, run_as_user=UID,
                             run_as_group=UID, capabilities=m.Capabilities(drop=["ALL"]),
                             seccomp_profile=m.SeccompProfile(type="RuntimeDefault"))


def _env(stage: Stage) -> list:
    env = [Env(name="S3_ENDPOINT", value=wf("s3_endpoint")), Env(name="S3_USE_HTTPS", value=wf("s3_use_https")),
           Env(name="AWS_REGION", value=wf("aws_region"))]
    env += [SecretEnv(name=key, secret_name=S3_SECRET, secret_key=key) for key in S3_SECRET_KEYS]
    if stage.judge_secret:
        env.append(SecretEnv(name="OPENAI_API_KEY", secret_name=JUDGE_SECRET, secret_key="OPENAI_API_KEY",
                             optional=True))
    env += [Env(name=k, value=v) for k, v in stage.env]
    return env


def _container(stage: Stage):
    if stage.overrides:
        command = ["python", "-m", "pipelines.argo", "exec", "--overrides", wf(stage.overrides), "--", "deepmedix"]
    else:
        command = ["deepmedix"]
    volumes = [EmptyDirVolume(name="cache", mount_path=f"{HOME}/.cache")]
    requests = {"cpu": stage.cpu, "memory": stage.memory}
    limits: dict[str, str] = {}
    extra: dict = {}
    if stage.gpus:
        limits[GPU] = "1"  # the static bound; the stage's count is patched in below
        volumes.append(EmptyDirVolume(name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE))
        extra.update(
            node_selector={wf("gpu_node_selector_key"): wf("gpu_node_selector_value")},
            tolerations=[m.Toleration(key=wf("gpu_toleration_key"), operator="Exists", effect="NoSchedule")],
        )
        patch = {"containers": [{"name": "main", "resources": {"limits": {GPU: stage.gpus}}}]}
        extra["pod_spec_patch"] = json.dumps(patch, separators=(",", ":"))
    if stage.retry:
        extra["retry_strategy"] = RetryStrategy(limit="2", retry_policy="OnError",
                                                backoff=m.Backoff(duration="30s", factor="2"))
    return Container(
        name=stage.name,
        image=wf(stage.image),
        image_pull_policy="IfNotPresent",
        command=command,
        args=stage.argv,
        inputs=[Parameter(name=n) for n in stage.inputs],
        env=_env(stage),
        resources=m.ResourceRequirements(requests=requests, limits=limits or None),
        volumes=volumes,
        security_context=_container_security(),
        annotations={"deepmedix.io/description": stage.description} if stage.description else None,
        **extra,
    )


def build_workflow_template():
    """The ``deepmedix-r1`` WorkflowTemplate (a hera object)."""
    if WorkflowTemplate is None:
        raise RuntimeError("rendering the WorkflowTemplate needs hera (pip install hera==7.1.0)")
    labels = {"app.kubernetes.io/name": "deepmedix", "app.kubernetes.io/part-of": "deepmedix",
              "app.kubernetes.io/version": project_version()}
    with WorkflowTemplate(
        name=NAME,
        labels=labels,
        annotations={"workflows.argoproj.io/description":
                     "DeepMedix-R1: curate -> base model -> SFT -> cold start (synthesis, SFT; evaluated) -> GRPO "
                     "-> evaluate -> Report Arena, deploy. Rendered by `python -m pipelines.argo`."},
        entrypoint="main",
        arguments=[Parameter(name=k, value=v, description=d) for k, (v, d) in parameters().items()],
        service_account_name=SERVICE_ACCOUNT,
        security_context=_pod_security(),
        pod_metadata=m.Metadata(labels={"app.kubernetes.io/part-of": "deepmedix"}),
        pod_gc=m.PodGC(strategy="OnPodSuccess"),
        ttl_strategy=m.TTLStrategy(seconds_after_success=3 * 86400, seconds_after_failure=7 * 86400),
    ) as wt:
        t = {s.name: _container(s) for s in stages()}
        base_from_uri = ("{{=workflow.parameters.base_model_uri != '' ? workflow.parameters.base_model_uri : "
                         "'s3://' + workflow.parameters.bucket + '/runs/' + workflow.name + '/base-model/model'}}")
        data = artifact("curate", "data")
        with DAG(name="main"):
            Task(name="curate", template=t["curate"], arguments={"out": data})
            Task(name="base-model", template=t["base-model"], dependencies=["curate"],
                 when="{{=workflow.parameters.base_model_uri == ''}}",
                 arguments={"data": data, "out": artifact("base-model", "model")})
            Task(name="sft", template=t["sft"], dependencies=["curate", "base-model"],
                 arguments={"data": data, "model": base_from_uri, "out": artifact("sft", "model")})
            Task(name="coldstart-synth", template=t["coldstart-synth"], dependencies=["curate"],
                 arguments={"data": data, "out": artifact("coldstart-synth", "traces")})
            Task(name="coldstart-sft", template=t["coldstart-sft"], dependencies=["coldstart-synth", "sft"],
                 arguments={"traces": artifact("coldstart-synth", "traces"), "model": artifact("sft", "model"),
                            "out": artifact("coldstart-sft", "model")})
            Task(name="evaluate-coldstart", template=t["evaluate"], dependencies=["curate", "coldstart-sft"],
                 arguments={"model": artifact("coldstart-sft", "model"), "data": data,
                            "out": artifact("evaluate-coldstart", "results")})
            Task(name="grpo", template=t["grpo"], dependencies=["curate", "coldstart-sft"],
                 arguments={"data": data, "model": artifact("coldstart-sft", "model"),
                            "out": artifact("grpo", "model")})
            Task(name="evaluate", template=t["evaluate"], dependencies=["curate", "grpo"],
                 arguments={"model": artifact("grpo", "model"), "data": data,
                            "out": artifact("evaluate", "results")})
            Task(name="arena", template=t["arena"], dependencies=["evaluate-coldstart", "evaluate"],
                 when="{{=workflow.parameters.run_arena == 'true'}}",
                 arguments={"coldstart": artifact("evaluate-coldstart", "results"),
                            "grpo": artifact("evaluate", "results"), "out": artifact("arena", "leaderboard")})
            Task(name="deploy", template=t["deploy"], dependencies=["grpo", "evaluate"],
                 when="{{=workflow.parameters.deploy == 'true'}}",
                 arguments={"model": artifact("grpo", "model")})
    return wt


def render() -> dict:
    """The WorkflowTemplate as a plain dict (what the YAML holds)."""
    return build_workflow_template().to_dict()


HEADER = ("# Generated by `python -m pipelines.argo --out pipelines/deepmedix_workflowtemplate.yaml` from\n"
          "# pipelines/argo.py; do not edit (tests/cluster/test_argo.py checks that it is current).\n")


def render_yaml() -> str:
    import yaml

    return HEADER + yaml.safe_dump(render(), sort_keys=False, width=120, allow_unicode=True)


def write(out: str | Path = DEFAULT_OUT) -> Path:
    out = Path(out)
    out.write_text(render_yaml())
    return out


# ------------------------------------------------------------------------------------------------ in the pod

def expand_overrides(overrides_json: str) -> list[str]:
    """``'["a=1", "b.c=x"]'`` -> ``["--set", "a=1", "--set", "b.c=x"]``; anything but a JSON list of KEY=VALUE
    strings is a ValueError."""
    try:
        items = json.loads(overrides_json or "[]")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--overrides: not JSON ({exc.msg}): {overrides_json!r}") from None
    if not isinstance(items, list):
        raise ValueError(f"--overrides: expected a JSON list of KEY=VALUE strings, got {overrides_json!r}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"--overrides: {item!r} is not a KEY=VALUE string")
        out += ["--set", item]
    return out


def exec_main(argv: list[str]) -> int:
    """``exec --overrides JSON -- COMMAND ARGS...``: replace this process by COMMAND ARGS plus the overrides."""
    if "--" not in argv:
        print("usage: python -m pipelines.argo exec [--overrides JSON] -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="python -m pipelines.argo exec")
    ap.add_argument("--overrides", default="[]", help="JSON list of KEY=VALUE config overrides")
    opts = ap.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        print("error: no command after --", file=sys.stderr)
        return 2
    try:
        extra = expand_overrides(opts.overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    os.execvp(command[0], command + extra)
    return 0  # pragma: no cover - execvp does not return


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["exec"]:
        return exec_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m pipelines.argo", description="Render the Argo WorkflowTemplate "
                                 "(or, in a pod: exec [--overrides JSON] -- COMMAND ...).")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="where to write the YAML ('-': stdout)")
    args = ap.parse_args(argv)
    if args.out == "-":
        sys.stdout.write(render_yaml())
    else:
        print(write(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
