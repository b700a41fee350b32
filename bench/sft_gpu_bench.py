"""SFT throughput and MFU of a Qwen2.5-VL-7B-shaped model on one GPU (issue 4).

The model is ``Qwen2_5_VLForConditionalGeneration`` built from the published Qwen2.5-VL-7B-Instruct config with
random weights, directly on the GPU in bf16 (no checkpoint download). Training is full fine-tuning as in the paper
(``--freeze-vision`` keeps the vision tower fixed, like ``freeze_vision`` in the SFT config), AdamW (fused on CUDA),
gradient checkpointing on by default (``--no-grad-ckpt``), attention ``sdpa`` (``--attn flash_attention_2`` where
flash-attn is installed). The optimizer keeps its states in the parameters' dtype (bf16), with no fp32 master
copy: 16 bytes/param mixed precision (~133 GB for the 8.3 B params) does not fit one 80 GB card.

Inputs are synthetic but shaped like a real SFT batch of ``deepmedix.train.sft`` (TRL's collator over the
Qwen2.5-VL processor): one ``--image-size`` square image per sample (512: the model frame), resized by the
processor's ``smart_resize`` (factor 28; the stock 7B pixel budget gives 512x512 -> 504x504 -> grid (1, 36, 36) ->
1296 patches -> 324 image tokens after the 2x2 merge), ``pixel_values`` of shape (patches, 3*2*14*14),
``image_grid_thw``, ``input_ids`` laid out as the chat template does (system turn, user turn with
``<|vision_start|>`` + image pads + ``<|vision_end|>`` + prompt text, assistant turn) filled with completion tokens
to ``--seq-len``, ``mm_token_type_ids`` (1 on image pads) and ``labels`` = ``input_ids`` with everything up to the
assistant's answer set to -100. The processor itself is not used (no torchvision on CPU, maybe none on the GPU box).

Batch search: batch sizes 1, 2, 4, 8, ... (``--max-batch``) are each run for a few probe steps until one raises
``torch.OutOfMemoryError`` (``--refine`` then bisects between the last fit and the first OOM); the largest batch
that fits is then measured: ``--warmup`` steps, then ``--steps`` steps timed with ``torch.cuda.synchronize()``.
A step is forward + backward + ``optimizer.step()`` + ``zero_grad``.

FLOPs per step (B samples, S tokens each, T = B*S language-model tokens including the image tokens; P = patches
in the batch):

    model FLOPs  = 6 * N_lm * T + 12 * L * d * S * T                      (language model)
                 + 6 * N_vis * P + 12 * d_v * sum_blocks sum_windows l^2   (vision tower)

* ``N_lm``: language-model parameters that do a matmul per token = the decoder layers + ``lm_head`` (the input
  embedding is a lookup and is left out); ``L`` layers, ``d`` = heads * head_dim (attention width).
  ``12 * L * d * S`` per token is the attention score/value term (forward 2 matmuls of 2*S*d FLOPs per token,
  x3 for forward + backward), counted in full (no causal halving), as in PaLM's MFU.
* ``N_vis``: vision parameters per patch = patch embedding + the 32 blocks + the patch merger / 4 (the merger runs
  once per 2x2 merged token); ``d_v`` the vision width; ``l`` the length of each attention span of each block:
  the whole image (1296 patches) in the 4 full-attention blocks, the 112-px windows (8x8 patches, smaller at the
  edge) in the others.
* ``--freeze-vision``: the vision tower runs forward only, so its factors are 2 and 4 instead of 6 and 12.
* Hardware FLOPs (HFU) with gradient checkpointing add one recomputed forward of the checkpointed layers
  (2 * N_layers * T + 4 * L * d * S * T for the decoder layers, likewise for the vision blocks when they train),
  i.e. about 8*N instead of 6*N.

MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s; HFU likewise with hardware FLOPs. Peak:
H100 SXM 989, H100 NVL 835, H100 PCIe 756, H200 / GH200 989, A100 312 TFLOP/s (``--peak-tflops`` overrides; on
CPU MFU is n/a unless it is given). Goal (issue 4): MFU >= 45 %.

Prints a table and writes ``sft_gpu_bench.json`` and ``sft_gpu_bench.png`` (throughput by batch size tried) under
``--out``. ``--tiny`` runs a tiny model of the same classes (fp32 on CPU, seconds) for the smoke test. Exit codes:
0 success, 2 no CUDA (without ``--tiny``), 3 not even batch size 1 fits.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from deepmedix import grounding  # noqa: E402
from deepmedix.model.shapes import QWEN25_VL_7B  # noqa: E402
from deepmedix.model.shapes import qwen_config as build_config  # noqa: E402

MFU_GOAL = 0.45

# Same classes, tiny sizes (head_dim 16 -> mrope sections sum to 8); special ids at the top of a small vocabulary.
TINY = {
    "text": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-6,
                 use_sliding_window=False, max_window_layers=2,
                 rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": [2, 3, 3],
                                  "rope_theta": 1000000.0},
                 bos_token_id=1000, eos_token_id=1002, tie_word_embeddings=False),
    "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, hidden_act="silu",
                   patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=64,
                   fullatt_block_indexes=[1], tokens_per_second=2),
    "ids": dict(bos=1000, im_start=1001, im_end=1002, vision_start=1003, vision_end=1004, image=1005, video=1006,
                text_max=1000),
}
# The stock Qwen2.5-VL-7B-Instruct image processor budget (the SFT stage uses the model folder's own budget).
STOCK_MIN_PIXELS = 56 * 56
STOCK_MAX_PIXELS = 28 * 28 * 16384
PEAK_TFLOPS = [  # (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s); first match wins
    ("H100 PCIE", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
    ("A100", 312.0), ("A800", 312.0),
]


# ------------------------------------------------------------------------------------------- shapes

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = STOCK_MIN_PIXELS,
                 max_pixels: int = STOCK_MAX_PIXELS) -> tuple[int, int]:
    """The Qwen2-VL image processor's resize rule (:func:`deepmedix.grounding.smart_resize`, no processor or
    torchvision needed) with the stock 7B pixel budget by default."""
    return grounding.smart_resize(height, width, factor, min_pixels, max_pixels)


def image_grid(height: int, width: int, patch: int = 14, merge: int = 2, min_pixels: int = STOCK_MIN_PIXELS,
               max_pixels: int = STOCK_MAX_PIXELS) -> tuple[int, int, int]:
    """``image_grid_thw`` of one still image: (1, rows, cols) of patches after ``smart_resize``."""
    h, w = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    return 1, h // patch, w // patch


def image_tokens(height: int, width: int, patch: int = 14, merge: int = 2, min_pixels: int = STOCK_MIN_PIXELS,
                 max_pixels: int = STOCK_MAX_PIXELS) -> int:
    """``<|image_pad|>`` tokens of one image = patches / merge**2 (512x512 -> 324 at the stock budget)."""
    t, gh, gw = image_grid(height, width, patch, merge, min_pixels, max_pixels)
    return t * gh * gw // (merge * merge)


def window_lengths(grid_h: int, grid_w: int, merge: int = 2, window_size: int = 112, patch: int = 14) -> list[int]:
    """Patches in each attention window of a windowed vision block (as ``get_vision_window_index`` cuts them:
    windows of ``window_size // merge // patch`` merged tokens a side, the last row/column shorter)."""
    ws = window_size // merge // patch
    mh, mw = grid_h // merge, grid_w // merge
    rows = [min(ws, mh - i) for i in range(0, mh, ws)]
    cols = [min(ws, mw - j) for j in range(0, mw, ws)]
    return [r * c * merge * merge for r in rows for c in cols]


# ------------------------------------------------------------------------------------------- FLOPs

def lm_flops(n_params: int, n_layers: int, attn_dim: int, seq_len: int, batch: int, mult: int = 6) -> float:
    """``mult * N * T + 2 * mult * L * d * S * T`` with T = batch * seq_len: mult 6 = forward + backward
    (6NT + 12LdST), 2 = one forward (2NT + 4LdST)."""
    tokens = batch * seq_len
    return float(mult * n_params * tokens + 2 * mult * n_layers * attn_dim * seq_len * tokens)


def vision_flops(n_params_per_patch: float, n_patches: int, width: int, sum_sq_spans: int, mult: int = 6) -> float:
    """``mult * N_vis * P + 2 * mult * d_v * sum(l^2)`` (sum over blocks and attention spans of the batch)."""
    return float(mult * n_params_per_patch * n_patches + 2 * mult * width * sum_sq_spans)


def vision_sum_sq_spans(grid: tuple[int, int, int], n_images: int, depth: int, full_blocks: list[int],
                        merge: int = 2, window_size: int = 112, patch: int = 14) -> int:
    """Sum over the vision blocks of sum(l^2) over their attention spans, for ``n_images`` images of ``grid``."""
    t, gh, gw = grid
    full = (t * gh * gw) ** 2
    win = t * sum(n * n for n in window_lengths(gh, gw, merge, window_size, patch))
    n_full = sum(1 for i in range(depth) if i in set(full_blocks))
    return n_images * (n_full * full + (depth - n_full) * win)


def param_counts(model) -> dict:
    """Parameter counts by part, from the built model (``model.model.visual`` / ``.language_model``)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    inner = model.model
    vis, lm = inner.visual, inner.language_model
    merge = vis.spatial_merge_size
    return {
        "total": count(model),
        "lm_layers": count(lm.layers),
        "lm_head": model.lm_head.weight.numel(),
        "embed_tokens": lm.embed_tokens.weight.numel(),
        "vision_blocks": count(vis.blocks),
        "vision_patch_embed": count(vis.patch_embed),
        "vision_merger": count(vis.merger),
        "vision_per_patch": count(vis.patch_embed) + count(vis.blocks) + count(vis.merger) / merge ** 2,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def step_flops(pc: dict, text_cfg, vis_cfg, batch: int, seq_len: int, grid: tuple[int, int, int],
               freeze_vision: bool, grad_ckpt: bool) -> dict:
    """Model and hardware FLOPs of one training step (see the module docstring)."""
    L = text_cfg.num_hidden_layers
    d = text_cfg.num_attention_heads * (text_cfg.hidden_size // text_cfg.num_attention_heads)
    n_lm = pc["lm_layers"] + pc["lm_head"]
    patches = batch * grid[0] * grid[1] * grid[2]
    spans = vision_sum_sq_spans(grid, batch, vis_cfg.depth, list(vis_cfg.fullatt_block_indexes),
                                vis_cfg.spatial_merge_size, vis_cfg.window_size, vis_cfg.patch_size)
    vmult = 2 if freeze_vision else 6
    lm = lm_flops(n_lm, L, d, seq_len, batch, 6)
    vis = vision_flops(pc["vision_per_patch"], patches, vis_cfg.hidden_size, spans, vmult)
    model = lm + vis
    recompute = 0.0
    if grad_ckpt:
        recompute += lm_flops(pc["lm_layers"], L, d, seq_len, batch, 2)
        if not freeze_vision:
            recompute += vision_flops(pc["vision_blocks"], patches, vis_cfg.hidden_size, spans, 2)
    return {"model": model, "hardware": model + recompute, "lm": lm, "vision": vis, "recompute": recompute,
            "lm_tokens": batch * seq_len, "patches": patches}


def peak_tflops_for(name: str) -> float | None:
    up = name.upper()
    for key, tf in PEAK_TFLOPS:
        if key in up:
            return tf
    return None


# ------------------------------------------------------------------------------------------- model and batch

def build_model(shape: dict, device, dtype, attn: str, grad_ckpt: bool, freeze_vision: bool):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = build_config(shape)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    model.to(device)
    model.config.use_cache = False
    if freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if grad_ckpt:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def sample_layout(seq_len: int, n_image: int, prompt_tokens: int) -> tuple[int, int]:
    """(tokens before the image, index where the answer starts) of one chat-formatted sample."""
    sys_part = 1 + 10 + 2  # <|im_start|> 'system\nYou are a helpful assistant.' (~10 tokens) <|im_end|> '\n'
    user_head = 1 + 2  # <|im_start|>user\n
    before_image = sys_part + user_head
    # vision_end, prompt, <|im_end|>\n, assistant\n
    answer_start = before_image + 1 + n_image + 1 + prompt_tokens + 2 + 3
    if answer_start + 2 > seq_len:
        raise ValueError(f"--seq-len {seq_len} is too short for {n_image} image tokens + {prompt_tokens} prompt "
                         f"tokens (need > {answer_start + 2})")
    return before_image, answer_start


def make_batch(batch: int, seq_len: int, grid: tuple[int, int, int], shape: dict, prompt_tokens: int, device,
               seed: int = 0) -> dict:
    """A synthetic batch shaped like the SFT collator's output (see the module docstring)."""
    import torch

    ids, vis = shape["ids"], shape["vision"]
    merge = vis["spatial_merge_size"]
    t, gh, gw = grid
    n_patches = t * gh * gw
    n_image = n_patches // (merge * merge)
    before, answer_start = sample_layout(seq_len, n_image, prompt_tokens)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, ids["text_max"], (batch, seq_len), generator=g)
    input_ids[:, 0] = ids["im_start"]
    input_ids[:, before - 5] = ids["im_end"]
    input_ids[:, before - 3] = ids["im_start"]
    input_ids[:, before] = ids["vision_start"]
    input_ids[:, before + 1:before + 1 + n_image] = ids["image"]
    input_ids[:, before + 1 + n_image] = ids["vision_end"]
    input_ids[:, answer_start - 5] = ids["im_end"]
    input_ids[:, answer_start - 3] = ids["im_start"]
    input_ids[:, -2] = ids["im_end"]
    labels = input_ids.clone()
    labels[:, :answer_start] = -100
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[:, before + 1:before + 1 + n_image] = 1
    per_patch = vis["in_channels"] * vis["temporal_patch_size"] * vis["patch_size"] ** 2
    pixel_values = torch.randn(batch * n_patches, per_patch, generator=g)
    return {
        "input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device), "mm_token_type_ids": mm.to(device), "pixel_values": pixel_values.to(device),
        "image_grid_thw": torch.tensor([list(grid)] * batch, dtype=torch.long).to(device),
    }


