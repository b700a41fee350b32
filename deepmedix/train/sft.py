"""Stages 1 and 2: supervised fine-tuning with TRL's ``SFTTrainer`` on image + prompt -> completion samples.

Stage 1 (instruction SFT) trains on plain reference answers; stage 2 (cold start) on grounded reasoning traces
with the reasoning instruction in the prompt. The stage's target metric is the held-out (validate split)
completion loss, measured before and after training.

What a team training the 7B model needs, all from the stage's YAML config:

* full fine-tuning or LoRA (peft) on the language model; the vision tower and/or the merger can stay frozen;
  gradient checkpointing; bf16 on a GPU, fp32 on CPU;
* ``max_length`` never cuts a sample (image tokens must stay whole): longer samples are skipped and counted;
* DeepSpeed ZeRO-2/3 (``deepspeed: configs/deepspeed/zero2.json``) under ``torchrun``, ``accelerate launch`` or
  ``deepspeed``, or a single process (the CLI sets up a one-process group when no launcher did);
* checkpoints published to the store every ``save_steps`` steps, each one atomically (a reader never sees half
  a checkpoint), the last ``save_total_limit`` kept; ``--resume`` continues from the latest one with the same
  data order, optimizer, scheduler and RNG states.

Only the main process (rank 0) publishes checkpoints and the final model folder.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from deepmedix import store
from deepmedix.config import TrainConfig
from deepmedix.data.records import iter_records, load_split, plain_target, select_ids
from deepmedix.data.schema import Record
from deepmedix.errors import InputError
from deepmedix.grounding import Frame
from deepmedix.train import checkpoints as ck
from deepmedix.train.common import freeze_vision, lazy_image_dataset, sft_row, write_curve

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------ samples

def image_tokens(image_processor, width: int, height: int) -> int:
    """How many ``<|image_pad|>`` tokens the processor expands one image of this size into (its own patch
    count — the method vLLM uses too — over the merge window)."""
    merge = image_processor.merge_size
    return image_processor.get_number_of_image_patches(height, width) // (merge * merge)


def sample_length(processor, row: dict[str, Any], frame: Frame) -> int:
    """Tokens of one prompt-completion sample as the trainer will see them, images expanded — from the chat
    template and each image's stored size as ``frame`` resizes it, without decoding an image."""
    text = processor.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    sizes = row["image_sizes"]
    return n_text - len(sizes) + sum(image_tokens(processor.image_processor, *frame.input_size(w, h))
                                     for w, h in sizes)  # one placeholder each


def iter_rows(root: Path, records: Iterable[Record], target_for: Callable[[Record, Frame], str], reasoning: bool,
              frame: Frame, processor, max_length: int, skipped: list[str]) -> Iterator[dict[str, Any]]:
    """The samples (images named, not decoded), one at a time; the ids of the records longer than ``max_length``
    tokens go to ``skipped``."""
    for r in records:
        row = sft_row(root, r, target_for(r, frame), reasoning)
        if max_length and sample_length(processor, row, frame) > max_length:
            skipped.append(r.record_id)
            continue
        yield row


def sample_dataset(root: Path, records: Iterable[Record], target_for: Callable[[Record, Frame], str],
                   reasoning: bool, frame: Frame, processor, max_length: int, path: Path | None = None,
                   order: list[str] | None = None):
    """The trainer's dataset of ``records``' samples (images decoded per batch; with ``path``, the samples written
    there as they come and put in ``order``: see :func:`deepmedix.train.common.lazy_image_dataset`), and the ids of
    the records skipped for being longer than ``max_length`` tokens."""
    skipped: list[str] = []
    rows = iter_rows(root, records, target_for, reasoning, frame, processor, max_length, skipped)
    return lazy_image_dataset(rows, frame, path, order), skipped


# ------------------------------------------------------------------------------------------ distribution

# ------------------------------------------------------------------------------------------ the trainer

