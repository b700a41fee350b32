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

import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from deepmedix import store
from deepmedix.config import TrainConfig
from deepmedix.data.schema import Record
from deepmedix.train.common import freeze_vision, load_split, plain_target, sft_row, write_curve, write_json

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------ samples

def image_tokens(image_processor, width: int, height: int) -> int:
    """How many ``<|image_pad|>`` tokens the processor expands one image of this size into (its own patch
    count — the method vLLM uses too — over the merge window)."""
    merge = image_processor.merge_size
    return image_processor.get_number_of_image_patches(height, width) // (merge * merge)


def sample_length(processor, row: dict[str, Any]) -> int:
    """Tokens of one prompt-completion sample as the trainer will see them, images expanded — from the chat
    template and the image sizes, without running the image processor."""
    text = processor.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    per_image = [image_tokens(processor.image_processor, im.width, im.height) for im in row["images"]]
    return n_text - len(per_image) + sum(per_image)  # each image is one placeholder token in the template


def make_rows(root: Path, records: list[Record], targets: list[str], reasoning: bool, frame: int, processor,
              max_length: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The samples, and the ids of the records skipped for being longer than ``max_length`` tokens."""
    rows, skipped = [], []
    for r, t in zip(records, targets):
        row = sft_row(root, r, t, reasoning, frame)
        if max_length and sample_length(processor, row) > max_length:
            skipped.append(r.record_id)
            continue
        rows.append(row)
    return rows, skipped


def make_dataset(rows: list[dict[str, Any]], where: str):
    from datasets import Dataset

    if not rows:
        raise ValueError(f"{where}: no samples to train on (check the config's tasks, split and max_length)")
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------ distribution

def world() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun, accelerate, deepspeed) set them; (0, 1) alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def ensure_process_group_env() -> None:
    """DeepSpeed needs a process group even for one process: when no launcher set one up, describe a
    one-process group on 127.0.0.1 (a free port)."""
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------ checkpoints

def checkpoint_uri(cfg: TrainConfig, out_uri: str) -> str:
    return cfg.checkpoint_uri or f"{str(out_uri).rstrip('/')}-checkpoints"


def work_dir(out_uri: str) -> Path:
    """Local scratch for the trainer, the same path on every rank of a node: beside a local output, in the
    cache for an S3 one."""
    if store.is_s3(out_uri):
        import hashlib

        return store.cache_root() / "work" / hashlib.sha256(str(out_uri).encode()).hexdigest()[:16]
    p = store.local_path(out_uri)
    return p.with_name(f".{p.name}.work")


def committed_checkpoints(uri: str) -> list[tuple[int, str]]:
    """(step, name) of the checkpoints in the store whose commit marker (``lineage.json``) is there, oldest first."""
    found: list[tuple[int, str]] = []
    if store.is_s3(uri):
        bucket, prefix = store.parse_s3(uri)
        with store.s3_errors(uri):
            client = store.s3_client()
            if not client.bucket_exists(bucket):
                return []
            for o in client.list_objects(bucket, prefix=f"{prefix}/" if prefix else "", recursive=True):
                rel = o.object_name[len(prefix) + 1 if prefix else 0:]
                parts = rel.split("/")
                if len(parts) == 2 and parts[1] == store.LINEAGE and CKPT_RE.match(parts[0]):
                    found.append((int(CKPT_RE.match(parts[0])[1]), parts[0]))
    else:
        base = store.local_path(uri)
        if base.is_dir():
            for d in base.iterdir():
                m = CKPT_RE.match(d.name)
                if m and (d / store.LINEAGE).is_file():
                    found.append((int(m[1]), d.name))
    return sorted(found)


def publish_checkpoint(src: Path, uri: str, keep: int, info: dict[str, Any]) -> str:
    """Move a checkpoint folder the trainer just wrote into the store, atomically, and delete the oldest ones
    beyond ``keep``. Returns its URI."""
    import json

    (src / store.LINEAGE).write_text(json.dumps({"stage": "checkpoint", **info}, indent=2, sort_keys=True) + "\n")
    dest = f"{uri.rstrip('/')}/{src.name}"
    if store.is_s3(uri):
        with store.s3_errors(dest):
            store.upload_dir(src, dest)  # lineage.json last: the commit marker
        shutil.rmtree(src, ignore_errors=True)
    else:
        final = store.local_path(dest)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.rename(src, tmp)  # same filesystem: instant
        except OSError:
            shutil.copytree(src, tmp)
            shutil.rmtree(src, ignore_errors=True)
        if final.exists():
            _delete(str(final))  # its commit marker first: a crash here leaves no half checkpoint "committed"
        os.rename(tmp, final)
    step = info["step"]
    older = [name for n, name in committed_checkpoints(uri) if n < step]
    for name in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
        _delete(f"{uri.rstrip('/')}/{name}")
    return dest


def _delete(uri: str) -> None:
    if store.is_s3(uri):
        bucket, prefix = store.parse_s3(uri)
        with store.s3_errors(uri):
            client = store.s3_client()
            names = [o.object_name for o in client.list_objects(bucket, prefix=prefix + "/", recursive=True)]
            names.sort(key=lambda k: not k.endswith("/" + store.LINEAGE))  # the commit marker first
            for n in names:
                client.remove_object(bucket, n)
    else:
        p = store.local_path(uri)
        (p / store.LINEAGE).unlink(missing_ok=True)  # uncommitted first, then removed
        shutil.rmtree(p, ignore_errors=True)


def run_id(stage: str, cfg: TrainConfig, data_uri: str, model_uri: str) -> str:
    """What makes a checkpoint resumable by a run: the stage, its inputs and its config, except the keys that
    only say how long to train or how to checkpoint and log."""
    import hashlib
    import json

    from deepmedix.config import to_dict

    c = {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES}
    blob = json.dumps({"stage": stage, "data": str(data_uri), "model": str(model_uri), "config": c}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_RESUMABLE_CHANGES = {"max_steps", "num_train_epochs", "save_steps", "save_total_limit", "checkpoint_uri",
                      "logging_steps", "eval_records", "eval_max_new_tokens", "ddp_timeout_s"}


def _checkpoint_run(uri: str) -> str | None:
    import json

    try:
        if store.is_s3(uri):
            bucket, prefix = store.parse_s3(uri)
            with store.s3_errors(uri):
                resp = store.s3_client().get_object(bucket, f"{prefix}/{store.LINEAGE}")
                try:
                    return json.loads(resp.read()).get("run")
                finally:
                    resp.close()
                    resp.release_conn()
        return json.loads((store.local_path(uri) / store.LINEAGE).read_text()).get("run")
    except (OSError, ValueError):
        return None


def latest_checkpoint(uri: str, run: str) -> Path | None:
    """A local folder holding the newest committed checkpoint (downloaded from S3), or None. A checkpoint
    written by another run (other stage, inputs or config) is refused, never resumed silently."""
    found = committed_checkpoints(uri)
    if not found:
        return None
    ck = f"{uri.rstrip('/')}/{found[-1][1]}"
    other = _checkpoint_run(ck)
    if other != run:
        raise ValueError(f"--resume: {ck} was written by another run (its stage, inputs or config differ: run "
                         f"{other} vs {run}); resume with the same config, or train afresh without --resume")
    return store.fetch(ck)


def clear_checkpoints(uri: str) -> int:
    """A run that does not resume starts its checkpoint folder afresh (like its output): returns how many
    committed checkpoints were removed."""
    found = committed_checkpoints(uri)
    for _, name in found:
        _delete(f"{uri.rstrip('/')}/{name}")
    return len(found)


def _publisher(uri: str, keep: int, stage: str, run: str):
    from transformers import TrainerCallback

    class Publish(TrainerCallback):
        """After the trainer wrote ``checkpoint-N`` locally (every rank its part), rank 0 publishes it."""

        def on_save(self, args, state, control, **kw):
            _barrier()
            if state.is_world_process_zero:
                src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if src.is_dir():
                    dest = publish_checkpoint(src, uri, keep, {"step": state.global_step, "of": state.max_steps,
                                                               "source_stage": stage, "run": run})
                    print(f"checkpoint: step {state.global_step} -> {dest}", flush=True)
            _barrier()
            return control

    return Publish()


# ------------------------------------------------------------------------------------------ the trainer

def trl_args(cfg: TrainConfig, out: Path):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out), max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        logging_steps=max(1, cfg.logging_steps), report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(1, cfg.save_steps),
        save_total_limit=None, bf16=cfg.bf16 and cuda, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        max_length=None,  # lengths are checked up front: a vision sample is never cut (see make_rows)
        completion_only_loss=True, dataloader_num_workers=0, use_cpu=not cuda, disable_tqdm=False,
        remove_unused_columns=False, deepspeed=deepspeed_config(cfg.deepspeed),
        ddp_timeout=cfg.ddp_timeout_s,  # rank 0 uploads checkpoints while the others wait at a barrier
    )


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    # the language model's projections only: the vision tower's blocks use other names (qkv, proj, fc1, ...)
    targets = r".*language_model.*\.(" + "|".join(re.escape(t) for t in cfg.lora_targets) + r")$"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM")


def deepspeed_config(path: str) -> str | None:
    """The DeepSpeed JSON to use: the path as given, else relative to the repository (configs/deepspeed/...)."""
    from deepmedix.config import CONFIG_DIR

    if not path:
        return None
    for p in (Path(path), CONFIG_DIR.parent / path):
        if p.is_file():
            return str(p)
    raise ValueError(f"deepspeed: {path}: no such DeepSpeed config file")


def _zero_stage(path: str | None) -> int:
    import json

    if not path:
        return 0
    try:
        return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"deepspeed: {path}: not a readable DeepSpeed JSON config ({exc})") from None


def _check(cfg: TrainConfig) -> None:
    stage3 = _zero_stage(deepspeed_config(cfg.deepspeed)) == 3
    _, world_size = world()
    if cfg.save_steps and world_size > int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))):
        raise ValueError("save_steps on more than one node: each node's optimizer shards would have to be "
                         "published too, which is not supported yet; train on one node or set save_steps: 0")
    if cfg.lora and stage3:
        raise ValueError("lora with ZeRO-3 is not supported here (the merged save needs whole weights): use "
                         "ZeRO-2 with LoRA, or full fine-tuning with ZeRO-3")
    if cfg.save_steps < 0 or cfg.save_total_limit < 0:
        raise ValueError("save_steps and save_total_limit must be >= 0")
    if cfg.lora and cfg.lora_r < 1:
        raise ValueError(f"lora_r must be >= 1, got {cfg.lora_r}")


def train_sft(stage: str, cfg: TrainConfig, data_uri: str, model_uri: str, out_uri: str,
              targets_for=None, reasoning: bool = False, data_inputs: dict[str, str] | None = None,
              resume: bool = False) -> dict[str, Any]:
    """Run SFT from ``model_uri`` on the records of ``data_uri``; write the model folder to ``out_uri``.

    ``targets_for(record) -> str`` picks the completion (default: the plain reference answer). With ``resume``,
    training continues from the newest checkpoint in the store (from scratch when there is none)."""
    from deepmedix.model.load import load

    _check(cfg)
    if cfg.deepspeed:
        ensure_process_group_env()
    t0 = time.time()
    rank, _ = world()
    targets_for = targets_for or (lambda r: plain_target(r, cfg.frame))
    root, train = load_split(data_uri, "train", cfg.tasks, cfg.task_ratios, cfg.max_records, cfg.seed)
    _, val = load_split(data_uri, "validate", cfg.tasks, None, cfg.eval_records, cfg.seed)
    ckpt_uri = checkpoint_uri(cfg, out_uri)
    run = run_id(stage, cfg, data_uri, model_uri)
    work = work_dir(out_uri)
    args = trl_args(cfg, work / "trainer")  # first: under ZeRO-3 the model is then partitioned as it loads
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)  # a killed run's staging is never published into this one
        if not resume and cfg.save_steps and clear_checkpoints(ckpt_uri):
            print(f"{stage}: a fresh run (no --resume): removed the earlier checkpoints under {ckpt_uri}", flush=True)
    _barrier()
    start = None
    if resume:  # each node's first process fetches (S3: downloads) while the others wait, then they read its copy
        local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if local_first:
            start = latest_checkpoint(ckpt_uri, run)
        _barrier()
        if not local_first:
            start = latest_checkpoint(ckpt_uri, run)
        if rank == 0:
            print(f"{stage}: " + (f"resuming from {start}" if start else f"no checkpoint under {ckpt_uri}; "
                                                                           f"starting from the beginning"), flush=True)
    # A full-model checkpoint is loaded here, by from_pretrained: the Trainer's own resume loads its state dict
    # without the checkpoint-to-model key mapping of Qwen2.5-VL and would silently keep the starting weights.
    # (LoRA adapters and DeepSpeed engine states are restored by the Trainer itself.)
    weights = start if start is not None and not cfg.lora and not cfg.deepspeed else model_uri
    loaded = load(weights, device="cpu", dtype="float32", min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    model = loaded.model  # the trainer moves it to the device (and casts it under bf16)
    frozen = freeze_vision(model, cfg.freeze_vision, cfg.freeze_merger) if cfg.freeze_vision or cfg.freeze_merger else 0
    model.train()
    rows, skipped = make_rows(root, train, [targets_for(r) for r in train], reasoning, cfg.frame, loaded.processor,
                              cfg.max_length)
    train_ds = make_dataset(rows, f"{data_uri} (train)")
    vrows, vskipped = make_rows(root, val, [targets_for(r) for r in val], reasoning, cfg.frame, loaded.processor,
                                cfg.max_length)
    val_ds = make_dataset(vrows, f"{data_uri} (validate)") if vrows else None
    if skipped and rank == 0:
        print(f"{stage}: skipped {len(skipped)} training sample(s) longer than max_length={cfg.max_length} "
              f"tokens (e.g. {', '.join(skipped[:3])})", flush=True)
    trainer = _trainer_class(preloaded=weights is start and start is not None)(
                         model=model, args=args, train_dataset=train_ds,
                         eval_dataset=val_ds, processing_class=loaded.processor,
                         peft_config=lora_config(cfg) if cfg.lora else None,
                         callbacks=[_publisher(ckpt_uri, cfg.save_total_limit, stage, run)] if cfg.save_steps else None)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.model.parameters() if p.requires_grad)
    # (DeepSpeed below ZeRO-3 cannot evaluate before its engine exists: the "before" loss is not measured there)
    before = (trainer.evaluate()["eval_loss"] if val_ds is not None else math.nan) if not cfg.deepspeed else None
    result = trainer.train(resume_from_checkpoint=str(start) if start else None)
    after = trainer.evaluate()["eval_loss"] if val_ds is not None else math.nan
    final = work / "final"
    _save_final(trainer, final)
    metrics = {
        "stage": stage, "metric": "val_loss", "before": before, "after": after,
        "train_loss": result.training_loss, "steps": trainer.state.global_step, "n_train": len(train_ds),
        "n_val": len(val_ds) if val_ds is not None else 0, "skipped_too_long": len(skipped) + len(vskipped),
        "trainable_params": trainable, "frozen_vision_params": frozen, "lora": cfg.lora,
        "deepspeed": cfg.deepspeed or None, "resumed_from": str(start) if start else None,
        "wall_s": time.time() - t0,
    }
    if trainer.is_world_process_zero():
        with store.atomic_dir(out_uri) as out:
            for p in final.iterdir():
                if p.name != "training_args.bin":
                    shutil.move(str(p), out / p.name)
            loaded.processor.save_pretrained(out)
            write_curve(trainer.state.log_history, "loss", out / "loss_curve.png", f"{stage}: training loss")
            write_json(metrics, out / "metrics.json")
            write_json(trainer.state.log_history, out / "log_history.json")
            store.write_lineage(out, stage, cfg, inputs={"data": data_uri, "model": model_uri, **(data_inputs or {})},
                                extra={"metrics": metrics})
        shutil.rmtree(work, ignore_errors=True)
    _barrier()
    return metrics


def _trainer_class(preloaded: bool):
    from trl import SFTTrainer

    if not preloaded:
        return SFTTrainer

    class ResumedSFTTrainer(SFTTrainer):
        """The weights were loaded from the checkpoint by ``from_pretrained`` already (with Qwen2.5-VL's key
        mapping); the Trainer restores the optimizer, scheduler, RNG and progress, not the weights again."""

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            return None

    return ResumedSFTTrainer


def _save_final(trainer, dest: Path) -> None:
    """The trained weights as a stock Qwen2.5-VL folder: LoRA adapters merged in; under ZeRO-3 the shards are
    gathered (every rank takes part)."""
    if hasattr(trainer.model, "merge_and_unload"):
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(dest)
    else:
        trainer.save_model(str(dest))
    _barrier()
