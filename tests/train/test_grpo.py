"""Stage 3 for real: GRPO learns on phantom data from the cold-start tiny model, checkpoints survive a SIGKILL,
and what a run leaves (curves, rollouts, metrics) is there and right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import kill_at_first_checkpoint
from deepmedix import stages
from deepmedix.config import load_config
from deepmedix.model.load import load
from deepmedix.train import grpo
from deepmedix.train.checkpoints import committed_checkpoints
from deepmedix.train.common import load_split

BIN = Path(sys.executable).parent
# The learning run: grounding prompts, the paper's reward plus grounding against the reference boxes.
LEARN = ["tasks=[grounding]", "reward=grounded_paper", "max_steps=80", "learning_rate=0.0002", "logging_steps=1",
         "per_device_train_batch_size=16", "eval_records=8"]


def _cli(*args):
    return subprocess.run([str(BIN / "deepmedix"), *args], capture_output=True, text=True, timeout=600)


def test_grpo_learns_on_phantom_data_from_the_cold_start_model(coldstart_chain, tmp_path):
    data, model = coldstart_chain
    out = tmp_path / "grpo"
    m = stages.grpo(str(data), str(model), str(out), "tiny", LEARN)
    reward = (m["train_reward_first"], m["train_reward_last"])
    iou = (m["train_iou_first"], m["train_iou_last"])
    print(f"\nGRPO learning test (tiny cold-start model, {m['steps']} steps, {m['n_train']} grounding prompts): "
          f"mean total reward {reward[0]:.3f} -> {reward[1]:.3f}, mean grounding IoU {iou[0]:.3f} -> {iou[1]:.3f} "
          f"(first vs last quarter of the steps); held-out greedy reward {m['before']:.3f} -> {m['after']:.3f}")
    assert reward[1] > reward[0] and iou[1] > iou[0]

    hist = json.loads((out / "log_history.json").read_text())
    logged = {k for h in hist for k in h}
    assert {"reward", "rewards/paper/mean", "rewards/grounded/mean", "rewards/grounded/iou", "rewards/grounded/count",
            "rewards/paper/accuracy", "rewards/paper/format", "rewards/paper/coordinate", "kl",
            "completions/mean_length"} <= logged
    png = (out / "reward_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    rows = [json.loads(x) for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 80 and {r["step"] for r in rows} == set(range(1, 81))
    for r in rows[:8]:
        assert set(r["rewards"]) == {"paper", "grounded"} and r["task"] == "grounding" and r["completion"]
        expect = r["rewards"]["paper"]["overall"] + r["rewards"]["grounded"]["overall"]
        assert r["total"] == pytest.approx(expect)
    assert load(out).model is not None  # a stock model folder


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(coldstart_chain, tmp_path):
    data, model = coldstart_chain
    args = ["train", "grpo", "--data", str(data), "--model", str(model), "--set", "max_steps=12",
            "--set", "save_steps=3", "--set", "save_total_limit=2", "--set", "eval_records=2",
            "--set", "logging_steps=3", "--set", "max_completion_length=48", "--set", "per_device_train_batch_size=8"]
    whole = tmp_path / "whole"
    r = _cli(*args, "--out", str(whole))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [n for _, n in committed_checkpoints(str(tmp_path / "whole-checkpoints"))] == ["checkpoint-9",
                                                                                        "checkpoint-12"]
    out, ck = tmp_path / "killed", str(tmp_path / "killed-checkpoints")
    done = kill_at_first_checkpoint([str(BIN / "deepmedix"), *args, "--out", str(out)], ck)
    assert done and done[-1][0] < 12 and not out.exists()

    r = _cli(*args, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from"].endswith(done[-1][1]) and m["steps"] == 12
    a, b = load(whole).model.state_dict(), load(out).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["step"] for h in json.loads((out / "log_history.json").read_text()) if "reward" in h] == [3, 6, 9, 12]
    steps = [json.loads(x)["step"] for x in (out / "rollouts.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and set(steps) == set(range(1, 13))  # the kill lost none and repeated none
    assert (whole / "rollouts.jsonl").read_text() == (out / "rollouts.jsonl").read_text()


def test_prompt_length_is_what_the_processor_makes(small_data, base_model_dir):
    cfg = load_config("grpo", "tiny")
    root, recs = load_split(str(small_data), "train", cfg.tasks, None, 3, 0)
    loaded = load(base_model_dir)
    rows, skipped = grpo.make_rows(root, recs, cfg, loaded.processor)
    assert not skipped
    for row in rows:
        text = loaded.processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        real = loaded.processor(text=[text], images=row["images"], return_tensors="pt")["input_ids"].shape[1]
        assert grpo.prompt_length(loaded.processor, row) == real


def test_long_prompts_are_skipped_and_counted_never_cut(small_data, base_model_dir, tmp_path):
    cfg = load_config("grpo", "tiny")
    root, recs = load_split(str(small_data), "train", cfg.tasks, None, 0, 0)
    loaded = load(base_model_dir)
    lengths = sorted(grpo.prompt_length(loaded.processor, r) for r in grpo.make_rows(root, recs, cfg,
                                                                                         loaded.processor)[0])
    limit = lengths[len(lengths) // 2]
    cfg.max_prompt_length = limit
    rows, skipped = grpo.make_rows(root, recs, cfg, loaded.processor)
    assert rows and skipped and len(rows) + len(skipped) == len(recs)
    assert all(grpo.prompt_length(loaded.processor, r) <= limit for r in rows)
    r = _cli("train", "grpo", "--data", str(small_data), "--model", str(base_model_dir), "--out", str(tmp_path / "g"),
             "--set", "max_prompt_length=5")
    assert r.returncode == 2 and "max_prompt_length=5" in r.stderr and not (tmp_path / "g").exists()


@pytest.mark.parametrize("over,msg", [
    (["use_vllm=sometimes"], "use_vllm must be auto, true or false"),
    (["use_vllm=true"], "vLLM is not installed or there is no CUDA GPU"),
    (["reward=nope"], "unknown reward 'nope'"),
    (["reward_weights={paper: 1, bogus: 1}"], "unknown component 'bogus'"),
    (["lora=true"], "lora is not supported for GRPO"),
    (["max_length=10"], "max_prompt_length"),
])
def test_bad_grpo_settings_are_refused_before_work(small_data, base_model_dir, tmp_path, over, msg):
    if over == ["use_vllm=true"] and torch.cuda.is_available():
        pytest.skip("a GPU is here: vLLM may be installed")
    r = _cli("train", "grpo", "--data", str(small_data), "--model", str(base_model_dir), "--out", str(tmp_path / "g"),
             *[x for o in over for x in ("--set", o)])
    assert r.returncode == 2 and msg in " ".join(r.stderr.split()) and not (tmp_path / "g").exists()


def test_rollout_log_restores_up_to_the_checkpoint_step(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / grpo.ROLLOUTS).write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 1, 2, 3)))
    log = grpo.RolloutLog(tmp_path / "work" / grpo.ROLLOUTS, 2)
    log.restore(ckpt, 2)
    assert [json.loads(x)["step"] for x in log.path.read_text().splitlines()] == [1, 1, 2]
    log.restore(None, 0)
    assert log.path.read_text() == ""


def test_7b_config_carries_the_papers_settings():
    cfg = load_config("grpo", "7b")
    assert (cfg.num_generations, cfg.temperature, cfg.top_p, cfg.beta, cfg.learning_rate, cfg.weight_decay) == \
        (5, 1.0, 0.99, 0.01, 1e-6, 0.01)
    assert (cfg.max_prompt_length, cfg.max_completion_length, cfg.min_pixels, cfg.max_pixels) == \
        (2048, 2048, 512 * 512, 512 * 512)
    args = grpo.trl_args(cfg, Path("/tmp/x"), [1.0], vllm=False)
    assert args.beta == 0.01 and args.num_generations == 5 and args.top_p == 0.99 and args.scale_rewards == "group"
    assert (args.epsilon, args.epsilon_high, args.loss_type, args.learning_rate, args.weight_decay) == \
        (0.2, 0.3, "dapo", 1e-6, 0.01)
    assert os.path.basename(args.deepspeed) == "zero3.json"


def test_grpo_under_deepspeed_zero3_in_one_cpu_process_and_resume(small_data, base_model_dir, tmp_path):
    import math

    def run(out, *extra):
        r = _cli("train", "grpo", "--data", str(small_data), "--model", str(base_model_dir), "--out", str(out),
                 "--set", "deepspeed=configs/deepspeed/zero3.json", "--set", "eval_records=2", "--set", "save_steps=1",
                 "--set", "max_completion_length=16", "--set", "per_device_train_batch_size=4",
                 "--set", "num_generations=2", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    whole = run(tmp_path / "whole", "--set", "max_steps=3")
    assert math.isfinite(whole["before"]) and math.isfinite(whole["after"])  # both generated on (no NaN)
    part = run(tmp_path / "part", "--set", "max_steps=2")
    assert part["steps"] == 2
    resumed = run(tmp_path / "part", "--set", "max_steps=3", "--resume")
    assert resumed["steps"] == 3 and resumed["resumed_from"].endswith("checkpoint-2")
    a, b = load(tmp_path / "whole").model.state_dict(), load(tmp_path / "part").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the engine restored weights and optimizer: same as unbroken
