"""Checkpoints and processes, shared by the trainers (SFT, cold start, GRPO).

Checkpoints go to the store (a local folder or ``s3://``) every ``save_steps`` steps, each one atomically: the
trainer writes ``checkpoint-N`` in a local work folder, rank 0 moves (or uploads) it into the store with its
commit marker (``lineage.json``, written last) and deletes the oldest beyond ``save_total_limit``. ``--resume``
continues from the newest committed one, and refuses one written by another run (other stage, inputs or config).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from deepmedix import store
from deepmedix.config import TrainConfig
from deepmedix.errors import InputError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------ processes


def trainer_args(cls, **kwargs):
    """``cls(**kwargs)`` for a trainer's arguments (TRL's ``SFTConfig``, ``GRPOConfig``). A setting they refuse is
    bad input: their ``__post_init__`` raises ValueError (e.g. a generation batch not divisible by
    ``num_generations``, trl/trainer/grpo_config.py), which becomes an InputError, one line in the CLI."""
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise InputError(f"{cls.__name__}: {exc}") from exc

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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------ checkpoints

def checkpoint_uri(cfg: TrainConfig, out_uri: str) -> str:
    return cfg.checkpoint_uri or default_checkpoint_uri(out_uri)


def default_checkpoint_uri(out_uri: str) -> str:
    """Where a stage writing its model to ``out_uri`` keeps its checkpoints unless told otherwise: beside it."""
    return f"{str(out_uri).rstrip('/')}-checkpoints"


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
        store.ordinary_modes(tmp)  # the Trainer's safetensors files are 0600
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


def run_id(stage: str, cfg: TrainConfig, data_uri: str, model_uri: str, extra: dict[str, Any] | None = None) -> str:
    """What makes a checkpoint resumable by a run: the stage, its inputs and its config, except the keys that
    only say how long to train or how to checkpoint and log."""
    import hashlib
    import json

    from deepmedix.config import to_dict

    c = {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES}
    blob = json.dumps({"stage": stage, "data": str(data_uri), "model": str(model_uri), "config": c,
                       **({"extra": extra} if extra else {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_RESUMABLE_CHANGES = {"max_steps", "num_train_epochs", "save_steps", "save_total_limit", "checkpoint_uri",
                      "logging_steps", "eval_records", "eval_max_new_tokens", "ddp_timeout_s", "rollout_samples",
                      "vllm_gpu_memory_utilization"}


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
        raise InputError(f"--resume: {ck} was written by another run (its stage, inputs or config differ: run "
                         f"{other} vs {run}); resume with the same config, or train afresh without --resume")
    return store.fetch(ck)


def clear_checkpoints(uri: str) -> int:
    """A run that does not resume starts its checkpoint folder afresh (like its output): returns how many
    committed checkpoints were removed."""
    found = committed_checkpoints(uri)
    for _, name in found:
        _delete(f"{uri.rstrip('/')}/{name}")
    return len(found)


def start_run(stage: str, cfg: TrainConfig, data_uri: str, model_uri: str, out_uri: str, resume: bool,
              extra: dict[str, Any] | None = None) -> tuple[str, str, Path, Path | None]:
    """Set a run up on every rank: (checkpoint URI, run id, local work folder, the checkpoint to resume from or
    None). A fresh run (no ``resume``) removes the earlier checkpoints; a killed run's work folder is dropped.
    ``extra`` joins the run id (what the config names but does not hold, e.g. a reward file's contents)."""
    rank, _ = world()
    ckpt_uri = checkpoint_uri(cfg, out_uri)
    run = run_id(stage, cfg, data_uri, model_uri, extra)
    work = work_dir(out_uri)
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)  # a killed run's staging is never published into this one
        if not resume and cfg.save_steps and clear_checkpoints(ckpt_uri):
            print(f"{stage}: a fresh run (no --resume): removed the earlier checkpoints under {ckpt_uri}", flush=True)
    barrier()
    start = None
    if resume:  # each node's first process fetches (S3: downloads) while the others wait, then they read its copy
        local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if local_first:
            start = latest_checkpoint(ckpt_uri, run)
        barrier()
        if not local_first:
            start = latest_checkpoint(ckpt_uri, run)
        if rank == 0:
            print(f"{stage}: " + (f"resuming from {start}" if start else f"no checkpoint under {ckpt_uri}; "
                                                                           f"starting from the beginning"), flush=True)
    return ckpt_uri, run, work, start