def trl_args(cfg: TrainConfig, out: Path):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return ck.trainer_args(
        SFTConfig,
        output_dir=str(out), max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        logging_steps=max(1, cfg.logging_steps), report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(1, cfg.save_steps),
        save_total_limit=None, bf16=cfg.bf16 and cuda, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        max_length=None,  # lengths are checked up front: a vision sample is never cut (see iter_rows)
        completion_only_loss=True, dataloader_num_workers=cfg.dataloader_workers, use_cpu=not cuda,
        disable_tqdm=False,
        remove_unused_columns=False, deepspeed=ck.deepspeed_config(cfg.deepspeed),
        ddp_timeout=cfg.ddp_timeout_s,  # rank 0 uploads checkpoints while the others wait at a barrier
    )


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    # the language model's projections only: the vision tower's blocks use other names (qkv, proj, fc1, ...)
    targets = r".*language_model.*\.(" + "|".join(re.escape(t) for t in cfg.lora_targets) + r")$"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def train_sft(stage: str, cfg: TrainConfig, data_uri: str, model_uri: str, out_uri: str,
              targets_for=None, reasoning: bool = False, data_inputs: dict[str, str] | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Run SFT from ``model_uri`` on the records of ``data_uri``; write the model folder to ``out_uri``.

    ``targets_for(record, frame) -> str`` picks the completion in the model's frame (default: the plain reference
    answer). With ``resume``,
    training continues from the newest checkpoint in the store (from scratch when there is none)."""
    from trl import SFTTrainer

    from deepmedix.model.load import load
    from deepmedix.model.processor import resolve_frame

    ck.check(cfg)
    if cfg.deepspeed:
        ck.ensure_process_group_env()
    t0 = time.time()
    rank, _ = ck.world()
    targets_for = targets_for or plain_target
    # ``auto``: the frame the starting model records; resolved once, so the run id, the checkpoints' and the final
    # folder's lineage name the frame the model was trained in
    cfg = dataclasses.replace(cfg, frame=resolve_frame(cfg.frame, store.fetch(model_uri)))
    root = store.fetch(data_uri)
    # the train split is streamed: chosen by id, read a shard at a time, its samples written to the work folder
    train_ids = select_ids(root, "train", cfg.tasks, cfg.task_ratios, cfg.max_records, cfg.seed)
    _, val = load_split(data_uri, "validate", cfg.tasks, None, cfg.eval_records, cfg.seed)
    args = trl_args(cfg, ck.work_dir(out_uri) / "trainer")  # first: under ZeRO-3 the model is partitioned as it loads
    ckpt_uri, run, work, start = ck.start_run(stage, cfg, data_uri, model_uri, out_uri, resume)
    # A full-model checkpoint is loaded here, by from_pretrained: the Trainer's own resume loads its state dict
    # without the checkpoint-to-model key mapping of Qwen2.5-VL and would silently keep the starting weights.
    # (LoRA adapters and DeepSpeed engine states are restored by the Trainer itself.)
    weights = start if start is not None and not cfg.lora and not cfg.deepspeed else model_uri
    loaded = load(weights, device="cpu", dtype="float32", min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model = loaded.model  # the trainer moves it to the device (and casts it under bf16)
    frame = loaded.frame(cfg.frame)  # targets are written in each image's frame for this processor
    frozen = freeze_vision(model, cfg.freeze_vision, cfg.freeze_merger) if cfg.freeze_vision or cfg.freeze_merger else 0
    model.train()
    train_ds, skipped = sample_dataset(root, iter_records(root, "train", train_ids), targets_for, reasoning,
                                       frame, loaded.processor, cfg.max_length,
                                       work / f"samples-rank{rank}.arrow", train_ids)
    if not len(train_ds):
        raise InputError(f"{data_uri} (train): no samples to train on (check the config's tasks, split and "
                         f"max_length)")
    val_ds, vskipped = sample_dataset(root, val, targets_for, reasoning, frame, loaded.processor, cfg.max_length)
    val_ds = val_ds if len(val_ds) else None
    if skipped and rank == 0:
        print(f"{stage}: skipped {len(skipped)} training sample(s) longer than max_length={cfg.max_length} "
              f"tokens (e.g. {', '.join(skipped[:3])})", flush=True)
    trainer = ck.trainer_class(SFTTrainer, preloaded=weights is start and start is not None)(
                         model=model, args=args, train_dataset=train_ds,
                         eval_dataset=val_ds, processing_class=loaded.processor,
                         peft_config=lora_config(cfg) if cfg.lora else None,
                         callbacks=[ck.publisher(ckpt_uri, cfg.save_total_limit, stage, run, cfg.frame)]
                         if cfg.save_steps else None)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    # (DeepSpeed below ZeRO-3 cannot evaluate before its engine exists: the "before" loss is not measured there)
    before = (trainer.evaluate()["eval_loss"] if val_ds is not None else math.nan) if not cfg.deepspeed else None
    result = trainer.train(resume_from_checkpoint=str(start) if start else None)
    after = trainer.evaluate()["eval_loss"] if val_ds is not None else math.nan
    final = work / "final"
    ck.save_final(trainer, final)
    metrics = {
        "stage": stage, "metric": "val_loss", "before": before, "after": after,
        "train_loss": result.training_loss, "steps": trainer.state.global_step, "n_train": len(train_ds),
        "n_val": len(val_ds) if val_ds is not None else 0, "skipped_too_long": len(skipped) + len(vskipped),
        "trainable_params": trainable, "frozen_vision_params": frozen, "lora": cfg.lora,
        "deepspeed": cfg.deepspeed or None, "resumed_from": str(start) if start else None,
        "wall_s": time.time() - t0,
    }
    ck.publish_model(trainer.is_world_process_zero(), trainer.state.log_history, loaded.processor, work, out_uri, stage,
                     cfg, metrics,
                     {"data": data_uri, "model": model_uri, **(data_inputs or {})},
                     lambda out: write_curve(trainer.state.log_history, "loss", out / "loss_curve.png",
                                             f"{stage}: training loss"))
    return metrics


