"""`deepmedix rehearse`: every 7b config loads and each training stage's memory per GPU is planned from the real
Qwen2.5-VL-7B parameter counts (the model built on the meta device); a setting that cannot fit 80 GB fails it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from deepmedix.cli import app
from deepmedix.config import load_size
from deepmedix.model.shapes import QWEN25_VL_7B, meta_model
from deepmedix.train.plan import GB, GPU_GB, Shape, plan_stage


@pytest.fixture(scope="module")
def shape():
    return Shape.of(meta_model(QWEN25_VL_7B))


def test_the_7b_model_is_the_released_one(shape):
    # Qwen2.5-VL-7B-Instruct: 8.29B parameters, a 0.63B vision tower and its merger, 28 layers, 152K vocabulary
    assert shape.params == 8_292_166_656 and shape.vision_tower == 631_975_680 and shape.merger == 44_574_464
    assert (shape.hidden, shape.intermediate, shape.layers, shape.kv_dim, shape.vocab) == (3584, 18944, 28, 512,
                                                                                          152064)


def test_rehearse_7b_every_config_loads_every_stage_fits_and_the_data_path_streams():
    # the data path at a small scale here (the command's default is 10K against 100K records)
    r = CliRunner().invoke(app, ["rehearse", "--size", "7b", "--json", "--small", "500", "--records", "5000"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["configs_ok"] and out["ok"] and out["model_params"] == 8_292_166_656
    plan = out["memory_plan"]
    assert set(plan) == {"sft", "coldstart", "grpo"}
    for stage, m in plan.items():
        assert m["fits"] and m["total"] <= GPU_GB and m["zero"] == 3 and m["gpus"] == 8, (stage, m)
        assert m["total"] == pytest.approx(sum(v for k, v in m.items() if k in (
            "weights", "gradients", "optimizer", "activations", "reference", "rollouts", "runtime")), abs=0.05)
    # ten times the records, and the peak memory of the data path (records chosen by id, read a shard at a time,
    # samples written to disk, images decoded per batch) barely moves
    assert (out["records_small"], out["records_large"]) == (500, 5000)
    assert out["rss_ratio"] <= 1.15 and out["rss_mb_large"] - out["rss_mb_small"] < 50, out


def test_the_terms_follow_zero_and_what_is_frozen(shape):
    cfgs = load_size("7b")
    sft = plan_stage(cfgs["sft"], shape, 8)
    trainable = shape.params - shape.vision_tower  # freeze_vision: the tower, not the merger
    assert sft["trainable_b"] == round(trainable / 1e9, 3)
    assert sft["optimizer"] == round(12 * trainable / 8 / GB, 2)          # ZeRO-1+: fp32 master + 2 moments, split
    assert sft["gradients"] == round(2 * trainable / 8 / GB, 2)           # ZeRO-2+
    assert sft["weights"] == round((2 * shape.params / 8 + 2e9) / GB, 2)  # ZeRO-3, plus 1B live parameters
    one = plan_stage(cfgs["sft"], shape, 1)
    assert one["optimizer"] == pytest.approx(8 * sft["optimizer"], rel=1e-3) and not one["fits"]  # one GPU: no
    no_ckpt = plan_stage(dataclasses.replace(cfgs["sft"], gradient_checkpointing=False), shape, 8)
    assert no_ckpt["activations"] > 3 * sft["activations"] and not no_ckpt["fits"]


def test_grpo_at_easyr1s_rollout_share_without_offloading_does_not_fit(shape):
    # EasyR1 gives vLLM 0.6 of the GPU because it offloads parameters and optimizer to the CPU; with them on the
    # GPU, 0.6 and 10 completions per micro-batch is far over 80 GB: the plan says so, and rehearse exits 1
    cfg = dataclasses.replace(load_size("7b")["grpo"], vllm_gpu_memory_utilization=0.6,
                              per_device_train_batch_size=10)
    m = plan_stage(cfg, shape, 8)
    assert not m["fits"] and m["rollouts"] == 48.0 and m["total"] > 100
