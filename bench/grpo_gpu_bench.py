"""One GRPO step of a Qwen2.5-VL-7B-shaped model on one GPU, its time split into rollout / reward / update.

What runs: TRL's ``GRPOTrainer`` with the arguments of the real stage (``deepmedix.train.grpo.trl_args`` over
``configs/grpo/7b.yaml``: 5 rollouts per prompt at temperature 1.0 / top_p 0.99, beta 0.01 (a KL reference model),
epsilon 0.2 / 0.3, loss ``dapo``, the ``paper`` reward through ``trl_reward_functions``), overridden only where
one GPU needs it: no DeepSpeed, one prompt x 5 rollouts per step (``per_device_train_batch_size`` = 5, no gradient
accumulation), ``max_steps`` = ``--warmup`` + ``--steps``, ``max_completion_length`` = ``--completion-len``
(default 512; the 7B config's 2048 with ``--completion-len 2048``), gradient checkpointing on, nothing saved.
``--set KEY=VALUE`` overrides any other key of the GRPO config (e.g. ``--set beta=0``).

The model is ``sft_gpu_bench``'s random-weight Qwen2.5-VL-7B (8.3 B parameters, bf16, built on the GPU); the KL
reference is built by TRL from the folder the random model is saved to (``<out>/model``), as in the real stage.
The processor is the project's locally built one (``deepmedix.model.tiny``: a small byte-level BPE
tokenizer with the Qwen special tokens and chat template, image-only Qwen2.5-VL processor) at the paper's image
budget min_pixels = max_pixels = 512*512 (a 512x512 image -> 532x532 -> grid (1, 38, 38) -> 361 image tokens); the
model config takes that tokenizer's special token ids, its 152064-row vocabulary stays (ids past the tokenizer's
few hundred tokens decode to nothing). Prompts are phantom chest X-rays (``deepmedix.data.phantom``), 512x512, a new
one each step, with a grounding question ("left pleural effusion") in the chat shape of ``grpo.make_rows`` and its
``answer``/``ref_boxes_frame``/``task``.

How the time is split: a subclass of ``GRPOTrainer`` wraps its own phases with ``torch.cuda.synchronize()`` on both
sides (TRL's ``profiling/Time taken`` timings are only sent to wandb/mlflow/trackio, never to the log history, and
do not synchronise), and a callback times the optimizer step from ``on_step_begin`` to ``on_step_end``:

* rollout: ``_generate`` (chat template and image processing, ``generate`` or vLLM, decoding);
* ref-logp: the no-grad forwards of the scoring (``_get_per_token_logps_and_entropies`` without grad: the KL
  reference's log-probs; with vLLM also the old policy's, for importance sampling);
* reward: ``_calculate_rewards`` (every reward function);
* update: from the end of ``_prepare_inputs`` to ``on_step_end``: the loss forward and backward, gradient
  clipping, ``optimizer.step()``, the scheduler and ``zero_grad``;
* other: total minus the four (padding, advantages, metric bookkeeping between the phases).

With random weights the model almost never samples EOS, so every completion runs to ``--completion-len``: the
worst case. Generation tokens/s = generated tokens / rollout time. Memory: params + grads + AdamW states (bf16, as
in ``sft_gpu_bench``) + the reference = 10 bytes/param = 77 GiB, over an 80 GB card with activations: ``--optim
auto`` (default) takes TRL's default fused AdamW where that fits with 8 GiB to spare (H200) and Adafactor
(factored states, ~6 bytes/param) where it does not (H100); the optimizer step is a small part of the update.

Commands::

    make bench-grpo-gpu                                   # 1 warm-up + 2 measured steps, 512-token completions
    python bench/grpo_gpu_bench.py --completion-len 2048  # the paper's completion length
    python bench/grpo_gpu_bench.py --tiny                 # tiny model, fp32 on CPU (the smoke test), seconds

Prints a table and writes ``grpo_gpu_bench.json`` and ``grpo_gpu_bench.png`` (stacked phases per step) under
``--out``. Exit codes: 0 success, 2 no CUDA (without ``--tiny``), 3 out of GPU memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft_gpu_bench as sft  # noqa: E402  (sets the CUDA allocator and tokenizer environment on import)

REPO = sft.REPO
PAPER_PIXELS = 512 * 512
TINY_PIXELS = 56 * 56
PHASES = ("rollout", "logps", "reward", "update")
LABELS = {"rollout": "rollout", "logps": "ref-logp", "reward": "reward", "update": "update", "other": "other"}
HEADROOM_GIB = 8.0  # activations, KV cache and workspace beside the resident weights and optimizer states
RANDOM_NOTE = ("random weights: the model almost never samples EOS, so completions run to max_completion_length "
               "(the worst case); rewards score noise")
# Every prompt asks for the same finding, so that every step scores the same way: a three-word answer, which the
# paper reward compares by BLEU + ROUGE (its costliest path; their lazy imports fall in the warm-up step).
FINDING = "left pleural effusion"
SPECIAL = dict(bos="<|endoftext|>", im_start="<|im_start|>", im_end="<|im_end|>", vision_start="<|vision_start|>",
               vision_end="<|vision_end|>", image="<|image_pad|>", video="<|video_pad|>")


# ------------------------------------------------------------------------------------------- inputs

def build_processor(texts: list[str], pixels: int, vocab_size: int = 1000):
    """The project's locally built Qwen2.5-VL processor (tokenizer trained on ``texts``), image budget ``pixels``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from deepmedix.model.processor import CHAT_TEMPLATE, ImageOnlyQwen2_5_VLProcessor
    from deepmedix.model.tiny import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels})
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=CHAT_TEMPLATE)


