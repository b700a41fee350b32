"""Stage 3: online RL with TRL's ``GRPOTrainer`` on images, rewarded by rule-based rewards (``rewards.py``).

The target metric is the mean reward of greedy answers on held-out (validate) records, before and after.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

import torch

from deepmedix import store
from deepmedix.config import GRPOConfig
from deepmedix.grounding import user_message
from deepmedix.train.common import frame_boxes, freeze_vision, generate_on, load_split, record_images, save_model, write_curve, write_json


def held_out_reward(loaded, root, records, reward_fn, max_new_tokens: int, frame: int) -> float:
    if not records:
        return float("nan")
    loaded.model.eval()
    outs = generate_on(loaded, root, records, max_new_tokens, frame=frame)
    scores = reward_fn(outs, answer=[r.answer for r in records],
                       ref_boxes_frame=[frame_boxes(r, frame) for r in records])
    return float(sum(scores) / len(scores))


def train_grpo(cfg: GRPOConfig, data_uri: str, model_uri: str, out_uri: str) -> dict[str, Any]:
    from datasets import Dataset
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    from deepmedix.model.load import load
    from deepmedix.train.rewards import get_reward

    t0 = time.time()
    if cfg.max_length:
        raise ValueError("grpo: 'max_length' does not apply to GRPO; bound rollouts with 'max_completion_length'")
    reward_fn = get_reward(cfg.reward)
    root, train = load_split(data_uri, "train", cfg.tasks, cfg.task_ratios, cfg.max_records, cfg.seed)
    _, val = load_split(data_uri, "validate", cfg.tasks, None, cfg.eval_records, cfg.seed)
    if not train:
        raise ValueError(f"{data_uri}: no train records for tasks {cfg.tasks}")
    loaded = load(model_uri, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    before = held_out_reward(loaded, root, val, reward_fn, cfg.max_completion_length, cfg.frame)
    rows = [{"prompt": [user_message(r.prompt, 1)], "image": record_images(root, r, cfg.frame)[0], "answer": r.answer,
             "ref_boxes_frame": frame_boxes(r, cfg.frame)} for r in train]
    ds = Dataset.from_list(rows)
    with store.atomic_dir(out_uri) as out:
        work = out / ".trainer"
        args = TRLGRPOConfig(
            output_dir=str(work), max_steps=cfg.max_steps, num_train_epochs=cfg.num_train_epochs,
            per_device_train_batch_size=cfg.per_device_train_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
            num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature, beta=cfg.beta, logging_steps=max(1, cfg.logging_steps),
            save_strategy="no", report_to=[], seed=cfg.seed, bf16=cfg.bf16 and torch.cuda.is_available(),
            gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=not torch.cuda.is_available(),
            remove_unused_columns=False, dataloader_num_workers=0,
        )
        if cfg.freeze_vision or cfg.freeze_merger:
            freeze_vision(loaded.model, tower=cfg.freeze_vision, merger=cfg.freeze_merger)
        loaded.model.train()
        trainer = GRPOTrainer(model=loaded.model, reward_funcs=[reward_fn], args=args, train_dataset=ds,
                              processing_class=loaded.processor)
        result = trainer.train()
        shutil.rmtree(work, ignore_errors=True)
        after = held_out_reward(loaded, root, val, reward_fn, cfg.max_completion_length, cfg.frame)
        save_model(trainer, loaded.processor, out)
        write_curve(trainer.state.log_history, "reward", out / "reward_curve.png", "grpo: mean reward")
        metrics = {"stage": "grpo", "metric": f"val_reward_{cfg.reward}", "before": before, "after": after,
                   "train_loss": result.training_loss, "steps": trainer.state.global_step, "n_train": len(ds),
                   "n_val": len(val), "wall_s": time.time() - t0}
        write_json(metrics, out / "metrics.json")
        write_json(trainer.state.log_history, out / "log_history.json")
        store.write_lineage(out, "grpo", cfg, inputs={"data": data_uri, "model": model_uri}, extra={"metrics": metrics})
    return metrics
