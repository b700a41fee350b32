"""One KFP v2 lightweight component per stage. Each body imports ``deepmedix`` and calls one function: the same
code runs in a test, under ``kfp.local`` and in a pod of the stage's image.

Images, one per dependency profile (``images/*.Dockerfile``; ``make images``): the CPU data image (curation, the arena,
deploy), the CUDA training image (the training stages, cold-start synthesis, evaluation). ``DEEPMEDIX_REGISTRY``
and ``DEEPMEDIX_VERSION`` pick them at compile time.
"""


import os
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Metrics, Model, Output

REGISTRY = os.environ.get("DEEPMEDIX_REGISTRY", "ghcr.io/deepmedix")
VERSION = os.environ.get("DEEPMEDIX_VERSION", "0.1.0")
DATA_IMAGE = f"{REGISTRY}/deepmedix-data:{VERSION}"
TRAIN_IMAGE = f"{REGISTRY}/deepmedix-train:{VERSION}"
SERVING_IMAGE = f"{REGISTRY}/deepmedix-serving:{VERSION}"


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def step_gpus(sft_nodes: int, sft_gpus_per_node: int, coldstart_nodes: int, coldstart_gpus_per_node: int,
              grpo_nodes: int, grpo_gpus_per_node: int, synth_gpus: int, eval_gpus: int
              ) -> NamedTuple("StepGpus", sft=str, coldstart=str, grpo=str, synth=str, eval=str):
    """GPUs each GPU step's own pod requests: a training step its GPUs per node when it trains in the pod, none when
    it only launches a multi-node TrainJob (holding a GPU node while waiting could starve the TrainJob); synthesis
    and evaluation their parameters.

    As *strings*: the KFP 2.x driver resolves a pod-spec runtime parameter such as the accelerator count with
    ``val.GetStringValue()`` (backend/src/v2/driver ``resolvePodSpecInputRuntimeParameter``) and sets the limit only
    when that is not empty, so an int parameter yields no ``nvidia.com/gpu`` limit at all."""
    from collections import namedtuple

    own = lambda nodes, gpus: 0 if nodes > 1 else gpus  # noqa: E731
    return namedtuple("StepGpus", "sft coldstart grpo synth eval")(
        str(own(sft_nodes, sft_gpus_per_node)), str(own(coldstart_nodes, coldstart_gpus_per_node)),
        str(own(grpo_nodes, grpo_gpus_per_node)), str(synth_gpus), str(eval_gpus))


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def curate(size: str, overrides: list, data: Output[Dataset], metrics: Output[Metrics], card: Output[HTML]) -> str:
    """Returns the dataset's URI (see ``sft``). ``card``: the dataset card as one HTML page (KFP's UI shows HTML
    artifacts in the run's Visualizations)."""
    from deepmedix import stages

    stages.log_kfp(metrics, stages.curate(data.path, size, overrides))
    try:  # the card is a view of the committed dataset: its failure must not fail the step
        stages.card_html(data.path, card.path)
    except Exception as exc:  # noqa: BLE001
        import html

        with open(card.path, "w") as f:
            f.write(f"<!doctype html><p>The dataset card could not be drawn: {html.escape(repr(exc))}</p>\n")
        print(f"warning: the dataset card could not be drawn: {exc!r}", flush=True)
    return data.uri


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def base_model(data: Input[Dataset], size: str, model_uri: str, model: Output[Model], metrics: Output[Metrics]
               ) -> str:
    from deepmedix import stages

    stages.log_kfp(metrics, stages.base_model(data.path, model.path, size, None, model_uri))
    return model.uri


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def sft(data_uri: str, base_uri: str, size: str, overrides: list, nodes: int, gpus_per_node: int, image: str,
        gpu_node_selector: dict, gpu_tolerations: list, s3_secret: str, cpu_per_node: str, memory_per_node: str,
        model: Output[Model], metrics: Output[Metrics]) -> str:
    """A training stage takes its inputs as URIs, not ``Input`` artifacts: KFP's launcher downloads every input
    artifact before the code runs (backend/src/v2/component/launcher_v2.go downloadArtifacts; no opt-out in 2.17),
    and a multi-node stage only hands the URIs to its TrainJob. One node: ``run_training`` fetches them.
    Returns the model's URI."""
    from deepmedix import stages
    from deepmedix.cluster.trainjob import GpuPool, run_training

    pool = GpuPool(node_selector=gpu_node_selector, tolerations=gpu_tolerations, cpu_per_node=cpu_per_node,
                   memory_per_node=memory_per_node)
    stages.log_kfp(metrics, run_training("sft", (None, data_uri), (None, base_uri), (model.path, model.uri), size,
                                         overrides, nodes, gpus_per_node, image, pool=pool, s3_secret=s3_secret))
    return model.uri


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def coldstart_synth(data: Input[Dataset], size: str, overrides: list, traces: Output[Dataset],
                    metrics: Output[Metrics]) -> str:
    from deepmedix import stages

    stages.log_kfp(metrics, stages.coldstart_synth(data.path, traces.path, size, overrides))
    return traces.uri


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def coldstart_sft(traces_uri: str, base_uri: str, size: str, overrides: list, nodes: int, gpus_per_node: int,
                  image: str, gpu_node_selector: dict, gpu_tolerations: list, s3_secret: str, cpu_per_node: str,
                  memory_per_node: str, model: Output[Model], metrics: Output[Metrics]) -> str:
    from deepmedix import stages
    from deepmedix.cluster.trainjob import GpuPool, run_training

    pool = GpuPool(node_selector=gpu_node_selector, tolerations=gpu_tolerations, cpu_per_node=cpu_per_node,
                   memory_per_node=memory_per_node)
    stages.log_kfp(metrics, run_training("coldstart", (None, traces_uri), (None, base_uri), (model.path, model.uri),
                                         size, overrides, nodes, gpus_per_node, image, pool=pool,
                                         s3_secret=s3_secret))
    return model.uri


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def grpo(data_uri: str, base_uri: str, size: str, overrides: list, nodes: int, gpus_per_node: int, image: str,
         gpu_node_selector: dict, gpu_tolerations: list, s3_secret: str, cpu_per_node: str, memory_per_node: str,
         model: Output[Model], metrics: Output[Metrics]) -> str:
    from deepmedix import stages
    from deepmedix.cluster.trainjob import GpuPool, run_training

    pool = GpuPool(node_selector=gpu_node_selector, tolerations=gpu_tolerations, cpu_per_node=cpu_per_node,
                   memory_per_node=memory_per_node)
    stages.log_kfp(metrics, run_training("grpo", (None, data_uri), (None, base_uri), (model.path, model.uri), size,
                                         overrides, nodes, gpus_per_node, image, pool=pool, s3_secret=s3_secret))
    return model.uri


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate(data: Input[Dataset], model: Input[Model], size: str, overrides: list, results: Output[Dataset],
             metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.evaluate(data.path, model.path, results.path, size, overrides))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def evaluate_coldstart(data: Input[Dataset], model: Input[Model], size: str, overrides: list,
                       results: Output[Dataset], metrics: Output[Metrics]):
    """The same evaluation, of the cold-start model: its format compliance is stage 2's acceptance figure."""
    from deepmedix import stages

    stages.log_kfp(metrics, stages.evaluate(data.path, model.path, results.path, size, overrides))


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def arena(coldstart: Input[Dataset], final: Input[Dataset], size: str, overrides: list,
          leaderboard: Output[Dataset], metrics: Output[Metrics]):
    """The Report Arena between the cold-start and the final model (judges from the arena config; their API key
    comes from the environment, i.e. a Secret)."""
    from deepmedix import stages
    from deepmedix.config import load_config
    from deepmedix.eval.arena import run_arena

    stages.log_kfp(metrics, run_arena(load_config("arena", size, overrides),
                                      {"coldstart": coldstart.path, "grpo": final.path}, leaderboard.path))


@dsl.component(base_image=DATA_IMAGE, install_kfp_package=False)
def deploy(model_uri: str, name: str, namespace: str, mode: str, serving_image: str, gpus: int,
           gpu_node_selector: dict, gpu_tolerations: list, metrics: Output[Metrics]):
    """Create or replace the InferenceService serving the model at ``model_uri``; wait until the new model is
    Ready. The URI, not an ``Input[Model]``: the launcher would download the whole model (~15 GB at 7B) into this
    small CPU pod only for its ``.uri``; KServe's storage-initializer fetches it in the predictor pod."""
    from deepmedix.cluster.deploy import Serving, deploy_model

    pool = {"node_selector": gpu_node_selector, "tolerations": gpu_tolerations} if gpus else {}
    out = deploy_model(model_uri, name, namespace, Serving(image=serving_image, gpus=gpus, deployment_mode=mode,
                                                           **pool))
    metrics.metadata.update({k: str(v) for k, v in out.items()})