def publisher(uri: str, keep: int, stage: str, run: str, frame: str):
    """The callback that publishes each checkpoint. Its lineage names the stage that wrote it (``source_stage``) and
    the box frame the run trains in (``config.frame``), so that evaluating a checkpoint with ``auto`` settings
    prompts and reads boxes as the stage does (an SFT checkpoint: plain answers, its frame)."""
    from transformers import TrainerCallback

    class Publish(TrainerCallback):
        """After the trainer wrote ``checkpoint-N`` locally (every rank its part), rank 0 publishes it."""

        def on_save(self, args, state, control, **kw):
            barrier()
            if state.is_world_process_zero:
                src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if src.is_dir():
                    dest = publish_checkpoint(src, uri, keep, {"step": state.global_step, "of": state.max_steps,
                                                               "source_stage": stage, "run": run,
                                                               "config": {"frame": frame}})
                    print(f"checkpoint: step {state.global_step} -> {dest}", flush=True)
            barrier()
            return control

    return Publish()



def deepspeed_config(path: str) -> str | None:
    """The DeepSpeed JSON to use: the path as given, else relative to the repository (configs/deepspeed/...)."""
    from deepmedix.config import CONFIG_DIR

    if not path:
        return None
    for p in (Path(path), CONFIG_DIR.parent / path):
        if p.is_file():
            return str(p)
    raise InputError(f"deepspeed: {path}: no such DeepSpeed config file")


def _zero_stage(path: str | None) -> int:
    import json

    if not path:
        return 0
    try:
        return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"deepspeed: {path}: not a readable DeepSpeed JSON config ({exc})") from None


def check(cfg: TrainConfig) -> None:
    stage3 = _zero_stage(deepspeed_config(cfg.deepspeed)) == 3
    _, world_size = world()
    if cfg.save_steps and world_size > int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))):
        raise InputError("save_steps on more than one node: each node's optimizer shards would have to be "
                         "published too, which is not supported yet; train on one node or set save_steps: 0")
    if cfg.lora and stage3:
        raise InputError("lora with ZeRO-3 is not supported here (the merged save needs whole weights): use "
                         "ZeRO-2 with LoRA, or full fine-tuning with ZeRO-3")
    if cfg.save_steps < 0 or cfg.save_total_limit < 0:
        raise InputError("save_steps and save_total_limit must be >= 0")
    if cfg.lora and cfg.lora_r < 1:
        raise InputError(f"lora_r must be >= 1, got {cfg.lora_r}")



def trainer_class(base: type, preloaded: bool) -> type:
    """``base`` (a TRL trainer), or when the weights were already loaded from the checkpoint a subclass that
    leaves them alone."""
    if not preloaded:
        return base

    class Resumed(base):
        """The weights were loaded from the checkpoint by ``from_pretrained`` already (with Qwen2.5-VL's key
        mapping); the Trainer restores the optimizer, scheduler, RNG and progress, not the weights again."""

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            return None

    Resumed.__name__ = f"Resumed{base.__name__}"
    return Resumed


def save_final(trainer, dest: Path) -> None:
    """The trained weights as a stock Qwen2.5-VL folder: LoRA adapters merged in; under ZeRO-3 the shards are
    gathered (every rank takes part) and the folder is put in the stock layout (:func:`restock`)."""
    if hasattr(trainer.model, "merge_and_unload"):
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(dest)
    else:
        trainer.save_model(str(dest))
        if getattr(trainer, "is_deepspeed_enabled", False) and trainer.is_world_process_zero():
            restock_apart(dest)
    barrier()


