"""Stage 3: online RL with TRL's ``GRPOTrainer`` on images, rewarded by the rule-based rewards of
:mod:`deepmedix.rewards` (as TRL reward functions: :mod:`deepmedix.train.grpo_rewards`).

* The reward is one of ``paper``, ``paper-words``, ``grounded``, ``clinical`` or a weighted composite of them
  (:class:`~deepmedix.rewards.spec.RewardSpec`); each component is one TRL reward function, logged on its own.
* Rollouts: ``num_generations`` completions per prompt at ``temperature``/``top_p``, by vLLM in TRL's colocate
  mode where vLLM is installed and a GPU is there (``use_vllm: auto``), by ``generate`` otherwise. A prompt
  longer than ``max_prompt_length`` tokens (images included) is skipped and counted, never cut.
* Checkpoints to the store every ``save_steps`` and ``--resume`` as in SFT (``checkpoints.py``).
* Outputs beside the model: ``reward_curves.png`` (the total reward and each component, KL, completion length),
  ``rollouts.jsonl`` (``rollout_samples`` completions per step with their rewards), ``metrics.json`` with the
  held-out greedy reward before and after, and the training reward's first and last windows.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from deepmedix import store
from deepmedix.config import GRPOConfig
from deepmedix.data.records import frame_boxes, image_file, load_split
from deepmedix.errors import InputError
from deepmedix.grounding import Frame, user_message
from deepmedix.model.generate import generate_on
from deepmedix.model.processor import resolve_frame
from deepmedix.rewards.spec import RewardSpec
from deepmedix.train import checkpoints as ck
from deepmedix.train.common import freeze_vision, lazy_image_dataset
from deepmedix.train.grpo_rewards import trl_reward_functions

ROLLOUTS = "rollouts.jsonl"


# ------------------------------------------------------------------------------------------ settings

def use_vllm(cfg: GRPOConfig) -> bool:
    """vLLM rollouts: ``true``/``false``, or ``auto`` = when vLLM is importable and a CUDA GPU is there."""
    import importlib.util

    import torch

    mode = str(cfg.use_vllm).lower()
    if mode not in ("auto", "true", "false"):
        raise InputError(f"use_vllm must be auto, true or false, got {cfg.use_vllm!r}")
    available = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if mode == "true" and not available:
        raise InputError("use_vllm: true, but vLLM is not installed or there is no CUDA GPU; set use_vllm: auto")
    return available if mode == "auto" else mode == "true"


def trl_args(cfg: GRPOConfig, out: Path, weights: list[float], vllm: bool = False):
    import torch
    from trl import GRPOConfig as TRLGRPOConfig

    cuda = torch.cuda.is_available()
    return ck.trainer_args(
        TRLGRPOConfig,
        output_dir=str(out), max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_train_epochs, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high or None, loss_type=cfg.loss_type,
        scale_rewards=cfg.scale_rewards, num_iterations=cfg.num_iterations, reward_weights=weights,
        steps_per_generation=cfg.steps_per_generation or None, delta=cfg.delta or None,
        use_vllm=vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
        logging_steps=max(1, cfg.logging_steps), report_to=[], seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(1, cfg.save_steps),
        save_total_limit=None, bf16=cfg.bf16 and cuda, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        use_cpu=not cuda, remove_unused_columns=False, dataloader_num_workers=cfg.dataloader_workers,
        disable_tqdm=False,
        deepspeed=ck.deepspeed_config(cfg.deepspeed), ddp_timeout=cfg.ddp_timeout_s,
        # the KL reference (built by TRL from the starting model's folder) in bf16 on a GPU: it is never trained
        model_init_kwargs={"dtype": "bfloat16"} if cfg.bf16 and cuda else None,
    )


# ------------------------------------------------------------------------------------------ prompts

def prompt_length(processor, row: dict[str, Any], frame: Frame) -> int:
    """Tokens of one prompt as the trainer feeds it (chat template with the generation prompt, images expanded:
    each image at its stored size as ``frame`` resizes it), without decoding an image."""
    from deepmedix.train.sft import image_tokens

    text = processor.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    n_text = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    sizes = row["image_sizes"]
    return n_text - len(sizes) + sum(image_tokens(processor.image_processor, *frame.input_size(w, h))
                                     for w, h in sizes)


def make_rows(root: Path, records: list, cfg: GRPOConfig, processor, frame: Frame
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """The prompts (the record's images — named, decoded per batch by the dataset —, its answer, reference boxes
    and task for the rewards), and the ids of those skipped for being longer than ``max_prompt_length``."""
    rows, skipped = [], []
    for r in records:
        files = [image_file(root, uri) for uri in r.images]  # every view, as evaluation and serving see the record
        row = {"prompt": [user_message(r.prompt, len(files))], "image_files": files,
               "image_sizes": [list(s) for s in r.image_sizes], "record_id": r.record_id,
               "answer": r.answer, "ref_boxes_frame": frame_boxes(r, frame), "task": r.task}
        if cfg.max_prompt_length and prompt_length(processor, row, frame) > cfg.max_prompt_length:
            skipped.append(r.record_id)
            continue
        rows.append(row)
    return rows, skipped


# ------------------------------------------------------------------------------------------ what a run leaves

class RolloutLog:
    """Writes ``rollout_samples`` completions of each generation batch with every reward component to a JSONL
    file; a checkpoint carries the file so that a resumed run continues it."""

    def __init__(self, path: Path, per_batch: int):
        self.path, self.per_batch = path, per_batch

    def __call__(self, batch: dict[str, Any]) -> None:
        if self.per_batch <= 0:
            return
        state = batch["kwargs"].get("trainer_state")
        step = (state.global_step if state is not None else 0) + 1  # the optimizer step these rollouts feed
        prompts = batch["kwargs"].get("prompts") or []
        lines = []
        for i in range(min(self.per_batch, len(batch["completions"]))):
            comps = {name: rows[i] for name, rows in batch["scores"].items()}
            applied = [batch["weights"][n] * c["overall"] for n, c in comps.items() if c is not None]
            total = sum(applied) if applied else None  # no component applies: TRL leaves it out too
            lines.append({"step": step, "task": batch["task"][i],
                          "prompt": _prompt_text(prompts[i]) if prompts else None,
                          "completion": batch["completions"][i], "answer": batch["answer"][i],
                          "rewards": comps, "total": total})
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(x, sort_keys=True) + "\n" for x in lines)

    def restore(self, checkpoint: Path | None, step: int) -> None:
        """Start from a checkpoint's copy, keeping the lines up to its step."""
        src = checkpoint / ROLLOUTS if checkpoint else None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if src is None or not src.is_file():
            self.path.write_text("")
            return
        keep = [ln for ln in src.read_text(encoding="utf-8").splitlines() if json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def callback(self):
        from transformers import TrainerCallback

        log = self

        class CarryRollouts(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                dest = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if state.is_world_process_zero and dest.is_dir() and log.path.is_file():
                    shutil.copy2(log.path, dest / ROLLOUTS)
                return control

        return CarryRollouts()


def _prompt_text(prompt: Any) -> str:
    from deepmedix.train.grpo_rewards import completion_text

    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return completion_text([{"role": "assistant", "content": users[-1]["content"]}]) if users else ""
    return str(prompt)


def series(log_history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h[key])) for h in log_history
            if key in h and h[key] is not None and not math.isnan(float(h[key]))]