def shape_for(shape: dict, tokenizer) -> dict:
    """``shape`` with the special token ids of ``tokenizer`` (its vocabulary must fit the model's)."""
    if len(tokenizer) > shape["text"]["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model only {shape['text']['vocab_size']}")
    ids = {k: tokenizer.convert_tokens_to_ids(tok) for k, tok in SPECIAL.items()}
    text = dict(shape["text"], bos_token_id=ids["bos"], eos_token_id=ids["im_end"])
    return {"text": text, "vision": shape["vision"], "ids": ids}


def make_rows(n: int, image_size: int, frame, seed: int) -> list[dict[str, Any]]:
    """``n`` grounding prompts for ``FINDING``, one phantom radiograph each, in the shape of
    ``deepmedix.train.grpo.make_rows``."""
    import numpy as np

    from deepmedix.data.phantom_render import render_study
    from deepmedix.data.prompts import grounding_prompt
    from deepmedix.data.records import open_image
    from deepmedix.grounding import user_message

    rows = []
    for i in range(n):
        img, boxes = render_study(np.random.default_rng(seed + i), [FINDING], size=image_size)
        rows.append({"prompt": [user_message(grounding_prompt(FINDING), 1)], "image": open_image(img, frame),
                     "answer": FINDING, "ref_boxes_frame": [frame.to_frame(b.box, image_size, image_size)
                                                           for b in boxes], "task": "grounding"})
    return rows


def choose_optim(requested: str, device_mem: int | None, n_params: int, beta: float, vllm_share: float) -> str:
    """``auto``: fused AdamW (TRL's default) where params + grads + AdamW states + the KL reference (bf16) leave
    ``HEADROOM_GIB`` of ``device_mem`` bytes free (less vLLM's share), else Adafactor; on CPU (``None``) AdamW."""
    if requested != "auto":
        return requested
    if device_mem is None:
        return "adamw_torch_fused"
    bytes_per_param = 2 + 2 + 4 + (2 if beta else 0)
    usable = device_mem * (1 - vllm_share) / 2**30
    return "adamw_torch_fused" if n_params * bytes_per_param / 2**30 + HEADROOM_GIB <= usable else "adafactor"


# ------------------------------------------------------------------------------------------- timing

