"""The cluster commands of the CLI (``deepmedix stage run``, ``deploy``, ``doctor``), registered on its Typer apps
by ``deepmedix.cli``: they talk to a Kubernetes API and import nothing of the deployables."""

from __future__ import annotations

import json

import typer

from deepmedix.errors import InputError


def gpu_pool(node_selector: str, tolerations: str, cpu_per_node: str = "", memory_per_node: str = ""):
    """A GpuPool from JSON options (empty: the defaults); a bad value is a clear error naming the option."""
    import re

    from deepmedix.cluster.trainjob import GpuPool

    pool = GpuPool()
    for flag, value, pattern, attr in (("--cpu-per-node", cpu_per_node, r"\d+(\.\d+)?m?", "cpu_per_node"),
                                       ("--memory-per-node", memory_per_node, r"\d+(\.\d+)?([EPTGMK]i|[EPTGMk])?",
                                        "memory_per_node")):
        if value and not re.fullmatch(pattern, value):
            raise InputError(f"{flag}: {value!r} is not a Kubernetes quantity")
        if value:
            setattr(pool, attr, value)
    for flag, text, kind, attr in (("--node-selector", node_selector, dict, "node_selector"),
                                   ("--tolerations", tolerations, list, "tolerations")):
        if text:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{flag}: not valid JSON ({exc})") from None
            if not isinstance(value, kind):
                raise InputError(f"{flag}: expected a JSON {kind.__name__}")
            setattr(pool, attr, value)
    return pool


def stage_options(args: list[str], data_opt: str) -> dict:
    """``--data X --model Y --out Z [-c SIZE] [--set K=V ...]`` -> a dict; anything else is a clear error."""
    opts: dict = {"config": "tiny", "set": []}
    names = {data_opt: "data", "--model": "model", "--out": "out", "--config": "config", "-c": "config",
             "--set": "set", "-s": "set"}
    args = [a for a in args if a != "--"]
    while args:
        flag = args.pop(0)
        if flag not in names or not args:
            raise InputError(f"stage options: unexpected {flag!r} (expected {data_opt}, --model, --out, -c, --set)")
        value = args.pop(0)
        opts["set"].append(value) if names[flag] == "set" else opts.__setitem__(names[flag], value)
    missing = [n for n in ("data", "model", "out") if n not in opts]
    if missing:
        raise InputError(f"stage options: missing {', '.join('--' + m if m != 'data' else data_opt for m in missing)}")
    return opts


