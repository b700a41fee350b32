"""The SFT GPU benchmark (issue 4): the shape arithmetic and FLOP formula, a tiny CPU smoke run of the script, and
the real 7B-shaped measurement where a GPU is present (`make bench-sft-gpu` runs the full one)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "sft_gpu_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("sft_gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out: Path, *extra: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *extra], capture_output=True, text=True,
                       cwd=REPO, timeout=timeout)
    js = out / "sft_gpu_bench.json"
    return r, (json.loads(js.read_text()) if js.exists() else None)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    b = _bench()
    assert b.smart_resize(512, 512) == (504, 504)  # the stock 7B budget (3136 .. 12845056 px)
    assert b.smart_resize(512, 512, 28, 262144, 262144) == (532, 532)  # min = max = 512*512: 504^2 < min, rounds up
    assert b.smart_resize(168, 168, 28, 28224, 28224) == (168, 168)  # the tiny model's budget
    assert b.smart_resize(3000, 2500, 28, 3136, 262144) == ref(3000, 2500, 28, 3136, 262144)
    for h, w in [(512, 512), (64, 64), (3000, 2500), (1, 100), (100, 9), (999, 1001), (4000, 30), (56, 56)]:
        for lo, hi in [(3136, 12845056), (262144, 262144), (28224, 28224), (3136, 262144)]:
            assert b.smart_resize(h, w, 28, lo, hi) == tuple(ref(h, w, 28, lo, hi)), (h, w, lo, hi)


def test_image_tokens_and_windows():
    b = _bench()
    assert b.image_grid(512, 512) == (1, 36, 36)
    assert b.image_tokens(512, 512) == 324  # 1296 patches / (2x2 merge)
    assert b.image_tokens(512, 512, min_pixels=262144, max_pixels=262144) == 361
    assert b.image_tokens(64, 64) == 4  # the --tiny image: 56x56 -> (1, 4, 4)
    # 36x36 patches = 18x18 merged tokens, windows of 4x4 merged tokens: rows/cols 4,4,4,4,2
    wl = b.window_lengths(36, 36)
    assert len(wl) == 25 and sum(wl) == 1296 and max(wl) == 64 and min(wl) == 16
    assert sum(n * n for n in wl) == 16 * (4 * 16 + 4) ** 2
    # 4 full-attention blocks (1296^2 each) + 28 windowed ones, two images
    assert b.vision_sum_sq_spans((1, 36, 36), 2, 32, [7, 15, 23, 31]) == 2 * (4 * 1296**2 + 28 * 73984)


def test_flop_formula_toy():
    b = _bench()
    # N=10, L=2, d=4, S=8, batch 3 -> T=24: 6*10*24 + 12*2*4*8*24
    assert b.lm_flops(10, 2, 4, 8, 3) == 6 * 10 * 24 + 12 * 2 * 4 * 8 * 24 == 19872
    assert b.lm_flops(10, 2, 4, 8, 3, mult=2) == 2 * 10 * 24 + 4 * 2 * 4 * 8 * 24
    assert b.vision_flops(5, 16, 4, 100) == 6 * 5 * 16 + 12 * 4 * 100

    # a toy model: 2 layers of width 4 (2 heads x 2); 2 vision blocks of width 8 (the 2nd full attention)
    text = SimpleNamespace(num_hidden_layers=2, num_attention_heads=2, hidden_size=4)
    vis = SimpleNamespace(depth=2, fullatt_block_indexes=[1], spatial_merge_size=2, window_size=112, patch_size=14,
                          hidden_size=8)
    pc = {"lm_layers": 100, "lm_head": 20, "vision_per_patch": 7.0, "vision_blocks": 6}
    f = b.step_flops(pc, text, vis, batch=3, seq_len=8, grid=(1, 4, 4), freeze_vision=False, grad_ckpt=True)
    spans = 3 * (16**2 + 16**2)  # 16 patches: one window == the whole image, in both blocks
    assert f["lm"] == 6 * 120 * 24 + 12 * 2 * 4 * 8 * 24
    assert f["vision"] == 6 * 7.0 * 48 + 12 * 8 * spans
    assert f["model"] == f["lm"] + f["vision"]
    assert f["hardware"] == f["model"] + (2 * 100 * 24 + 4 * 2 * 4 * 8 * 24) + (2 * 6 * 48 + 4 * 8 * spans)
    frozen = b.step_flops(pc, text, vis, batch=3, seq_len=8, grid=(1, 4, 4), freeze_vision=True, grad_ckpt=False)
    assert frozen["vision"] == 2 * 7.0 * 48 + 4 * 8 * spans and frozen["hardware"] == frozen["model"]


def test_7b_config_and_peak():
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    b = _bench()
    cfg = b.build_config(b.QWEN25_VL_7B)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.vocab_size) == (3584, 18944, 28, 28, 4, 152064)
    assert t.rope_parameters["mrope_section"] == [16, 24, 24] and t.rope_parameters["rope_theta"] == 1000000.0
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size, v.in_channels) == \
        (32, 1280, 3420, 16, 3584, 3)
    assert list(v.fullatt_block_indexes) == [7, 15, 23, 31] and cfg.image_token_id == 151655
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    pc = b.param_counts(model)
    assert 8.2e9 < pc["total"] < 8.35e9  # Qwen2.5-VL-7B-Instruct: 8.29 B parameters
    assert pc["lm_head"] == 152064 * 3584
    assert b.peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert b.peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert b.peak_tflops_for("NVIDIA H200") == 989.0
    assert b.peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert b.peak_tflops_for("Tesla T4") is None


def test_smoke_tiny(tmp_path):
    r, res = _run(tmp_path, "--tiny", "--steps", "2", "--warmup", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert res["tokens_per_s"] > 0 and res["samples_per_s"] > 0
    search = res["batch_search"]
    assert search["largest_fit"] >= 1 and [t["batch"] for t in search["tried"]][:3] == [1, 2, 4]
    assert res["measure"]["batch"] == search["largest_fit"]
    assert res["image_tokens"] == 4 and res["measure"]["tokens_per_step"] == res["measure"]["batch"] * 64
    assert res["flops_per_step"]["model"] > 0
    if res["device_type"] == "cpu":
        assert res["mfu"] is None
    assert "tokens/s" in r.stdout and "MFU" in r.stdout
    assert (tmp_path / "sft_gpu_bench.png").stat().st_size > 1000


def test_smoke_tiny_peak_given(tmp_path):
    r, res = _run(tmp_path, "--tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--freeze-vision",
                  "--no-grad-ckpt", "--peak-tflops", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert res["mfu"] is not None and res["mfu"] > 0 and res["hfu"] == res["mfu"]
    assert res["batch_search"]["tried"] == [] and res["measure"]["batch"] == 2


def test_no_cuda_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r, _ = _run(tmp_path)
    assert r.returncode == 2 and "CUDA" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_gpu_7b_mfu(tmp_path):
    import torch

    if torch.cuda.get_device_properties(0).total_memory < 70 * 2**30:
        pytest.skip("full fine-tuning of the 7B shape needs an 80 GB-class GPU")
    extra = [] if _bench().peak_tflops_for(torch.cuda.get_device_name(0)) else ["--peak-tflops", "1000"]
    r, res = _run(tmp_path, "--max-batch", "2", "--steps", "3", "--warmup", "1", *extra, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert res["shape"] == "qwen2.5-vl-7b" and res["image_tokens"] == 324 and res["tokens_per_s"] > 0
    assert res["peak_mem_gib"] > 30  # 7.6 B bf16 params + grads + AdamW states
    assert res["mfu"] is not None and 0 < res["mfu"] < 1 and res["hfu"] > res["mfu"]
    assert "MFU" in r.stdout
