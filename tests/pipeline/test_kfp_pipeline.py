"""The pipeline compiles to IR naming every stage, the checked-in IR is current, and kfp.local runs it whole."""

from __future__ import annotations

import json

import yaml

from pipelines.compile import DEFAULT_OUT, compile_pipeline
from pipelines.deepmedix_pipeline import STAGE_TASKS


def test_compiles_and_names_every_stage(tmp_path):
    ir = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml").read_text())
    tasks = ir["root"]["dag"]["tasks"]
    assert set(STAGE_TASKS) <= {t["taskInfo"]["name"] for t in tasks.values()}
    execs = ir["deploymentSpec"]["executors"]
    assert len(execs) == len(STAGE_TASKS)
    for ex in execs.values():
        assert ex["container"]["image"].startswith("docker.io/deepmedix/deepmedix")
        assert "pip install" not in " ".join(ex["container"]["command"])  # install_kfp_package=False
        assert "from deepmedix import stages" in " ".join(ex["container"]["command"])
    assert tasks["grpo"]["cachingOptions"] == {} and tasks["sft"]["cachingOptions"] == {}
    assert set(ir["root"]["inputDefinitions"]["parameters"]) >= {"size", "base_model_uri", "sft_overrides"}


def test_checked_in_ir_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert DEFAULT_OUT.read_text() == fresh, "run `make compile` and commit pipelines/deepmedix_pipeline.yaml"


def test_kfp_local_runs_the_whole_pipeline(tmp_path):
    from deepmedix.demo import run_pipeline_local, stage_metrics

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
    assert rows["curate"]["after"] > 0
    assert rows["sft"]["metric"] == "val_loss" and rows["sft"]["after"] < rows["sft"]["before"]
    assert rows["grpo"]["metric"] == "val_reward_paper"
    preds = (run / "evaluate" / "results" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 6 and json.loads(preds[0])["record_id"]
    assert (run / "grpo" / "model" / "config.json").exists()
