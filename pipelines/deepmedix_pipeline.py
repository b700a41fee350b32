"""The DeepMedix-R1 DAG: curate -> base model -> stage 1 SFT -> cold start (synthesis, SFT; evaluated) -> GRPO ->
evaluate -> [Report Arena] -> [deploy].

Only the wiring lives here; every step is a component of ``components.stages``. Cluster settings:

* GPU steps (the training stages, cold-start synthesis, evaluation) get ``set_accelerator_type`` /
  ``set_accelerator_limit`` (GPUs per node from the parameters, each a *string* output of ``step-gpus``: the KFP
  driver reads an accelerator count parameter as a string and sets no limit for an int), the GPU pool's node
  selector and tolerations (parameters, JSON), and a memory-backed ``/dev/shm``; curation, the arena and deploy
  get none of these.
* Every step gets the S3 credentials from the Secret named by ``s3_secret`` as environment (by name only), and
  the non-secret endpoint settings (``S3_ENDPOINT``, ``S3_USE_HTTPS``, ``AWS_REGION``) from the ConfigMap named
  by ``s3_env_configmap`` (the Helm chart's ``<release>-s3-env``) when it exists.
* Every step requests CPU and memory (``pipelines/resources.py``). Caching is off for training, evaluation and the
  side-effect steps (arena, deploy). Artifacts go under the pipeline root on S3: the namespace's
  ``kfp-launcher`` ConfigMap sets it (the Helm chart writes ``s3://<bucket>/pipeline-root``), and
  ``deepmedix pipeline submit --pipeline-root`` overrides it per run. The pipeline itself sets none, so that the
  ConfigMap's bucket is the one used.
* A training stage with ``*_nodes`` > 1 runs as a Kubeflow Trainer TrainJob (``deepmedix.cluster.trainjob``) with
  the same GPU pool and S3 Secret and ``trainjob_cpu_per_node`` / ``trainjob_memory_per_node``; its own step then
  requests no GPU (``step-gpus`` works that out), so it does not hold a GPU node while the TrainJob waits for nodes.
* The training stages and deploy take their inputs as URIs (string outputs of the producers), not ``Input``
  artifacts: KFP's launcher downloads every input artifact first, which a step that hands URIs to a TrainJob or to
  KServe does not need (a 7B model is ~15 GB). A one-node training step checkpoints beside its output on S3.
"""


from kfp import dsl, kubernetes

from components import stages as c
from pipelines.resources import REQUESTS

PIPELINE_ROOT = "s3://deepmedix/pipeline-root"  # the Helm chart's kfp-launcher default; `pipeline submit` may override
STAGE_TASKS = ("curate", "base-model", "sft", "coldstart-synth", "coldstart-sft", "evaluate-coldstart", "grpo",
               "evaluate")
OPTIONAL_TASKS = ("arena", "deploy")
GPU_TASKS = ("sft", "coldstart-synth", "coldstart-sft", "evaluate-coldstart", "grpo", "evaluate")
TRAINING_TASKS = ("sft", "coldstart-sft", "grpo")
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_SETTINGS_KEYS = ("S3_ENDPOINT", "S3_USE_HTTPS", "AWS_REGION")
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def _gpu(task, gpus, node_selector, tolerations, shm: str = "32Gi"):
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=shm)
    return task