def windows(log_history: list[dict], key: str, frac: float = 0.25) -> tuple[float, float] | None:
    """Mean of ``key`` over the first and the last ``frac`` of the logged steps (at least one each)."""
    vals = [v for _, v in series(log_history, key)]
    if len(vals) < 2:
        return None
    k = max(1, int(len(vals) * frac))
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def write_curves(log_history: list[dict], spec: RewardSpec, path: Path, title: str) -> None:
    """One PNG: the total reward and each component (with its parts) by step; KL; completion length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key, label in [("reward", "total (weighted)")] + [(f"rewards/{n}/mean", f"{n} (x{w:g})")
                                                           for n, w in spec.weights.items()]:
        pts = series(log_history, key)
        if pts:
            ax.plot(*zip(*pts), marker=".", label=label, linewidth=2 if key == "reward" else 1)
    for key in sorted({k for h in log_history for k in h if k.startswith("rewards/") and k.count("/") == 2
                       and not k.endswith(("/mean", "/std"))}):
        pts = series(log_history, key)
        if pts:
            ax.plot(*zip(*pts), linestyle="--", label=key[len("rewards/"):])
    ax.set_title("reward")
    ax.legend(fontsize=7)
    for ax, key, name in ((axes[1], "kl", "KL to the reference (k3)"), (axes[2], "completions/mean_length",
                                                                        "completion length (tokens)")):
        pts = series(log_history, key)
        if pts:
            ax.plot(*zip(*pts), marker=".")
        else:
            ax.text(0.5, 0.5, "not measured (beta = 0)" if key == "kl" else "no data", ha="center",
                    transform=ax.transAxes)
        ax.set_title(name)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def held_out(loaded, root: Path, records: list, spec: RewardSpec, max_new_tokens: int,
             frame: Frame | str) -> dict[str, Any]:
    """Greedy answers on held-out records, scored: the mean of every component and of ``overall``."""
    if not records:
        return {"overall": float("nan")}
    loaded.model.eval()
    frame = loaded.frame(frame)
    outs = generate_on(loaded, root, records, max_new_tokens, frame=frame)
    scores = [spec.score_record(o, r, frame) for o, r in zip(outs, records)]
    keys = {k for s in scores for k in s}
    means = {}
    for k in sorted(keys):
        vals = [s[k] for s in scores if s.get(k) is not None]
        means[k] = sum(vals) / len(vals) if vals else None
    return means


def _trained(loaded, final: Path, cfg: GRPOConfig):
    """The trained policy, able to generate: the model in memory, or under DeepSpeed the saved folder loaded whole
    (ZeRO's partitioning switched off: training is over)."""
    if not cfg.deepspeed:
        return loaded
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from deepmedix.model.load import load

    unset_hf_deepspeed_config()
    return load(final, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)


# ------------------------------------------------------------------------------------------ the importance ratio

def ratio_logged(base: type) -> type:
    """``base`` (TRL's GRPOTrainer) logging the importance ratio pi / pi_old of the completion tokens each update
    sees: ``ratio/mean``, ``ratio/std``, ``ratio/min``, ``ratio/max`` (TRL logs the clipped fractions,
    ``clip_ratio/*``, not the ratio). With one update per generation batch (``steps_per_generation`` =
    ``gradient_accumulation_steps``, ``num_iterations`` 1) TRL computes no ``old_per_token_logps`` and the ratio
    is 1 exactly (trl/trainer/grpo_trainer.py ``_compute_loss``), so ``epsilon`` never bites; EasyR1's structure
    (several updates per rollout batch) moves it."""

    class RatioLogged(base):
        _ratio_inputs = None

        def _compute_loss(self, model, inputs):
            self._ratio_inputs = inputs  # the policy's log-probs are the next ones computed
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._ratio_inputs = None

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            inputs, self._ratio_inputs = self._ratio_inputs, None
            if inputs is not None:
                self._log_ratio(out[0].detach(), inputs)
            return out

        def _log_ratio(self, logps, inputs) -> None:
            import torch

            old = inputs.get("old_per_token_logps")
            ratio = (torch.exp(logps - old) if old is not None else torch.ones_like(logps))
            ratio = ratio[inputs["completion_mask"].bool()].float()
            # every rank gathers, each step (a collective): a rank with no completion token sends a neutral row
            stats = (torch.stack([ratio.sum(), ratio.new_tensor(ratio.numel()), (ratio * ratio).sum(), ratio.min(),
                                  ratio.max()]) if ratio.numel()
                     else ratio.new_tensor([0.0, 0.0, 0.0, float("inf"), float("-inf")]))
            s = self.accelerator.gather(stats[None]).reshape(-1, 5)
            n = s[:, 1].sum()
            if not n:
                return
            mean = s[:, 0].sum() / n
            m = self._metrics["train" if self.model.training else "eval"]
            m["ratio/mean"].append(mean.item())
            m["ratio/std"].append((s[:, 2].sum() / n - mean * mean).clamp(min=0).sqrt().item())
            m["ratio/min"].append(s[:, 3].min().item())
            m["ratio/max"].append(s[:, 4].max().item())

    RatioLogged.__name__ = f"RatioLogged{base.__name__}"
    return RatioLogged


# ------------------------------------------------------------------------------------------ the run

def train_grpo(cfg: GRPOConfig, data_uri: str, model_uri: str, out_uri: str, resume: bool = False) -> dict[str, Any]:
    import dataclasses
    import gc

    import torch
    from trl import GRPOTrainer

    from deepmedix.model.load import load

    t0 = time.time()
    if cfg.max_length:
        raise InputError("grpo: 'max_length' does not apply to GRPO; bound prompts with 'max_prompt_length' and "
                         "rollouts with 'max_completion_length'")
    if cfg.lora:
        raise InputError("grpo: lora is not supported for GRPO here; train the full model (optionally with "
                         "freeze_vision / freeze_merger)")
    ck.check(cfg)
    # ``auto``: the starting model's recorded frame, resolved once (the run id and the lineage name it)
    cfg = dataclasses.replace(cfg, frame=resolve_frame(cfg.frame, store.fetch(model_uri)))
    spec = RewardSpec.from_config(cfg)
    vllm = use_vllm(cfg)
    if cfg.deepspeed:
        ck.ensure_process_group_env()
    rank, _ = ck.world()
    root, train = load_split(data_uri, "train", cfg.tasks, cfg.task_ratios, cfg.max_records, cfg.seed)
    _, val = load_split(data_uri, "validate", cfg.tasks, None, cfg.eval_records, cfg.seed)
    if not train:
        raise InputError(f"{data_uri}: no train records for tasks {cfg.tasks}")
    # the run id covers the resolved reward (a composite file's weights and settings), not only its name
    ckpt_uri, run, work, start = ck.start_run("grpo", cfg, data_uri, model_uri, out_uri, resume,
                                              extra={"reward": dataclasses.asdict(spec)})
    rollouts = RolloutLog(work / ROLLOUTS, cfg.rollout_samples)
    funcs, reward_weights = trl_reward_functions(spec, on_scores=rollouts if rank == 0 else None)
    # The held-out "before" score: rank 0 generates with the starting model loaded plainly (GPU, bf16 where there
    # is one), before the trainer's arguments exist (under ZeRO-3 every later load is partitioned), then frees it.
    before = None
    if rank == 0:
        origin = load(model_uri, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        before = held_out(origin, root, val, spec, cfg.max_completion_length, cfg.frame)
        del origin
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    args = trl_args(cfg, work / "trainer", reward_weights, vllm)
    # The policy is loaded in fp32 on the CPU, as in SFT: the trainer moves it and trains under bf16 autocast with
    # fp32 master weights. A checkpoint's weights are loaded by from_pretrained (see sft.py); under DeepSpeed the
    # engine restores them. The KL reference stays the starting model: TRL builds it from name_or_path.
    init = start if start is not None and not cfg.deepspeed else model_uri
    loaded = load(init, device="cpu", dtype="float32", min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    loaded.model.config._name_or_path = str(store.fetch(model_uri))
    if rank == 0:
        rollouts.restore(start, int(start.name.split("-")[-1]) if start else 0)
    frame = loaded.frame(cfg.frame)  # each image's box frame for this processor: reference boxes, image sizes
    rows, skipped = make_rows(root, train, cfg, loaded.processor, frame)
    if skipped and rank == 0:
        print(f"grpo: skipped {len(skipped)} prompt(s) longer than max_prompt_length={cfg.max_prompt_length} tokens "
              f"(e.g. {', '.join(skipped[:3])})", flush=True)
    if not rows:
        raise InputError(f"{data_uri}: every train prompt is longer than max_prompt_length={cfg.max_prompt_length}")
    dataset = lazy_image_dataset(rows, frame)  # images decoded per batch, never all at once
    n_train = len(rows)
    del rows
    frozen = freeze_vision(loaded.model, cfg.freeze_vision, cfg.freeze_merger) \
        if cfg.freeze_vision or cfg.freeze_merger else 0
    loaded.model.train()
    callbacks = ([rollouts.callback(), ck.publisher(ckpt_uri, cfg.save_total_limit, "grpo", run, cfg.frame)]
                 if cfg.save_steps else None)
    trainer = ck.trainer_class(ratio_logged(GRPOTrainer), preloaded=start is not None and init is start)(
        model=loaded.model, reward_funcs=funcs, args=args, train_dataset=dataset,
        processing_class=loaded.processor, callbacks=callbacks)
    result = trainer.train(resume_from_checkpoint=str(start) if start else None)
    final = work / "final"
    ck.save_final(trainer, final)
    hist, steps, is_main = trainer.state.log_history, trainer.state.global_step, trainer.is_world_process_zero()
    if cfg.deepspeed:  # the engine, the reference and any vLLM engine go before a whole model is loaded to score
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    after = held_out(_trained(loaded, final, cfg), root, val, spec, cfg.max_completion_length, cfg.frame) \
        if rank == 0 else None
    learn = {f"train_{name}_{side}": v for name, key in (("reward", "reward"), ("iou", "rewards/grounded/iou"))
             if (w := windows(hist, key)) for side, v in zip(("first", "last"), w)}
    metrics = {
        "stage": "grpo", "metric": f"val_reward_{spec.name}", "before": (before or {}).get("overall"),
        "after": (after or {}).get("overall"), "before_components": before, "after_components": after, **learn,
        "train_loss": result.training_loss, "steps": steps, "n_train": n_train, "n_val": len(val),
        "skipped_too_long": len(skipped), "reward_weights": dict(spec.weights), "vllm": vllm,
        "frozen_vision_params": frozen, "resumed_from": str(start) if start else None, "wall_s": time.time() - t0,
    }

    def extras(out: Path) -> None:
        write_curves(hist, spec, out / "reward_curves.png", f"grpo: {spec.name}")
        if rollouts.path.is_file():
            shutil.copy2(rollouts.path, out / ROLLOUTS)

    ck.publish_model(is_main, hist, loaded.processor, work, out_uri, "grpo", cfg, metrics,
                     {"data": data_uri, "model": model_uri}, extras)
    return metrics