def restock_apart(folder: Path) -> None:
    """:func:`restock` in a process of its own: in the training process ZeRO-3's config is still set, and a model
    loaded there is partitioned (its saved tensors would be empty)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "deepmedix.train.checkpoints", "restock", str(folder)],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        from deepmedix.errors import ModelLoadError

        raise ModelLoadError(f"{folder}: rewriting the saved weights in the stock layout failed:\n{r.stderr[-2000:]}")
    if r.stdout.strip():
        print(r.stdout.strip(), flush=True)


# Key prefixes that are no part of a Qwen2.5-VL folder's layout (model.embed_tokens / model.layers / model.norm,
# visual.*, lm_head.*, what the released checkpoints, vLLM and every transformers version read).
NOT_STOCK = ("model.model.", "model.language_model.", "model.visual.")


def weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            keys.extend(st.keys())
    return keys


def restock(folder: Path) -> bool:
    """Rewrite a saved folder in the stock key layout when it is not in it; True when it was rewritten.

    Under DeepSpeed ZeRO-3 the Trainer saves the gathered state dict through ``save_pretrained(state_dict=...)``,
    whose reverse renaming (transformers ``core_model_loading.revert_weight_conversion``) turns the engine's names
    into ``model.model.layers.*`` with transformers 5.24 (5.17 writes ``model.layers.*``). Transformers 5.24 reads
    that back, but vLLM and other versions do not. Loaded here (the loader maps the names; a missing or unexpected
    weight is an error, never a silently re-initialised model) and saved again as a plain save writes it."""
    if not any(k.startswith(NOT_STOCK) for k in weight_keys(folder)):
        return False
    from transformers import Qwen2_5_VLForConditionalGeneration

    from deepmedix.errors import ModelLoadError

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), dtype="auto",
                                                                     output_loading_info=True)
    if info.get("missing_keys") or info.get("unexpected_keys"):
        raise ModelLoadError(f"{folder}: the saved weights do not map onto Qwen2.5-VL (missing "
                             f"{sorted(info.get('missing_keys') or [])[:3]}, unexpected "
                             f"{sorted(info.get('unexpected_keys') or [])[:3]})")
    # save_pretrained reverts the renamings recorded when the folder was loaded (``_weight_conversions``), which
    # would write the odd names back; without them it reverts the model type's own mapping, as for a model built
    # from its config, and writes the stock layout (a plain save's). The check below catches a version where not.
    if hasattr(model, "_weight_conversions"):
        model._weight_conversions = None
    for f in list(Path(folder).glob("model*.safetensors")) + list(Path(folder).glob("model.safetensors.index.json")):
        f.unlink()
    model.save_pretrained(str(folder))
    if any(k.startswith(NOT_STOCK) for k in weight_keys(folder)):
        raise ModelLoadError(f"{folder}: still not in the stock Qwen2.5-VL layout after a plain save")
    return True


def publish_model(is_main: bool, log_history: list[dict], processor, work: Path, out_uri: str, stage: str,
                  cfg: TrainConfig, metrics: dict[str, Any], inputs: dict[str, str],
                  extras: Callable[[Path], None]) -> None:
    """Rank 0 (``is_main``) writes the output folder atomically: the trained model (``work/final``, from
    :func:`save_final`), the processor, ``extras(out)`` (curves and the like), ``metrics.json``,
    ``log_history.json`` and the lineage; then the work folder goes. Every rank waits for it."""
    from deepmedix.store import write_json

    if is_main:
        with store.atomic_dir(out_uri) as out:
            for p in (work / "final").iterdir():
                if p.name != "training_args.bin":
                    shutil.move(str(p), out / p.name)
            processor.save_pretrained(out)
            extras(out)
            write_json(metrics, out / "metrics.json")
            write_json(log_history, out / "log_history.json")
            store.write_lineage(out, stage, cfg, inputs=inputs, extra={"metrics": metrics})
        shutil.rmtree(work, ignore_errors=True)
    barrier()


if __name__ == "__main__":  # python -m deepmedix.train.checkpoints restock FOLDER (restock_apart)
    import sys

    if sys.argv[1:2] == ["restock"] and len(sys.argv) == 3:
        if restock(Path(sys.argv[2])):
            print(f"{sys.argv[2]}: weights rewritten in the stock Qwen2.5-VL layout")
    else:
        sys.exit("usage: python -m deepmedix.train.checkpoints restock FOLDER")