# ------------------------------------------------------------------------------------------- measurement

def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(model, opt, batch: dict, n: int, device) -> list[float]:
    """``n`` optimizer steps; the wall time of each (synchronised)."""
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"loss is {loss.item()}")
    return times


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def try_batch(model, opt, bs: int, args, grid, shape, device, n_warm: int, n_steps: int) -> dict:
    """Run ``n_warm`` + ``n_steps`` steps at batch ``bs``; ``{"oom": True}`` when it does not fit."""
    import torch

    oom = False
    out: dict = {"batch": bs}
    try:
        batch = make_batch(bs, args.seq_len, grid, shape, args.prompt_tokens, device, seed=bs)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train_steps(model, opt, batch, n_warm, device)
        times = train_steps(model, opt, batch, n_steps, device)
        out.update(step_s=sum(times) / len(times), times=times, oom=False)
        if device.type == "cuda":
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del batch
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError):
        oom = True  # clean up outside the handler: the traceback holds the step's tensors
    if oom:
        opt.zero_grad(set_to_none=True)
        batch = None  # noqa: F841 - drops the failed batch's tensors before _free() empties the CUDA cache
        out.update(oom=True)
    _free(device)
    return out


def search_batch(model, opt, args, grid, shape, device) -> tuple[int, list[dict]]:
    """Doubling search (1, 2, 4, ...) up to ``--max-batch``; optional bisection to the largest batch that fits."""
    tried: list[dict] = []

    def run(bs):
        r = try_batch(model, opt, bs, args, grid, shape, device, 1, args.probe_steps)
        tried.append(r)
        status = "OOM" if r["oom"] else f"{r['step_s']:.3f} s/step"
        print(f"  batch {bs:>4}: {status}", flush=True)
        return not r["oom"]

    best, first_oom, bs = 0, None, 1
    while bs <= args.max_batch:
        if not run(bs):
            first_oom = bs
            break
        best = bs
        bs *= 2
    if args.refine and best and first_oom:
        lo, hi = best, first_oom
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run(mid):
                lo = best = mid
            else:
                hi = mid
    return best, tried


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    ap.add_argument("--out", default=str(REPO / "runs" / "bench" / "sft_gpu"))
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 1024; tiny 64)")
    ap.add_argument("--image-size", type=int, default=None, help="square image side, px (default 512; tiny 64)")
    ap.add_argument("--min-pixels", type=int, default=STOCK_MIN_PIXELS)
    ap.add_argument("--max-pixels", type=int, default=STOCK_MAX_PIXELS)
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt text tokens after the image "
                    "(default 64; tiny 8)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--probe-steps", type=int, default=2, help="timed steps per batch size in the search")
    ap.add_argument("--max-batch", type=int, default=None, help="largest batch tried (default 64; tiny 4)")
    ap.add_argument("--batch", type=int, default=0, help="measure this batch size, no search")
    ap.add_argument("--refine", action="store_true", help="bisect between the last fit and the first OOM")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    ap.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    ap.add_argument("--freeze-vision", action="store_true")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by GPU name)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu (only with --tiny)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if args.device is None:
        args.device = "cuda" if cuda else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not cuda:
        print("sft_gpu_bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print("sft_gpu_bench: needs a CUDA GPU for the 7B shape (use --tiny for a CPU smoke run)", file=sys.stderr)
        return 2
    shape = TINY if args.tiny else QWEN25_VL_7B
    args.seq_len = args.seq_len or (64 if args.tiny else 1024)
    args.image_size = args.image_size or (64 if args.tiny else 512)
    args.prompt_tokens = args.prompt_tokens if args.prompt_tokens is not None else (8 if args.tiny else 64)
    args.max_batch = args.max_batch or (4 if args.tiny else 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = args.attn
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not (device.type == "cuda" and is_flash_attn_2_available()):
            print("  note: flash_attention_2 is not available here; using sdpa", flush=True)
            attn = "sdpa"
    grad_ckpt = not args.no_grad_ckpt
    vis = shape["vision"]
    grid = image_grid(args.image_size, args.image_size, vis["patch_size"], vis["spatial_merge_size"],
                      args.min_pixels, args.max_pixels)
    n_img_tok = grid[0] * grid[1] * grid[2] // vis["spatial_merge_size"] ** 2
    sample_layout(args.seq_len, n_img_tok, args.prompt_tokens)  # fail early on a too-short --seq-len

    torch.manual_seed(args.seed)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops_for(dev_name) if device.type == "cuda" else None)
    print(f"building {'tiny' if args.tiny else 'Qwen2.5-VL-7B'}-shaped model on {dev_name} ({dtype}, attn {attn}, "
          f"grad ckpt {'on' if grad_ckpt else 'off'}{', vision frozen' if args.freeze_vision else ''}) ...",
          flush=True)
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, attn, grad_ckpt, args.freeze_vision)
    pc = param_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    build_s = time.perf_counter() - t0
    print(f"  {pc['total'] / 1e9:.3f} B parameters ({pc['trainable'] / 1e9:.3f} B trainable), built in {build_s:.1f} s;"
          f" image {args.image_size}x{args.image_size} -> grid {grid} -> {n_img_tok} image tokens; seq {args.seq_len}",
          flush=True)

    if args.batch:
        best, tried = args.batch, []
    else:
        print("batch search:", flush=True)
        best, tried = search_batch(model, opt, args, grid, shape, device)
    res: dict = {
        "device": dev_name, "device_type": device.type, "dtype": str(dtype).replace("torch.", ""),
        "shape": "tiny" if args.tiny else "qwen2.5-vl-7b", "attn": attn, "grad_ckpt": grad_ckpt,
        "freeze_vision": args.freeze_vision, "seq_len": args.seq_len, "image_size": args.image_size,
        "min_pixels": args.min_pixels, "max_pixels": args.max_pixels, "image_grid_thw": list(grid),
        "image_tokens": n_img_tok, "prompt_tokens": args.prompt_tokens, "params": pc, "build_s": build_s,
        "torch": torch.__version__, "peak_tflops": peak, "goal_mfu": MFU_GOAL,
        "batch_search": {"max_batch": args.max_batch, "refine": args.refine, "fixed": bool(args.batch),
                         "largest_fit": best, "tried": tried},
    }
    import transformers

    res["transformers"] = transformers.__version__
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not best:
        print("no batch size fits (batch 1 ran out of memory)", flush=True)
        (out / "sft_gpu_bench.json").write_text(json.dumps(res, indent=2) + "\n")
        return 3

    fits = sorted({t["batch"] for t in tried if not t["oom"]} | {best}, reverse=True)
    for bs in fits:  # the largest fit; a smaller one if fragmentation after an OOM makes it fail now
        print(f"measuring batch {bs}: {args.warmup} warm-up + {args.steps} timed steps ...", flush=True)
        r = try_batch(model, opt, bs, args, grid, shape, device, args.warmup, args.steps)
        if not r["oom"]:
            break
        print(f"  batch {bs} ran out of memory in the measurement", flush=True)
    if r["oom"]:
        res["measure"] = r
        (out / "sft_gpu_bench.json").write_text(json.dumps(res, indent=2) + "\n")
        return 3
    best = bs
    times = sorted(r["times"])
    step_s = sum(times) / len(times)
    fl = step_flops(pc, model.config.text_config, model.config.vision_config, best, args.seq_len, grid,
                    args.freeze_vision, grad_ckpt)
    res["measure"] = {
        "batch": best, "steps": args.steps, "warmup": args.warmup, "step_s": step_s,
        "step_s_median": times[len(times) // 2], "step_times": r["times"],
        "tokens_per_step": fl["lm_tokens"], "image_tokens_per_step": best * n_img_tok,
        "patches_per_step": fl["patches"],
    }
    res["tokens_per_s"] = fl["lm_tokens"] / step_s
    res["samples_per_s"] = best / step_s
    res["flops_per_step"] = fl
    res["achieved_tflops"] = fl["model"] / step_s / 1e12
    res["achieved_hw_tflops"] = fl["hardware"] / step_s / 1e12
    if device.type == "cuda":
        res["peak_mem_gib"] = r["peak_mem_gib"]
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        res["device_mem_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    else:
        res["peak_mem_gib"] = None
        res["peak_rss_gib"] = rss_gib()
    res["mfu"] = res["achieved_tflops"] / peak if peak else None
    res["hfu"] = res["achieved_hw_tflops"] / peak if peak else None
    res["goal_met"] = (res["mfu"] >= MFU_GOAL) if res["mfu"] is not None else None
    for t in tried:
        if not t["oom"]:
            t["tokens_per_s"] = t["batch"] * args.seq_len / t["step_s"]
            t["samples_per_s"] = t["batch"] / t["step_s"]

    pct = lambda v: f"{100 * v:.1f} %" if v is not None else "n/a"  # noqa: E731
    print()
    print(f"SFT benchmark: {res['shape']} on {dev_name}, {res['dtype']}, attn {attn}, grad ckpt "
          f"{'on' if grad_ckpt else 'off'}, {'vision frozen' if args.freeze_vision else 'full fine-tuning'}")
    print(f"  {'batch':>6} {'step s':>9} {'tokens/s':>11} {'samples/s':>10} {'peak GiB':>9}")
    for t in tried:
        if t["oom"]:
            print(f"  {t['batch']:>6} {'OOM':>9}")
        else:
            mem = f"{t['peak_mem_gib']:9.1f}" if "peak_mem_gib" in t else f"{'-':>9}"
            print(f"  {t['batch']:>6} {t['step_s']:9.3f} {t['tokens_per_s']:11.1f} {t['samples_per_s']:10.2f} {mem}")
    print(f"  measured at batch {best} ({args.steps} steps after {args.warmup} warm-up):")
    print(f"    tokens/s (text + image tokens)  {res['tokens_per_s']:12.1f}")
    print(f"    samples/s                       {res['samples_per_s']:12.2f}")
    print(f"    step time, mean / median        {step_s:9.3f} s / {res['measure']['step_s_median']:.3f} s")
    if res["peak_mem_gib"] is not None:
        print(f"    peak memory allocated           {res['peak_mem_gib']:9.1f} GiB of {res['device_mem_gib']:.1f}")
    else:
        print(f"    peak RSS (CPU)                  {res['peak_rss_gib']:9.2f} GiB")
    print(f"    model TFLOP/s                   {res['achieved_tflops']:12.2f}   (peak "
          f"{peak if peak else 'unknown'})")
    print(f"    MFU                             {pct(res['mfu']):>12}   goal >= {100 * MFU_GOAL:.0f} %: "
          f"{'n/a' if res['goal_met'] is None else ('MET' if res['goal_met'] else 'NOT MET')}")
    if grad_ckpt:
        print(f"    HFU (with recompute)            {pct(res['hfu']):>12}")
    (out / "sft_gpu_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    _plot(res, out / "sft_gpu_bench.png")
    print(f"  wrote {out / 'sft_gpu_bench.json'} and {out / 'sft_gpu_bench.png'}")
    return 0


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tried = res["batch_search"]["tried"] or [dict(res["measure"], oom=False, tokens_per_s=res["tokens_per_s"])]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    labels = [str(t["batch"]) for t in tried]
    vals = [0.0 if t["oom"] else t["tokens_per_s"] for t in tried]
    colors = ["#c33" if t["oom"] else ("#185" if t["batch"] == res["measure"]["batch"] else "#2a7") for t in tried]
    bars = ax.bar(labels, vals, color=colors)
    for b, t in zip(bars, tried):
        if t["oom"]:
            ax.annotate("OOM", (b.get_x() + b.get_width() / 2, 0), ha="center", va="bottom", color="#c33")
    ax.set_xlabel("batch size (samples)")
    ax.set_ylabel("tokens / s (text + image)")
    mfu = res.get("mfu")
    ax.set_title(f"{res['shape']} SFT on {res['device']}: measured {res['tokens_per_s']:.0f} tokens/s at batch "
                 f"{res['measure']['batch']}" + (f", MFU {100 * mfu:.1f} %" if mfu is not None else ""), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
