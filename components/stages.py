"""One KFP v2 lightweight component per stage. Each body imports ``deepmedix`` and calls one function of
``deepmedix.stages``: the same code runs in a test, under ``kfp.local`` and in a pod of the image below."""


import os

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

# The image every component runs in on a cluster (built from the repository; see the cluster issue).
IMAGE = os.environ.get("DEEPMEDIX_IMAGE", "docker.io/deepmedix/deepmedix:0.1.0")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def curate(size: str, overrides: list, data: Output[Dataset], metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.curate(data.path, size, overrides))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def base_model(data: Input[Dataset], size: str, model_uri: str, model: Output[Model], metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.base_model(data.path, model.path, size, None, model_uri))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sft(data: Input[Dataset], base: Input[Model], size: str, overrides: list, model: Output[Model],
        metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.sft(data.path, base.path, model.path, size, overrides))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def coldstart_synth(data: Input[Dataset], size: str, overrides: list, traces: Output[Dataset],
                    metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.coldstart_synth(data.path, traces.path, size, overrides))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def coldstart_sft(traces: Input[Dataset], base: Input[Model], size: str, overrides: list, model: Output[Model],
                  metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.coldstart_sft(traces.path, base.path, model.path, size, overrides))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def grpo(data: Input[Dataset], base: Input[Model], size: str, overrides: list, model: Output[Model],
         metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.grpo(data.path, base.path, model.path, size, overrides))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(data: Input[Dataset], model: Input[Model], size: str, overrides: list, results: Output[Dataset],
             metrics: Output[Metrics]):
    from deepmedix import stages

    stages.log_kfp(metrics, stages.evaluate(data.path, model.path, results.path, size, overrides))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_coldstart(data: Input[Dataset], model: Input[Model], size: str, overrides: list,
                       results: Output[Dataset], metrics: Output[Metrics]):
    """The same evaluation, of the cold-start model: its format compliance is stage 2's acceptance figure."""
    from deepmedix import stages

    stages.log_kfp(metrics, stages.evaluate(data.path, model.path, results.path, size, overrides))