def register(app: typer.Typer, stage_app: typer.Typer, cli_errors, show) -> None:
    """Add the commands; ``cli_errors`` and ``show`` are the CLI's error context and result printer."""
    @stage_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def stage_run(ctx: typer.Context, stage: str = typer.Argument(..., help="sft, coldstart or grpo"),
                  nodes: int = typer.Option(1, help="nodes; more than 1: a Kubeflow Trainer TrainJob"),
                  gpus_per_node: int = typer.Option(1, help="GPUs per node (torchrun processes)"),
                  image: str = typer.Option("", help="the training image (for a TrainJob)"),
                  namespace: str = typer.Option("", help="the TrainJob's namespace (default: this pod's)"),
                  node_selector: str = typer.Option("", help='GPU pool node selector, JSON: {"label": "value"}'),
                  tolerations: str = typer.Option("", help='GPU pool tolerations, JSON: [{"key": ..., ...}]'),
                  s3_secret: str = typer.Option("deepmedix-s3", help="the Secret with the S3 credentials"),
                  cpu_per_node: str = typer.Option("16", help="a TrainJob node's CPU request"),
                  memory_per_node: str = typer.Option("128Gi", help="a TrainJob node's memory request and limit"),
                  timeout: float = typer.Option(7 * 24 * 3600, help="seconds to wait for a TrainJob"),
                  poll: float = typer.Option(15, help="seconds between a TrainJob's status reads")):
        """A training stage on one or more nodes; after `--` the stage's own options (--data/--traces, --model,
        --out, -c, --set). The Argo WorkflowTemplate's training steps run this."""
        from deepmedix.cluster.trainjob import STAGES, run_training

        with cli_errors():
            if stage not in STAGES:
                raise InputError(f"stage: {stage!r} is not one of {sorted(STAGES)}")
            opts = stage_options(list(ctx.args), STAGES[stage][1])
            show(run_training(stage, (opts["data"],) * 2, (opts["model"],) * 2, (opts["out"],) * 2, opts["config"],
                              opts["set"], nodes, gpus_per_node, image, namespace,
                              pool=gpu_pool(node_selector, tolerations, cpu_per_node, memory_per_node),
                              s3_secret=s3_secret, poll_s=poll,
                              timeout_s=timeout))

    @app.command("deploy")
    def deploy_cmd(model: str = typer.Option(..., help="the model folder's s3:// URI"),
                   name: str = typer.Option("deepmedix-r1-pipeline", help="the InferenceService's name (the Helm "
                                                                           "chart owns deepmedix-r1)"),
                   namespace: str = typer.Option("", help="default: this pod's namespace"),
                   image: str = typer.Option("", help="the serving image (default: the release's)"),
                   gpus: int = typer.Option(0, help="GPUs per replica (0: CPU)"),
                   mode: str = typer.Option("Standard", help="KServe deployment mode: Standard or Knative"),
                   node_selector: str = typer.Option("", help="with --gpus: the GPU pool's node selector, JSON"),
                   tolerations: str = typer.Option("", help="with --gpus: the GPU pool's tolerations, JSON"),
                   timeout: float = typer.Option(1800, help="seconds to wait for Ready"),
                   poll: float = typer.Option(10, help="seconds between status reads")):
        """Create or replace the InferenceService for a model folder on S3 and wait until the new model is Ready."""
        from deepmedix.cluster.deploy import SERVING_IMAGE, Serving, deploy_model

        with cli_errors():
            pool = gpu_pool(node_selector, tolerations) if gpus else None
            placement = {"node_selector": pool.node_selector, "tolerations": pool.tolerations} if pool else {}
            show(deploy_model(model, name, namespace, Serving(image=image or SERVING_IMAGE, gpus=gpus,
                                                              deployment_mode=mode, **placement), timeout_s=timeout,
                                     poll_s=poll))

    @app.command("doctor")
    def doctor_cmd(namespace: str = typer.Option("", help="the namespace runs go to (default: the kubeconfig's "
                                                          "or this pod's)"),
                   params: str = typer.Option("", help="the pipeline parameters file the run will use (GPU pool, "
                                                       "nodes, deploy mode): checked against the cluster"),
                   kfp_namespace: str = typer.Option("kubeflow", help="where Kubeflow Pipelines runs"),
                   as_json: bool = typer.Option(False, "--json", help="the findings as JSON")):
        """Check a live cluster before a run: KFP and the namespace's kfp-launcher, Kubeflow Trainer, KServe,
        Knative, KEDA/Prometheus, Pod Security, GPU nodes, the S3 Secret and bucket. One line per finding with
        what to fix; exit 1 when a run would fail."""
        from deepmedix.cluster import doctor

        with cli_errors():
            plan = doctor.Plan.from_params(namespace or _kube_namespace(), _params(params))
            findings = doctor.run(plan, kfp_namespace)
        typer.echo(doctor.report(findings, as_json))
        raise typer.Exit(1 if any(f.level == "fail" for f in findings) else 0)

    @app.command("kfp-launcher")
    def kfp_launcher_cmd(source: str = typer.Option(..., "--from", help="the ConfigMap holding defaultPipelineRoot "
                                                                        "and providers (the chart's "
                                                                        "<release>-kfp-launcher)"),
                         namespace: str = typer.Option("", help="default: this pod's namespace")):
        """Merge DeepMedix's pipeline root and S3 provider into the namespace's kfp-launcher ConfigMap (created when
        missing; every other key kept). The chart's post-install hook runs this."""
        from deepmedix.cluster.k8s import current_namespace
        from deepmedix.cluster.launcher import merge_launcher_config

        with cli_errors():
            merge_launcher_config(namespace or current_namespace(), source)


def _kube_namespace() -> str:
    """The kubeconfig context's namespace, else this pod's, else ``default``."""
    import os

    from deepmedix.cluster.k8s import current_namespace

    try:
        from kubernetes import config

        _, ctx = config.list_kube_config_contexts(config_file=os.environ.get("KUBECONFIG") or None)
        if ctx and ctx.get("context", {}).get("namespace"):
            return ctx["context"]["namespace"]
    except Exception:  # noqa: BLE001 - no kubeconfig: in a pod, or the default
        pass
    return current_namespace()


def _params(path: str) -> dict:
    from deepmedix.config import read_mapping

    return read_mapping(path, "parameters file") if path else {}
