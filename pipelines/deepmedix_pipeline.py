"""The DeepMedix-R1 DAG: curate -> base model -> stage 1 SFT -> cold start (synthesis, SFT; evaluated) -> GRPO ->
evaluate.

Only the wiring lives here; every step is a component of ``components.stages``.
"""


from kfp import dsl

from components import stages as c

STAGE_TASKS = ("curate", "base-model", "sft", "coldstart-synth", "coldstart-sft", "evaluate-coldstart", "grpo",
               "evaluate")


@dsl.pipeline(name="deepmedix-r1", description="DeepMedix-R1: curation, SFT, grounded cold start, GRPO, evaluation")
def deepmedix_pipeline(
    size: str = "tiny",
    base_model_uri: str = "",
    curate_overrides: list = [],
    sft_overrides: list = [],
    coldstart_overrides: list = [],
    grpo_overrides: list = [],
    eval_overrides: list = [],
):
    cur = c.curate(size=size, overrides=curate_overrides).set_display_name("curate")
    base = c.base_model(data=cur.outputs["data"], size=size, model_uri=base_model_uri).set_display_name("base-model")
    s1 = c.sft(data=cur.outputs["data"], base=base.outputs["model"], size=size,
               overrides=sft_overrides).set_display_name("sft")
    syn = c.coldstart_synth(data=cur.outputs["data"], size=size,
                            overrides=coldstart_overrides).set_display_name("coldstart-synth")
    s2 = c.coldstart_sft(traces=syn.outputs["traces"], base=s1.outputs["model"], size=size,
                         overrides=coldstart_overrides).set_display_name("coldstart-sft")
    ev2 = c.evaluate_coldstart(data=cur.outputs["data"], model=s2.outputs["model"], size=size,
                               overrides=eval_overrides).set_display_name("evaluate-coldstart")
    s3 = c.grpo(data=cur.outputs["data"], base=s2.outputs["model"], size=size,
                overrides=grpo_overrides).set_display_name("grpo")
    ev = c.evaluate(data=cur.outputs["data"], model=s3.outputs["model"], size=size,
                    overrides=eval_overrides).set_display_name("evaluate")
    for task in (s1, s2, s3):
        task.set_caching_options(False)
    ev.set_caching_options(False)
    ev2.set_caching_options(False)
