"""Stages 1 and 2: supervised fine-tuning with TRL's ``SFTTrainer`` on image + prompt -> completion samples.

Stage 1 (instruction SFT) trains on plain reference answers; stage 2 (cold start) on grounded reasoning traces
with the reasoning instruction in the prompt. The stage's target metric is the held-out (validate split)
completion loss, measured before and after training.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from deepmedix import store
from deepmedix.config import TrainConfig
from deepmedix.data.schema import Record
from deepmedix.train.common import freeze_vision, load_split, plain_target, save_model, sft_row, write_curve, write_json


def make_dataset(root: Path, records: list[Record], targets: list[str], reasoning: bool, frame: int):
    from datasets import Dataset

    rows = [sft_row(root, r, t, reasoning, frame) for r, t in zip(records, targets)]
    if not rows:
        raise ValueError(f"{root}: no records selected for training (check the config's tasks and split)")
    return Dataset.from_list(rows)


def trl_args(cfg: TrainConfig, out: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out), max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        logging_steps=max(1, cfg.logging_steps), save_strategy="no", report_to=[], seed=cfg.seed,
        data_seed=cfg.seed, bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=cfg.max_length or None, completion_only_loss=True, dataloader_num_workers=0,
        use_cpu=not __import__("torch").cuda.is_available(), disable_tqdm=False, remove_unused_columns=False,
    )


def train_sft(stage: str, cfg: TrainConfig, data_uri: str, model_uri: str, out_uri: str,
              targets_for=None, reasoning: bool = False, data_inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """Run SFT from ``model_uri`` on the records of ``data_uri``; write the model folder to ``out_uri``.

    ``targets_for(record) -> str`` picks the completion (default: the plain reference answer)."""
    from trl import SFTTrainer

    from deepmedix.model.load import load

    t0 = time.time()
    targets_for = targets_for or (lambda r: plain_target(r, cfg.frame))
    root, train = load_split(data_uri, "train", cfg.tasks, cfg.task_ratios, cfg.max_records, cfg.seed)
    _, val = load_split(data_uri, "validate", cfg.tasks, None, cfg.eval_records, cfg.seed)
    loaded = load(model_uri, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model = loaded.model
    if cfg.freeze_vision:
        freeze_vision(model)
    model.train()
    train_ds = make_dataset(root, train, [targets_for(r) for r in train], reasoning, cfg.frame)
    val_ds = make_dataset(root, val, [targets_for(r) for r in val], reasoning, cfg.frame) if val else None
    with store.atomic_dir(out_uri) as out:
        work = out / ".trainer"
        trainer = SFTTrainer(model=model, args=trl_args(cfg, work), train_dataset=train_ds,
                             eval_dataset=val_ds, processing_class=loaded.processor)
        before = trainer.evaluate()["eval_loss"] if val_ds is not None else math.nan
        result = trainer.train()
        after = trainer.evaluate()["eval_loss"] if val_ds is not None else math.nan
        shutil.rmtree(work, ignore_errors=True)
        save_model(trainer, loaded.processor, out)
        write_curve(trainer.state.log_history, "loss", out / "loss_curve.png", f"{stage}: training loss")
        metrics = {
            "stage": stage, "metric": "val_loss", "before": before, "after": after,
            "train_loss": result.training_loss, "steps": trainer.state.global_step, "n_train": len(train_ds),
            "n_val": len(val_ds) if val_ds is not None else 0, "wall_s": time.time() - t0,
        }
        write_json(metrics, out / "metrics.json")
        write_json(trainer.state.log_history, out / "log_history.json")
        store.write_lineage(out, stage, cfg, inputs={"data": data_uri, "model": model_uri, **(data_inputs or {})},
                            extra={"metrics": metrics})
    return metrics
