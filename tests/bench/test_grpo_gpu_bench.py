"""The GRPO GPU benchmark: the inputs the 7B run gets, the optimizer choice, a tiny CPU smoke run of the
script, and the real 7B-shaped step where a GPU is present (`make bench-grpo-gpu` runs the full one)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "grpo_gpu_bench.py"
PHASES = ("rollout", "logps", "reward", "update")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _bench():
    spec = importlib.util.spec_from_file_location("grpo_gpu_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(out: Path, *extra: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, dict | None]:
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *extra], capture_output=True, text=True,
                       cwd=REPO, timeout=timeout)
    js = out / "grpo_gpu_bench.json"
    return r, (json.loads(js.read_text()) if js.exists() else None)


def _check_split(step: dict) -> None:
    """Every phase took time, and the phases account for the step. They are disjoint intervals inside the step, so
    their sum cannot exceed it; the rest ('other': padding, advantages, metric bookkeeping between the phases, no
    model work) is allowed up to 10 % of the step plus 50 ms of scheduling noise on a busy machine."""
    for p in PHASES:
        assert step[p] > 0, (p, step)
    parts = sum(step[p] for p in PHASES)
    assert step["other"] == pytest.approx(step["total"] - parts)
    assert -1e-6 <= step["other"] <= 0.1 * step["total"] + 0.05, step


def test_inputs_of_the_7b_run():
    """The processor at the paper's budget turns a 512x512 phantom into 361 image tokens, and the 7B shape takes
    the tokenizer's special ids (so the model finds the image pads the processor writes)."""
    b = _bench()
    from deepmedix.grounding import Frame

    rows = b.make_rows(1, 512, Frame(), seed=0)  # native, the paper's budget: the bench's 7B run
    row = rows[0]
    assert row["image"].size == (512, 512) and row["image"].mode == "RGB" and row["task"] == "grounding"
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"][0] == {"type": "image"}
    assert row["answer"] in row["prompt"][0]["content"][1]["text"].lower()
    assert len(row["ref_boxes_frame"]) == 1 and all(0 <= v <= 532 for v in row["ref_boxes_frame"][0])  # 532 grid

    proc = b.build_processor([row["prompt"][0]["content"][1]["text"]], b.PAPER_PIXELS)
    tok = proc.tokenizer
    shape = b.shape_for(b.sft.QWEN25_VL_7B, tok)
    cfg = b.sft.build_config(shape)
    assert cfg.text_config.vocab_size == 152064 and len(tok) < 152064
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") == proc.image_token_id
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.text_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg.text_config.hidden_size == 3584 and cfg.vision_config.depth == 32

    enc = proc.apply_chat_template([row["prompt"][0] | {"content": [{"type": "image", "image": row["image"]},
                                                                     row["prompt"][0]["content"][1]]}],
                                   add_generation_prompt=True, tokenize=True, return_dict=True)
    assert enc["image_grid_thw"].tolist() == [[1, 38, 38]]  # 512 -> 532 (min = max = 512*512) -> 38x38 patches
    assert list(enc["input_ids"][0]).count(cfg.image_token_id) == 361 == b.sft.image_tokens(
        512, 512, min_pixels=b.PAPER_PIXELS, max_pixels=b.PAPER_PIXELS)


def test_choose_optim():
    b = _bench()
    n = 8_292_166_656  # Qwen2.5-VL-7B
    h100, h200 = 81559 * 2**20, 143771 * 2**20
    assert b.choose_optim("auto", h200, n, 0.01, 0.0) == "adamw_torch_fused"  # 77.2 GiB + 8 <= 140.4
    assert b.choose_optim("auto", h100, n, 0.01, 0.0) == "adafactor"  # 77.2 GiB + 8 > 79.6
    assert b.choose_optim("auto", h100, n, 0.0, 0.0) == "adamw_torch_fused"  # no reference: 61.8 GiB + 8
    assert b.choose_optim("auto", h200, n, 0.01, 0.6) == "adafactor"  # vLLM keeps 60 % of the card
    assert b.choose_optim("auto", None, n, 0.01, 0.0) == "adamw_torch_fused"
    assert b.choose_optim("adamw_torch", h100, n, 0.01, 0.0) == "adamw_torch"


def test_smoke_tiny(tmp_path):
    r, res = _run(tmp_path, "--tiny", "--warmup", "1", "--steps", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert res["shape"] == "tiny" and res["vllm"] is False and res["oom"] is False
    assert res["num_generations"] == 5 and res["max_completion_length"] == 16 and res["beta"] == 0.01
    assert res["image_tokens"] == 4 and res["min_pixels"] == res["max_pixels"] == 56 * 56
    steps = res["step_times"]
    assert [s["warmup"] for s in steps] == [True, False]
    for s in steps:
        _check_split(s)
        assert 0 < s["generated_tokens"] <= 5 * 16 and s["completions"] == 5
        assert s["gen_tokens_per_s"] == pytest.approx(s["generated_tokens"] / s["rollout"])
        assert s["peak_rss_gib"] > 0 and (s["peak_mem_gib"] is None) == (res["device_type"] == "cpu")
    assert res["mean"]["total"] == pytest.approx(steps[1]["total"])
    for word in ("rollout s", "reward s", "update s", "total s", "gen tok/s", "random weights"):
        assert word in r.stdout, word
    png = tmp_path / "grpo_gpu_bench.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5000


def test_no_cuda_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r, res = _run(tmp_path)
    assert r.returncode == 2 and res is None
    assert "needs a CUDA GPU" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
def test_gpu_7b_grpo_step(tmp_path):
    import torch

    if torch.cuda.get_device_properties(0).total_memory < 70 * 2**30:
        pytest.skip("the 7B shape with its KL reference needs an 80 GB-class GPU")
    r, res = _run(tmp_path, "--warmup", "1", "--steps", "1", "--completion-len", "128", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    assert res["shape"] == "qwen2.5-vl-7b" and res["dtype"] == "bfloat16" and res["image_tokens"] == 361
    assert 8.2e9 < res["params"]["total"] < 8.35e9
    step = res["step_times"][-1]
    _check_split(step)
    assert 0.5 * 5 * 128 <= step["generated_tokens"] <= 5 * 128  # random weights: nearly always the full length
    assert step["peak_mem_gib"] > 45  # policy + reference + gradients, 2 bytes/param each