class PhaseTimer:
    """Wall time of each optimizer step and of its phases, with the device synchronised at every mark."""

    def __init__(self, device):
        self.device = device
        self.steps: list[dict[str, Any]] = []
        self.cur: dict[str, Any] = {}

    def now(self) -> float:
        sft._sync(self.device)
        return time.perf_counter()

    @contextmanager
    def span(self, phase: str) -> Iterator[None]:
        t0 = self.now()
        try:
            yield
        finally:
            self.cur[phase] = self.cur.get(phase, 0.0) + self.now() - t0

    def begin(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.cur = {p: 0.0 for p in PHASES}
        self.cur.update(generated_tokens=0, prompt_tokens=0, completions=0, full_length=0)
        self.cur["t_begin"] = self.now()

    def inputs_ready(self) -> None:
        self.cur["t_update"] = self.now()

    def end(self) -> None:
        import torch

        t = self.now()
        cur = self.cur
        cur["update"] = t - cur.pop("t_update")
        cur["total"] = t - cur.pop("t_begin")
        cur["other"] = cur["total"] - sum(cur[p] for p in PHASES)
        cur["gen_tokens_per_s"] = cur["generated_tokens"] / cur["rollout"] if cur["rollout"] > 0 else None
        cur["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30 \
            if self.device.type == "cuda" else None
        cur["peak_rss_gib"] = sft.rss_gib()
        self.steps.append(cur)


def timed_trainer(timer: PhaseTimer, completion_len: int):
    """``GRPOTrainer`` with its rollout, scoring forwards, rewards and the start of the update timed by ``timer``,
    and the callback that times whole optimizer steps."""
    import torch
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate(self, prompts: list):
            with timer.span("rollout"):
                out = super()._generate(prompts)
            prompt_ids, completion_ids = out[0], out[1]
            timer.cur["prompt_tokens"] += sum(len(p) for p in prompt_ids)
            timer.cur["generated_tokens"] += sum(len(c) for c in completion_ids)
            timer.cur["completions"] += len(completion_ids)
            timer.cur["full_length"] += sum(len(c) >= completion_len for c in completion_ids)
            return out

        def _calculate_rewards(self, *args, **kwargs):
            with timer.span("reward"):
                return super()._calculate_rewards(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, *args, **kwargs):
            if torch.is_grad_enabled():  # the loss's own forward: part of the update
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)
            with timer.span("logps"):
                return super()._get_per_token_logps_and_entropies(*args, **kwargs)

        def _prepare_inputs(self, generation_batch):
            out = super()._prepare_inputs(generation_batch)
            timer.inputs_ready()
            return out

    class StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            timer.begin()
            return control

        def on_step_end(self, args, state, control, **kw):
            timer.end()
            return control

    return TimedGRPOTrainer, StepTimes()


# ------------------------------------------------------------------------------------------- run

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape (smoke test): fp32 on CPU, bf16 where CUDA is")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "grpo_gpu"))
    ap.add_argument("--completion-len", type=int, default=None, help="max_completion_length (default 512; tiny 16)")
    ap.add_argument("--image-size", type=int, default=None, help="square phantom image side, px (default 512; tiny 64)")
    ap.add_argument("--pixels", type=int, default=None, help="processor min_pixels = max_pixels (default 512*512; "
                    "tiny 56*56)")
    ap.add_argument("--steps", type=int, default=2, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not counted")
    ap.add_argument("--optim", default="auto", help="auto, or a transformers optimizer name (adamw_torch_fused, "
                    "adafactor, ...)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a GRPO config key")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("grpo_gpu_bench: needs a CUDA GPU for the 7B shape (use --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where trl_args puts the trainer
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    completion_len = args.completion_len or (16 if args.tiny else 512)
    image_size = args.image_size or (64 if args.tiny else 512)
    pixels = args.pixels or (TINY_PIXELS if args.tiny else PAPER_PIXELS)

    from datasets import Dataset

    from deepmedix.config import load_config
    from deepmedix.rewards.spec import RewardSpec
    from deepmedix.train.common import freeze_vision
    from deepmedix.train.grpo import trl_args, use_vllm
    from deepmedix.train.grpo_rewards import trl_reward_functions

    cfg = load_config("grpo", "7b", args.set)
    cfg.deepspeed = ""
    cfg.per_device_train_batch_size = cfg.num_generations  # one prompt x num_generations rollouts per step
    cfg.gradient_accumulation_steps = 1
    cfg.steps_per_generation = 0  # one update per generation: the step timed is one rollout + one update
    cfg.dataloader_workers = 0  # the bench's prompts are in memory already
    cfg.max_steps = args.warmup + args.steps
    cfg.max_completion_length = completion_len
    cfg.gradient_checkpointing = True
    cfg.save_steps = 0
    cfg.logging_steps = 1
    cfg.seed = args.seed
    vllm = use_vllm(cfg)
    attn = args.attn
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not (device.type == "cuda" and is_flash_attn_2_available()):
            print("  note: flash_attention_2 is not available here; using sdpa", flush=True)
            attn = "sdpa"

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from deepmedix.grounding import Frame

    # the bench's processor is built with factor 28 and this pixel budget (build_processor below)
    rows = make_rows(max(4, cfg.max_steps), image_size, Frame.parse(cfg.frame, 28, pixels, pixels), args.seed)
    processor = build_processor([r["prompt"][0]["content"][-1]["text"] for r in rows] + [r["answer"] for r in rows],
                                pixels)
    shape = shape_for(sft.TINY if args.tiny else sft.QWEN25_VL_7B, processor.tokenizer)
    vis = shape["vision"]
    grid = sft.image_grid(image_size, image_size, vis["patch_size"], vis["spatial_merge_size"], pixels, pixels)
    n_img_tok = grid[0] * grid[1] * grid[2] // vis["spatial_merge_size"] ** 2

    torch.manual_seed(args.seed)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"building {'tiny' if args.tiny else 'Qwen2.5-VL-7B'}-shaped model on {dev_name} ({dtype}, attn {attn}) ...",
          flush=True)
    t0 = time.perf_counter()
    model = sft.build_model(shape, device, dtype, attn, grad_ckpt=False, freeze_vision=False)
    ids = shape["ids"]
    model.generation_config.eos_token_id = [ids["im_end"], ids["bos"]]  # as Qwen2.5-VL-Instruct's generation config
    frozen = freeze_vision(model, cfg.freeze_vision, cfg.freeze_merger) if cfg.freeze_vision or cfg.freeze_merger \
        else 0
    pc = sft.param_counts(model)
    build_s = time.perf_counter() - t0
    device_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    optim = choose_optim(args.optim, device_mem, pc["total"], cfg.beta, cfg.vllm_gpu_memory_utilization if vllm else 0)
    print(f"  {pc['total']:,} parameters, built in {build_s:.1f} s; image {image_size}x{image_size} -> grid "
          f"{grid} -> {n_img_tok} image tokens; {cfg.num_generations} rollouts x {completion_len} tokens; optimizer "
          f"{optim}; {'vLLM' if vllm else 'HF generate'}", flush=True)

    funcs, weights = trl_reward_functions(RewardSpec.from_config(cfg))
    targs = trl_args(cfg, out / "trainer", weights, vllm)
    from transformers.training_args import OptimizerNames

    targs.optim = OptimizerNames(optim)
    # The random model is saved as a model folder, as the real stage's starting model is one: TRL builds the KL
    # reference from it (and a colocated vLLM loads its weights from it).
    folder = out / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    model.config._name_or_path = str(folder)
    if vllm:
        targs.vllm_max_model_length = cfg.max_prompt_length + completion_len
    timer = PhaseTimer(device)
    trainer_cls, step_times = timed_trainer(timer, completion_len)
    trainer = trainer_cls(model=model, reward_funcs=funcs, args=targs, train_dataset=Dataset.from_list(rows),
                          processing_class=processor, callbacks=[step_times])

    res: dict[str, Any] = {
        "device": dev_name, "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
        "shape": "tiny" if args.tiny else "qwen2.5-vl-7b", "params": pc, "frozen_vision_params": frozen,
        "build_s": build_s, "attn": attn, "optim": optim, "vllm": vllm, "grad_ckpt": True,
        "num_generations": cfg.num_generations, "max_completion_length": completion_len,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "beta": cfg.beta, "loss_type": cfg.loss_type,
        "reward": cfg.reward, "image_size": image_size, "min_pixels": pixels, "max_pixels": pixels,
        "image_grid_thw": list(grid), "image_tokens": n_img_tok, "tokenizer_size": len(processor.tokenizer),
        "warmup": args.warmup, "steps": args.steps, "note": RANDOM_NOTE, "torch": torch.__version__,
    }
    import transformers
    import trl

    res.update(transformers=transformers.__version__, trl=trl.__version__)
    if device_mem is not None:
        res["device_mem_gib"] = device_mem / 2**30
    print(f"running {args.warmup} warm-up + {args.steps} measured GRPO steps ...", flush=True)
    oom = False
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        oom = True  # report outside the handler: the traceback holds the step's tensors
    logs = {h["step"]: h for h in trainer.state.log_history if "step" in h and "reward" in h}
    for i, s in enumerate(timer.steps):
        s.update(step=i + 1, warmup=i < args.warmup, reward_mean=logs.get(i + 1, {}).get("reward"),
                 kl=logs.get(i + 1, {}).get("kl"))
    res["step_times"] = timer.steps
    measured = [s for s in timer.steps if not s["warmup"]]
    if oom or len(measured) < args.steps:
        res["oom"] = True
        (out / "grpo_gpu_bench.json").write_text(json.dumps(res, indent=2) + "\n")
        print(f"out of GPU memory after {len(timer.steps)} step(s); try a smaller --completion-len, --optim adafactor "
              f"or --set beta=0 (no reference model)", file=sys.stderr)
        return 3
    keys = (*PHASES, "other", "total", "generated_tokens", "gen_tokens_per_s")
    res["mean"] = {k: sum(s[k] for s in measured) / len(measured) for k in keys}
    res["oom"] = False

    print()
    print(f"GRPO step: {res['shape']} on {dev_name}, {res['dtype']}, {cfg.num_generations} rollouts x <= "
          f"{completion_len} tokens, {'vLLM' if vllm else 'HF generate'}, optimizer {optim}, beta {cfg.beta}")
    head = "".join(f"{LABELS[k] + ' s':>12}" for k in (*PHASES, "other")) + f"{'total s':>10}"
    print(f"  {'step':>6}{head}{'gen tok':>9}{'gen tok/s':>11}{'peak GiB':>10}{'RSS GiB':>9}")
    for s in timer.steps:
        name = f"w{s['step']}" if s["warmup"] else str(s["step"])
        mem = f"{s['peak_mem_gib']:10.1f}" if s["peak_mem_gib"] is not None else f"{'-':>10}"
        print(f"  {name:>6}" + "".join(f"{s[k]:12.3f}" for k in (*PHASES, "other")) + f"{s['total']:10.3f}"
              f"{s['generated_tokens']:9d}{s['gen_tokens_per_s']:11.1f}{mem}{s['peak_rss_gib']:9.2f}")
    m = res["mean"]
    print(f"  {'mean':>6}" + "".join(f"{m[k]:12.3f}" for k in (*PHASES, "other")) + f"{m['total']:10.3f}"
          f"{m['generated_tokens']:9.0f}{m['gen_tokens_per_s']:11.1f}")
    full = sum(s["full_length"] for s in measured)
    print(f"  {full} of {sum(s['completions'] for s in measured)} measured completions ran to {completion_len} tokens; "
          f"{RANDOM_NOTE}")
    (out / "grpo_gpu_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    _plot(res, out / "grpo_gpu_bench.png")
    print(f"  wrote {out / 'grpo_gpu_bench.json'} and {out / 'grpo_gpu_bench.png'}")
    return 0


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = res["step_times"]
    labels = [f"warm-up {s['step']}" if s["warmup"] else f"step {s['step']}" for s in steps]
    colors = {"rollout": "#2a7", "logps": "#8c5", "reward": "#e94", "update": "#37c", "other": "#bbb"}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bottom = [0.0] * len(steps)
    for k in (*PHASES, "other"):
        vals = [max(s[k], 0.0) for s in steps]
        ax.bar(labels, vals, bottom=bottom, color=colors[k], label=LABELS[k])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds")
    ax.set_title(f"{res['shape']} GRPO step on {res['device']}: {res['num_generations']} rollouts x <= "
                 f"{res['max_completion_length']} tokens, mean {res['mean']['total']:.2f} s", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
