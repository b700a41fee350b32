"""Stage 1/2 training for real: LoRA, max_length without cutting images, checkpoints to the store with a
SIGKILL and resume, DeepSpeed ZeRO-2/3 in one CPU process, and the torchrun / accelerate launchers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, kill_at_first_checkpoint

from deepmedix import stages
from deepmedix.config import load_config
from deepmedix.data.records import load_split, plain_target
from deepmedix.eval.run import prompt_mode
from deepmedix.model.load import load
from deepmedix.model.processor import recorded_frame
from deepmedix.train.checkpoints import committed_checkpoints
from deepmedix.train.common import LoadImages, sft_row
from deepmedix.train.sft import sample_length

FAST = ["max_steps=3", "per_device_train_batch_size=4", "eval_records=4", "max_records=24", "logging_steps=1"]
BIN = Path(sys.executable).parent


def _cli(*args, env=None, launcher=()):
    cmd = [*launcher, *(["-m", "deepmedix.cli"] if launcher else [str(BIN / "deepmedix")]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env={**os.environ, **(env or {})})


def _weights(folder):
    return load(folder).model.state_dict()


def test_lora_trains_the_language_model_and_saves_a_stock_folder(small_data, base_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = tmp_path / "lora"
    m = stages.sft(str(small_data), str(base_model_dir), str(out), "tiny", FAST + ["lora=true", "lora_r=4"])
    assert m["lora"] and m["steps"] == 3
    base = _weights(base_model_dir)
    assert 0 < m["trainable_params"] < sum(v.numel() for v in base.values()) / 5
    assert not any(Path(out).glob("adapter_*"))  # merged: the folder is a plain Qwen2.5-VL model
    tuned = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out)).state_dict()
    assert set(tuned) == set(base)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(".language_model." in k for k in changed)
    assert any(k.endswith("q_proj.weight") for k in changed)


def test_sample_length_is_what_the_processor_makes(small_data, base_model_dir, tmp_path):
    import dataclasses

    from PIL import Image

    loaded = load(base_model_dir)
    root, recs = load_split(str(small_data), "train", ["report_findings", "vqa", "grounding"], max_records=6)
    # and a portrait film, which the native frame does not squash
    Image.new("L", (300, 700), 90).save(tmp_path / "tall.png")
    recs.append(dataclasses.replace(recs[0], record_id="tall", images=[str(tmp_path / "tall.png")],
                                    image_sizes=[[300, 700]], boxes=[]))
    for frame in (loaded.frame("native"), loaded.frame("square512")):
        for rec in recs:
            row = sft_row(root, rec, plain_target(rec, frame), reasoning=True)
            decoded = LoadImages(frame)({k: [v] for k, v in row.items()})["images"][0]  # as the trainer's dataset
            text = loaded.processor.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            real = loaded.processor(text=[text], images=decoded, return_tensors="pt")["input_ids"].shape[1]
            assert sample_length(loaded.processor, row, frame) == real, (frame.spec, rec.record_id)


def test_dataloader_workers_decode_the_images(small_data, base_model_dir, tmp_path):
    # the lazy dataset's transform goes to DataLoader worker processes (it pickles); training is the same
    one = stages.sft(str(small_data), str(base_model_dir), str(tmp_path / "w0"), "tiny", FAST)
    two = stages.sft(str(small_data), str(base_model_dir), str(tmp_path / "w2"), "tiny",
                     FAST + ["dataloader_workers=2"])
    assert two["steps"] == one["steps"] == 3 and two["n_train"] == one["n_train"]
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
    assert two["after"] == pytest.approx(one["after"], rel=1e-5)


def test_max_length_skips_and_counts_long_samples_never_cuts_them(small_data, base_model_dir, tmp_path):
    cfg = load_config("sft", "tiny", FAST)
    loaded = load(base_model_dir)
    root, recs = load_split(str(small_data), "train", cfg.tasks, cfg.task_ratios, cfg.max_records, cfg.seed)
    _, val = load_split(str(small_data), "validate", cfg.tasks, None, cfg.eval_records, cfg.seed)
    frame = loaded.frame(cfg.frame)
    lengths = sorted(sample_length(loaded.processor, sft_row(root, r, plain_target(r, frame), False), frame)
                     for r in recs)
    vlengths = [sample_length(loaded.processor, sft_row(root, r, plain_target(r, frame), False), frame) for r in val]
    limit = lengths[len(lengths) // 2]
    m = stages.sft(str(small_data), str(base_model_dir), str(tmp_path / "ml"), "tiny", FAST + [f"max_length={limit}"])
    assert m["skipped_too_long"] == sum(n > limit for n in lengths + vlengths) > 0
    assert m["n_train"] == sum(n <= limit for n in lengths) and m["steps"] == 3
    with pytest.raises(ValueError, match="no samples to train on"):
        stages.sft(str(small_data), str(base_model_dir), str(tmp_path / "none"), "tiny", FAST + ["max_length=5"])
    assert not (tmp_path / "none").exists()


def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(small_data, base_model_dir, tmp_path):
    """Only the run that is killed is a process of its own (the CLI, SIGKILLed at its first committed checkpoint);
    the uninterrupted run and the resume run in this process, through the same stage function the CLI calls."""
    sets = ["max_steps=12", "per_device_train_batch_size=2", "eval_records=2", "save_steps=3", "save_total_limit=2",
            "logging_steps=3"]
    whole = tmp_path / "whole"
    stages.sft(str(small_data), str(base_model_dir), str(whole), "tiny", sets)
    ckpts = tmp_path / "whole-checkpoints"
    assert [n for _, n in committed_checkpoints(str(ckpts))] == ["checkpoint-9", "checkpoint-12"]  # the last two
    # evaluated with auto settings, a checkpoint is prompted and framed as the run trains (plain answers, its frame)
    assert prompt_mode("auto", str(ckpts / "checkpoint-12")) == "plain"
    assert recorded_frame(ckpts / "checkpoint-12") == recorded_frame(whole) == load_config("sft", "tiny").frame

    out, ck = tmp_path / "killed", str(tmp_path / "killed-checkpoints")
    cli = [str(BIN / "deepmedix"), "train", "sft", "--data", str(small_data), "--model", str(base_model_dir),
           "--out", str(out), *[x for s in sets for x in ("--set", s)]]
    done = kill_at_first_checkpoint(cli, ck)
    assert done and done[-1][0] < 12 and not out.exists()  # killed mid-run: a checkpoint, no final model

    m = stages.sft(str(small_data), str(base_model_dir), str(out), "tiny", sets, resume=True)
    assert m["resumed_from"].endswith(done[-1][1]) and m["steps"] == 12
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == m["resumed_from"]
    a, b, start = _weights(whole), _weights(out), _weights(base_model_dir)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained: the equality below is not vacuous
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "loss_curve.png").stat().st_size > 0
    steps = [h["step"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert steps == [3, 6, 9, 12]  # the curve covers the run before the kill too


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_zero_in_one_cpu_process(small_data, base_model_dir, tmp_path, zero):
    out = tmp_path / zero
    r = _cli("train", "sft", "--data", str(small_data), "--model", str(base_model_dir), "--out", str(out),
             "--set", "max_steps=3", "--set", "per_device_train_batch_size=2", "--set", "eval_records=2",
             "--set", f"deepspeed=configs/deepspeed/{zero}.json")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["deepspeed"].endswith(f"{zero}.json") and m["trainable_params"] > 0
    base, tuned = _weights(base_model_dir), _weights(out)
    assert set(base) == set(tuned) and any(not torch.equal(base[k], tuned[k]) for k in base)
    # the folder in the stock layout, key for key what a plain save writes (vLLM and any transformers read it)
    from deepmedix.train.checkpoints import weight_keys

    assert sorted(weight_keys(out)) == sorted(weight_keys(base_model_dir))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_sft_entry_point_runs_under_a_launcher(small_data, base_model_dir, tmp_path, launcher):
    from serving.local import free_port

    port = str(free_port())
    cmd = {"torchrun": [str(BIN / "torchrun"), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
                        "--master_port", port],
           "accelerate": [str(BIN / "accelerate"), "launch", "--num_processes", "1", "--cpu",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", port]}[launcher]
    out = tmp_path / launcher
    r = _cli("train", "sft", "--data", str(small_data), "--model", str(base_model_dir), "--out", str(out),
             "--set", "max_steps=2", "--set", "per_device_train_batch_size=2", "--set", "eval_records=2",
             launcher=cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert not list(tmp_path.glob(".*.work"))  # the scratch folder is gone


def test_bad_training_config_is_refused_before_work(small_data, base_model_dir, tmp_path):
    r = cli("train", "sft", "--data", small_data, "--model", base_model_dir, "--out", tmp_path / "x",
            "--set", "deepspeed=configs/deepspeed/nope.json")
    assert r.returncode == 2 and "nope.json" in r.stderr and not (tmp_path / "x").exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "configs").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    if path.parent.name == "rewards":
        from deepmedix.rewards.spec import RewardSpec

        assert RewardSpec.parse(str(path)).weights
        return
    cfg = load_config(path.parent.name, str(path))
    if getattr(cfg, "deepspeed", ""):
        from deepmedix.train.checkpoints import deepspeed_config

        assert Path(deepspeed_config(cfg.deepspeed)).is_file()


def test_checkpoints_go_to_s3_and_resume_from_there(small_data, base_model_dir, tmp_path):
    from conftest import weed_s3

    with weed_s3(tmp_path / "weed"):
        common = ["per_device_train_batch_size=2", "eval_records=2", "save_steps=2", "save_total_limit=2",
                  "checkpoint_uri=s3://ckpts/sft-run"]
        first = stages.sft(str(small_data), str(base_model_dir), "s3://models/sft", "tiny",
                           common + ["max_steps=4"])
        assert first["steps"] == 4
        assert [n for _, n in committed_checkpoints("s3://ckpts/sft-run")] == ["checkpoint-2", "checkpoint-4"]
        more = stages.sft(str(small_data), str(base_model_dir), "s3://models/sft", "tiny", common + ["max_steps=6"],
                          resume=True)
        assert more["steps"] == 6 and more["resumed_from"].endswith("checkpoint-4")
        assert [n for _, n in committed_checkpoints("s3://ckpts/sft-run")] == ["checkpoint-4", "checkpoint-6"]
        assert load("s3://models/sft").model is not None


def test_a_fresh_run_replaces_old_checkpoints_and_resume_refuses_another_runs(small_data, base_model_dir, tmp_path):
    out, ck = str(tmp_path / "m"), str(tmp_path / "m-checkpoints")
    common = ["per_device_train_batch_size=2", "eval_records=2", "save_steps=2", "save_total_limit=2"]
    stages.sft(str(small_data), str(base_model_dir), out, "tiny", common + ["max_steps=6"])
    assert [n for _, n in committed_checkpoints(ck)] == ["checkpoint-4", "checkpoint-6"]
    stages.sft(str(small_data), str(base_model_dir), out, "tiny", common + ["max_steps=2"])  # not --resume
    assert [n for _, n in committed_checkpoints(ck)] == ["checkpoint-2"]
    with pytest.raises(ValueError, match="written by another run"):
        stages.sft(str(small_data), str(base_model_dir), out, "tiny", common + ["max_steps=4", "learning_rate=0.01"],
                   resume=True)
    m = stages.sft(str(small_data), str(base_model_dir), out, "tiny", common + ["max_steps=4"], resume=True)
    assert m["resumed_from"].endswith("checkpoint-2") and m["steps"] == 4