@dsl.pipeline(name="deepmedix-r1", description="DeepMedix-R1: curation, SFT, grounded cold start, GRPO, evaluation")
def deepmedix_pipeline(
    size: str = "tiny",
    base_model_uri: str = "",
    curate_overrides: list = [],
    sft_overrides: list = [],
    coldstart_overrides: list = [],
    grpo_overrides: list = [],
    eval_overrides: list = [],
    arena_overrides: list = [],
    sft_nodes: int = 1,
    sft_gpus_per_node: int = 1,
    coldstart_nodes: int = 1,
    coldstart_gpus_per_node: int = 1,
    grpo_nodes: int = 1,
    grpo_gpus_per_node: int = 1,
    synth_gpus: int = 1,
    eval_gpus: int = 1,
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    gpu_tolerations: list = GPU_TOLERATIONS,
    trainjob_cpu_per_node: str = "16",
    trainjob_memory_per_node: str = "128Gi",
    train_image: str = c.TRAIN_IMAGE,
    s3_secret: str = "deepmedix-s3",
    s3_env_configmap: str = "deepmedix-s3-env",
    run_arena: bool = False,
    deploy: bool = False,
    deploy_name: str = "deepmedix-r1-pipeline",
    deploy_namespace: str = "",
    deploy_mode: str = "Standard",
    serving_image: str = c.SERVING_IMAGE,
    serving_gpus: int = 0,
):
    """Data sources and their ratios go in ``curate_overrides`` (e.g. ``sources=[...]``, ``limit=...``) and the
    task mix in the training overrides (``task_ratios={...}``); reward weights in ``grpo_overrides``
    (``reward_weights={paper: 1, grounded: 0.5}``) — the same ``key=value`` overrides as the CLI's ``--set``."""
    pool = (gpu_node_selector, gpu_tolerations)
    place = dict(image=train_image, gpu_node_selector=gpu_node_selector, gpu_tolerations=gpu_tolerations,
                 s3_secret=s3_secret, cpu_per_node=trainjob_cpu_per_node, memory_per_node=trainjob_memory_per_node)
    plan = c.step_gpus(sft_nodes=sft_nodes, sft_gpus_per_node=sft_gpus_per_node, coldstart_nodes=coldstart_nodes,
                       coldstart_gpus_per_node=coldstart_gpus_per_node, grpo_nodes=grpo_nodes,
                       grpo_gpus_per_node=grpo_gpus_per_node, synth_gpus=synth_gpus,
                       eval_gpus=eval_gpus).set_display_name("step-gpus")
    cur = c.curate(size=size, overrides=curate_overrides).set_display_name("curate")
    base = c.base_model(data=cur.outputs["data"], size=size, model_uri=base_model_uri).set_display_name("base-model")
    # the training stages and deploy get URIs (each producer returns its artifact's), not Input artifacts that the
    # launcher would download (components/stages.py sft)
    data_uri = cur.outputs["Output"]
    s1 = _gpu(c.sft(data_uri=data_uri, base_uri=base.outputs["Output"], size=size, overrides=sft_overrides,
                    nodes=sft_nodes, gpus_per_node=sft_gpus_per_node, **place).set_display_name("sft"),
              plan.outputs["sft"], *pool)
    syn = _gpu(c.coldstart_synth(data=cur.outputs["data"], size=size, overrides=coldstart_overrides)
               .set_display_name("coldstart-synth"), plan.outputs["synth"], *pool)
    kubernetes.use_secret_as_env(syn, "deepmedix-judge", {"OPENAI_API_KEY": "OPENAI_API_KEY",
                                                          "OPENAI_BASE_URL": "OPENAI_BASE_URL"}, optional=True)
    s2 = _gpu(c.coldstart_sft(traces_uri=syn.outputs["Output"], base_uri=s1.outputs["Output"], size=size,
                              overrides=coldstart_overrides, nodes=coldstart_nodes,
                              gpus_per_node=coldstart_gpus_per_node, **place)
              .set_display_name("coldstart-sft"), plan.outputs["coldstart"], *pool)
    ev2 = _gpu(c.evaluate_coldstart(data=cur.outputs["data"], model=s2.outputs["model"], size=size,
                                    overrides=eval_overrides).set_display_name("evaluate-coldstart"),
               plan.outputs["eval"], *pool)
    s3 = _gpu(c.grpo(data_uri=data_uri, base_uri=s2.outputs["Output"], size=size, overrides=grpo_overrides,
                     nodes=grpo_nodes, gpus_per_node=grpo_gpus_per_node, **place).set_display_name("grpo"),
              plan.outputs["grpo"], *pool)
    ev = _gpu(c.evaluate(data=cur.outputs["data"], model=s3.outputs["model"], size=size,
                         overrides=eval_overrides).set_display_name("evaluate"), plan.outputs["eval"], *pool)
    for task in (s1, syn, s2, ev2, s3, ev):  # the compiler does not count a channel used only in a resource limit
        task.after(plan)
    tasks = [cur, base, s1, syn, s2, ev2, s3, ev]
    with dsl.If(run_arena == True):  # noqa: E712 - a pipeline condition, not Python truthiness
        ar = c.arena(coldstart=ev2.outputs["results"], final=ev.outputs["results"], size=size,
                     overrides=arena_overrides).set_display_name("arena")
        kubernetes.use_secret_as_env(ar, "deepmedix-judge", {"OPENAI_API_KEY": "OPENAI_API_KEY",
                                                             "OPENAI_BASE_URL": "OPENAI_BASE_URL"}, optional=True)
        tasks.append(ar)
    with dsl.If(deploy == True):  # noqa: E712
        dep = c.deploy(model_uri=s3.outputs["Output"], name=deploy_name, namespace=deploy_namespace, mode=deploy_mode,
                       serving_image=serving_image, gpus=serving_gpus, gpu_node_selector=gpu_node_selector,
                       gpu_tolerations=gpu_tolerations).set_display_name("deploy")
        dep.after(ev)
        tasks.append(dep)
    for task in tasks:  # (step-gpus reads nothing)
        kubernetes.use_secret_as_env(task, s3_secret, {k: k for k in S3_SECRET_KEYS})
        kubernetes.use_config_map_as_env(task, s3_env_configmap, {k: k for k in S3_SETTINGS_KEYS}, optional=True)
    named = {"step-gpus": plan, "curate": cur, "base-model": base, "sft": s1, "coldstart-synth": syn,
             "coldstart-sft": s2, "evaluate-coldstart": ev2, "grpo": s3, "evaluate": ev, "arena": ar, "deploy": dep}
    for name, task in named.items():  # every pod says what it needs (pipelines/resources.py, as the Argo template)
        cpu, memory = REQUESTS[name]
        task.set_cpu_request(cpu).set_memory_request(memory)
    # uncached: the training and evaluation steps, and the side effects — arena (a paid judge, a fresh verdict)
    # and deploy (KFP would skip a cached deploy and leave the cluster as it was)
    for task in (s1, syn, s2, ev2, s3, ev, ar, dep):
        task.set_caching_options(False)
