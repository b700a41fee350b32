"""Per-GPU memory of each training stage at a config's settings, before any GPU is asked for: the model's real
parameter counts (built on the meta device), the DeepSpeed ZeRO stage of the config's JSON, the micro-batch and
sequence length, the frozen parts, the GRPO reference model and rollout engine. ``deepmedix rehearse`` prints it.

The terms, in bytes, for ``P`` parameters of which ``T`` train, on ``W`` GPUs (ZeRO: Rajbhandari et al. 2020, §3;
bf16 weights and gradients, AdamW keeping an fp32 master copy and two fp32 moments):

* weights ``2P`` (``/W`` under ZeRO-3), plus under ZeRO-3 the parameters gathered for the layers being computed
  (``stage3_max_live_parameters``, in bf16);
* gradients ``2T`` (``/W`` from ZeRO-2); optimizer ``12T`` (``/W`` from ZeRO-1);
* activations per sample of ``L`` tokens: with gradient checkpointing, each decoder layer's input (``2·L·h``) kept
  for the backward pass and one layer's full set while it is recomputed (``2·L·(5h + 4i + 2·kv)``: norms,
  projections, attention output, the SwiGLU's gate/up/product); without it, every layer's full set; plus the
  logits of the tokens scored (``L·V·10``: bf16 logits, their fp32 log-softmax and its gradient) — the largest
  single term at Qwen's 152K vocabulary;
* GRPO: the frozen reference model (``2P``, ``/W`` under ZeRO-3) when ``beta > 0``, and the rollouts — with vLLM
  in TRL's colocate mode the engine takes ``vllm_gpu_memory_utilization`` of the GPU whatever the batch, with
  ``generate`` the KV cache (``2·layers·kv·L·2`` bytes per sequence);
* a fixed allowance for the CUDA context, NCCL buffers and the allocator's fragmentation (:data:`RUNTIME_GB`).

It is a plan, not a measurement: it says which settings cannot fit, and which term to move.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepmedix.config import CONFIG_DIR, GRPOConfig, TrainConfig

GB = 1024 ** 3
GPU_GB = 80.0        # an H100 / A100 80GB
RUNTIME_GB = 4.0     # CUDA context, NCCL buffers, allocator fragmentation
RSS_RATIO_MAX = 1.15  # the data path's peak memory over 10x the records, at most this much more


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a model: parameter counts and the language model's dimensions."""
    params: int
    vision_tower: int   # patch embedding and blocks
    merger: int
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int         # key/value heads x head dim
    vocab: int

    @classmethod
    def of(cls, model) -> "Shape":
        text = model.config.text_config
        visual = dict(model.model.visual.named_parameters())
        return cls(params=sum(p.numel() for p in model.parameters()),
                   vision_tower=sum(p.numel() for n, p in visual.items() if not n.startswith("merger.")),
                   merger=sum(p.numel() for n, p in visual.items() if n.startswith("merger.")),
                   hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                   kv_dim=text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
                   vocab=text.vocab_size)


def zero_stage(deepspeed: str) -> tuple[int, int]:
    """(ZeRO stage, parameters live at a time under ZeRO-3) of a DeepSpeed JSON (0 without one)."""
    if not deepspeed:
        return 0, 0
    path = Path(deepspeed) if Path(deepspeed).is_absolute() else CONFIG_DIR.parent / deepspeed
    zero = json.loads(path.read_text()).get("zero_optimization", {})
    return int(zero.get("stage", 0)), int(zero.get("stage3_max_live_parameters", 1_000_000_000))


def plan_stage(cfg: TrainConfig, shape: Shape, gpus: int) -> dict[str, Any]:
    """GB per GPU by term, their total, and whether it fits :data:`GPU_GB`, for one training stage on ``gpus``
    GPUs in all."""
    stage, live = zero_stage(cfg.deepspeed)
    p = shape.params
    frozen = (shape.vision_tower if cfg.freeze_vision else 0) + (shape.merger if cfg.freeze_merger else 0)
    t = p - frozen
    part = lambda n, from_stage: n / gpus if stage >= from_stage else n  # noqa: E731
    grpo = isinstance(cfg, GRPOConfig)
    seq = cfg.max_prompt_length + cfg.max_completion_length if grpo else cfg.max_length
    scored = cfg.max_completion_length if grpo else seq  # TRL's GRPO keeps only the completion's logits
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    layer = 2 * seq * (5 * h + 4 * i + 2 * kv)
    per_sample = (shape.layers * 2 * seq * h + layer if cfg.gradient_checkpointing else shape.layers * layer)
    per_sample += scored * shape.vocab * 10
    terms = {
        "weights": part(2 * p, 3) + (2 * min(live, p) if stage == 3 else 0),
        "gradients": part(2 * t, 2),
        "optimizer": part(12 * t, 1),
        "activations": per_sample * cfg.per_device_train_batch_size,
    }
    if grpo:
        terms["reference"] = part(2 * p, 3) if cfg.beta > 0 else 0
        vllm = cfg.use_vllm in ("auto", "true")  # on a GPU machine with vLLM installed, "auto" is vLLM
        terms["rollouts"] = (cfg.vllm_gpu_memory_utilization * GPU_GB * GB if vllm
                             else 2 * shape.layers * kv * seq * 2 * cfg.per_device_train_batch_size)
    out = {k: round(v / GB, 2) for k, v in terms.items()}
    out["runtime"] = RUNTIME_GB
    out["total"] = round(sum(out.values()), 2)
    out.update(fits=out["total"] <= GPU_GB, zero=stage, gpus=gpus, micro_batch=cfg.per_device_train_batch_size,
               seq_len=seq, trainable_b=round(t / 1e9, 3))
    return out


def plan(configs: dict[str, Any], shape: Shape, gpus: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The plan of every training stage (sft, coldstart, grpo) of a size's configs; ``gpus``: stage -> GPUs."""
    return {stage: plan_stage(configs[stage], shape, gpus[stage]) for stage in ("sft", "coldstart", "grpo")}
